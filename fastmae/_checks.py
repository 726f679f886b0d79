"""Input validation shared by the reference, the drop-in and the functional ops: each public
entry point checks its inputs once, with these, before any unchecked internal runs.

Every error names what was expected and what came, so a wrong call fails loudly instead of
reading memory it should not or returning a silently wrong answer.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from fastmae.dispatch import functorch_active


def to_tuple(value, name: str, length: int = 2) -> tuple[int, ...]:
    """An int or a tuple of ``length`` ints (``(H, W)``, or ``(T, H, W)`` for videos) as a tuple
    of positive ints; a TypeError/ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        sizes = (value,) * length
    elif isinstance(value, (tuple, list)) and len(value) == length:
        sizes = tuple(value)
    else:
        form = "an (H, W) pair" if length == 2 else "a (T, H, W) triple"
        raise TypeError(f"{name} must be an int or {form} of ints, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        raise ValueError(f"{name} must hold positive ints, got {value!r}")
    return sizes


def to_2tuple(value, name: str) -> tuple[int, int]:
    """An int or an ``(H, W)`` pair as a pair of positive ints."""
    return to_tuple(value, name, 2)


def describe(value) -> str:
    """What came, for an error message: a tensor's dtype, shape and device, or the type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)} on {value.device}"
    return f"a {type(value).__name__}"


def check_tensor(value, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_floating(value: torch.Tensor, name: str) -> None:
    check_tensor(value, name)
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {value.dtype}; "
            f"convert it first, e.g. {name}.float() / 255"
        )


def check_images(imgs, in_chans: int | None, img_size: tuple[int, int] | None) -> None:
    """imgs must be a floating ``[N, C, H, W]`` tensor; C and (H, W) checked where given."""
    check_floating(imgs, "imgs")
    if imgs.dim() != 4:
        raise ValueError(f"imgs must be [N, C, H, W], got shape {tuple(imgs.shape)}")
    if in_chans is not None and imgs.shape[1] != in_chans:
        raise ValueError(
            f"imgs has {imgs.shape[1]} channels, the model expects in_chans={in_chans} "
            f"(shape {tuple(imgs.shape)})"
        )
    if img_size is not None and tuple(imgs.shape[2:]) != tuple(img_size):
        raise ValueError(
            f"imgs is {imgs.shape[2]}x{imgs.shape[3]} (H x W), the model expects "
            f"{img_size[0]}x{img_size[1]}"
        )


def dtype_matches(imgs: torch.Tensor, weight: torch.Tensor) -> bool:
    """Outside autocast, the images must have the dtype of the model's parameters, as the
    official convolution requires; under autocast any floating dtype is cast as it would be.

    A weight that is still a shard (a DTensor: FSDP2 gathers it in its own module's forward,
    where mixed precision may give it another dtype) is checked there, not here.
    """
    return (
        imgs.dtype == weight.dtype
        or torch.is_autocast_enabled(imgs.device.type)
        or type(weight).__name__ == "DTensor"
    )


def check_dtype_matches(imgs: torch.Tensor, weight: torch.Tensor) -> None:
    """:func:`dtype_matches`, or a TypeError naming both dtypes."""
    if not dtype_matches(imgs, weight):
        raise TypeError(
            f"imgs has dtype {imgs.dtype}, the model's parameters {weight.dtype}: convert one "
            f"to the other (imgs.to({weight.dtype}) or model.to({imgs.dtype})), or run the model "
            "under torch.autocast"
        )


def check_divisible(height: int, width: int, patch_size: tuple[int, int]) -> None:
    if height % patch_size[0] or width % patch_size[1]:
        raise ValueError(
            f"image size {height}x{width} (H x W) is not divisible by the patch size "
            f"{patch_size[0]}x{patch_size[1]}"
        )


def ratio_value(ratio, name: str = "mask_ratio") -> float:
    """A ratio (``mask_ratio``, ``decoder_mask_ratio``) as a float in [0, 1). Like the official
    ``int(L * (1 - mask_ratio))`` it takes any real number: a Python or numpy scalar, or a 0-dim
    tensor (read on the host)."""
    value = ratio
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    elif isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got {ratio!r}")
    value = float(value)
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def len_keep(num_patches: int, mask_ratio) -> int:
    """Number of kept patches, ``int(L * (1 - mask_ratio))`` exactly as the official code."""
    return int(num_patches * (1 - ratio_value(mask_ratio)))


def len_decode(num_patches: int, keep: int, decoder_mask_ratio: float) -> int:
    """Number of tokens the decoder sees besides a cls row under decoder masking: the ``keep``
    visible ones and ``M = int((L - keep) * (1 - decoder_mask_ratio))`` removed ones (a checked
    ratio; 0 gives every removed patch, the official decoder)."""
    return keep + int((num_patches - keep) * (1 - decoder_mask_ratio))


def masking_step(imgs, num_patches: int, mask_ratio, noise) -> int:
    """A step's masking arguments: returns the kept count :func:`len_keep`, and checks
    ``noise`` (floating ``[N, L]`` on the images' device) when it is given."""
    keep = len_keep(num_patches, mask_ratio)
    if noise is not None:
        check_noise(noise, imgs.shape[0], num_patches, imgs.device)
    return keep


def check_noise(noise, batch: int, num_patches: int, device: torch.device) -> None:
    check_floating(noise, "noise")
    if tuple(noise.shape) != (batch, num_patches):
        raise ValueError(
            f"noise must have shape [N, L] = [{batch}, {num_patches}], got {tuple(noise.shape)}"
        )
    if noise.device != device:
        raise ValueError(f"noise is on {noise.device}, the images are on {device}")


def check_ids(ids, name: str, batch: int, device: torch.device, max_length=None) -> int:
    """ids must be an int64/int32 ``[batch, T]`` tensor on ``device`` (T <= max_length if
    given); returns T."""
    check_tensor(ids, name)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {ids.dtype}")
    too_long = max_length is not None and ids.dim() == 2 and ids.shape[1] > max_length
    if ids.dim() != 2 or ids.shape[0] != batch or too_long:
        bound = "" if max_length is None else f" with T <= {max_length}"
        raise ValueError(f"{name} must have shape [{batch}, T]{bound}, got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device}, expected {device}")
    return ids.shape[1]


def check_clip(pixel_values, frames: int, channels: int, size: tuple[int, int]) -> None:
    """pixel_values must be a floating ``[N, T, C, H, W]`` clip (time before channels, as
    Hugging Face's video models take it) of the given T, C and (H, W)."""
    check_floating(pixel_values, "pixel_values")
    expected = (frames, channels, *size)
    if pixel_values.dim() != 5 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values must be [N, T, C, H, W] = [N, {', '.join(map(str, expected))}], "
            f"got shape {tuple(pixel_values.shape)}"
        )


def check_bool_masked_pos(
    bool_masked_pos, batch: int, length: int, device, name: str = "bool_masked_pos"
) -> None:
    """bool_masked_pos (or another mask, named ``name``) must be a bool ``[batch, L]`` tensor
    on ``device``."""
    check_tensor(bool_masked_pos, name)
    if bool_masked_pos.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {bool_masked_pos.dtype}")
    check_shape(bool_masked_pos, name, (batch, length))
    if bool_masked_pos.device != device:
        raise ValueError(f"{name} is on {bool_masked_pos.device}, expected {device}")


def masked_per_sample(bool_masked_pos, name: str = "bool_masked_pos") -> int:
    """The number of patches a checked ``bool_masked_pos [N, L]`` masks in each sample, which
    must be the same in every sample (Hugging Face VideoMAE's contract, which HF's reshape
    does not always enforce). Reads the counts on the host: one synchronisation, where HF's
    boolean indexing makes several."""
    counts = bool_masked_pos.sum(1)
    if not counts.numel():
        return 0
    fewest, most = torch.stack([counts.min(), counts.max()]).tolist()
    if fewest != most:
        raise ValueError(
            f"{name} must mark the same number of patches in every sample, got between "
            f"{fewest} and {most}"
        )
    return most


def check_decoder_inputs(x, ids_restore, width: int, length: int, has_cls: bool) -> None:
    """x: an encoder latent ``[N, S+K, width]`` (S = 1 with a cls row first), K <= ``length``;
    ids_restore: int ``[N, length]`` on x's device."""
    check_floating(x, "x")
    start = int(has_cls)
    if x.dim() != 3 or x.shape[2] != width or not start <= x.shape[1] <= length + start:
        rows = "1+K" if has_cls else "K"
        raise ValueError(
            f"x must be the latent [N, {rows}, {width}] with K <= {length}, "
            f"got shape {tuple(x.shape)}"
        )
    if check_ids(ids_restore, "ids_restore", x.shape[0], x.device) != length:
        raise ValueError(
            f"ids_restore must have shape [{x.shape[0]}, {length}], got {tuple(ids_restore.shape)}"
        )


def passes(check, *args) -> bool:
    """Whether ``check(*args)`` accepts its arguments: how a patched third-party method (the
    Hugging Face models) decides between the fused path and its original code."""
    try:
        check(*args)
    except (TypeError, ValueError):
        return False
    return True


def check_shape(value, name: str, expected: tuple[int, ...]) -> None:
    check_tensor(value, name)
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(value.shape)}")


def check_patch_rows(x, patch_size: tuple[int, ...], grid_size: tuple[int, ...]) -> int:
    """x must be floating ``[N, h*w, ph*pw*C]`` for the grid ``(h, w)`` and patch ``(ph, pw)``,
    or ``[N, t*h*w, u*ph*pw*C]`` for a grid ``(t, h, w)`` of tubelets ``(u, ph, pw)``; returns
    C."""
    check_floating(x, "x")
    tokens, pixels = math.prod(grid_size), math.prod(patch_size)
    if x.dim() != 3 or x.shape[1] != tokens or x.shape[2] % pixels or x.shape[2] == 0:
        grid = "x".join(map(str, grid_size))
        patch = "x".join(map(str, patch_size))
        raise ValueError(
            f"x must be [N, {tokens}, {'*'.join(map(str, patch_size))}*C] for a {grid} grid of "
            f"{patch} patches, got shape {tuple(x.shape)}"
        )
    return x.shape[2] // pixels


def check_patch_grid(imgs, patch_size, frames=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """imgs: floating images ``[N, C, H, W]`` cut by ``patch_size`` (an int or ``(ph, pw)``),
    or videos ``[N, C, T, H, W]`` cut by a tubelet ``(u, ph, pw)``, each side divisible;
    ``frames`` (videos only) the int64 ``[T']`` frames that are the targets. Returns the patch
    and the token grid, ``(h, w)`` or ``(t, h, w)`` with ``t = T' / u``."""
    check_floating(imgs, "imgs")
    if imgs.dim() == 4:
        if frames is not None:
            raise ValueError(
                f"frames is for videos [N, C, T, H, W], imgs has shape {tuple(imgs.shape)}"
            )
        patch = to_2tuple(patch_size, "patch_size")
        check_divisible(imgs.shape[2], imgs.shape[3], patch)
        return patch, (imgs.shape[2] // patch[0], imgs.shape[3] // patch[1])
    if imgs.dim() != 5:
        raise ValueError(
            f"imgs must be images [N, C, H, W] or videos [N, C, T, H, W], got shape "
            f"{tuple(imgs.shape)}"
        )
    patch = to_tuple(patch_size, "patch_size", 3)
    frame_count = imgs.shape[2] if frames is None else check_frames(frames, imgs)
    sizes = (frame_count, *imgs.shape[3:])
    if any(size % side for size, side in zip(sizes, patch)):
        raise ValueError(
            f"the clip's (T, H, W) = {sizes} is not divisible by the tubelet {patch}"
            + ("" if frames is None else f" (T counts the {frame_count} target frames)")
        )
    return patch, tuple(size // side for size, side in zip(sizes, patch))


def check_frames(frames, imgs) -> int:
    """frames: a non-empty int64/int32 ``[T']`` tensor of frame indices of ``imgs [N, C, T, H,
    W]``, on its device, each in ``[0, T)`` (read on the host); returns T'."""
    check_tensor(frames, "frames")
    if frames.dtype not in (torch.int64, torch.int32) or frames.dim() != 1 or not len(frames):
        raise ValueError(
            f"frames must be a non-empty int64 [T'] tensor, got {frames.dtype} of shape "
            f"{tuple(frames.shape)}"
        )
    if frames.device != imgs.device:
        raise ValueError(f"frames is on {frames.device}, imgs on {imgs.device}")
    if not functorch_active() and ((frames < 0) | (frames >= imgs.shape[2])).any():
        raise ValueError(f"frames must lie in [0, T={imgs.shape[2]}), got {frames.tolist()}")
    return frames.shape[0]


def check_pred_and_mask(pred, mask, imgs, length: int, pixels: int) -> None:
    """pred floating ``[N, length, pixels]`` and mask ``[N, length]``, on imgs' device."""
    check_floating(pred, "pred")
    check_shape(pred, "pred", (imgs.shape[0], length, pixels))
    check_shape(mask, "mask", (imgs.shape[0], length))
    for name, tensor in (("pred", pred), ("mask", mask)):
        if tensor.device != imgs.device:
            raise ValueError(f"{name} is on {tensor.device}, imgs on {imgs.device}")


def check_index_values(op: str, name: str, ids: torch.Tensor, upper: int, distinct: bool) -> None:
    """Every entry of ``ids [N, T]`` lies in ``[0, upper)``, and, with ``distinct``, no row holds
    a value twice. Reads ``ids`` on the host: a synchronisation on CUDA. Skipped under
    torch.func transforms, which cannot read values; the ops run there (the reference's
    ``gather``) refuse out-of-range ids themselves."""
    if ids.numel() == 0 or functorch_active():
        return
    outside = (ids < 0) | (ids >= upper)
    if outside.any():
        row, col = (int(i) for i in outside.nonzero()[0])
        raise ValueError(
            f"{op}: {name}[{row}, {col}] = {int(ids[row, col])} is outside [0, {upper})"
        )
    if not distinct:
        return
    ordered, order = ids.sort(dim=1, stable=True)
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if repeated.any():
        row, col = (int(i) for i in repeated.nonzero()[0])
        first, second = int(order[row, col]), int(order[row, col + 1])
        raise ValueError(
            f"{op}: {name}[{row}] holds {int(ordered[row, col])} twice (at columns {first} and "
            f"{second}); its entries must be distinct"
        )
