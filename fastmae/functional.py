"""The fused MAE ops as functions: validated inputs, backend dispatch, autograd.

Each op equals the official op sequence (see :mod:`fastmae.reference`) to float32 rounding
(float64 inputs are computed in float64), has a backward, and makes no host synchronisation on
the Triton path.

Every public op checks its inputs, then calls its unchecked twin (the same name with a leading
underscore), which picks the backend (:mod:`fastmae.dispatch`) and runs the custom op in
``fastmae.kernels``. The drop-in model checks its inputs once per step and calls the unchecked
twins.

Index arguments (``ids_keep``, ``ids_restore``) are checked by value by default: in range, and
distinct (``ids_keep``) or a permutation (``ids_restore``). That check reads the ids on the host,
a synchronisation on CUDA that also breaks CUDA-graph capture and adds a graph break under
torch.compile. Pass ``validate_ids=False`` for ids you made yourself. Unchecked ids are still
memory-safe: every kernel masks its accesses, and an id outside ``[0, L)`` contributes zeros;
but repeated or missing ids then give a wrong backward, since each op's backward writes each
kept row once.
"""

from __future__ import annotations

import math

import torch

from fastmae import _checks, reference
from fastmae._checks import to_2tuple
from fastmae.dispatch import functorch_active, use_triton
from fastmae.kernels.loss import masked_pixel_loss_op
from fastmae.kernels.masking import masking_op
from fastmae.kernels.patch_embed import add_positions_op
from fastmae.kernels.patch_embed import embed_visible_patches as _embed_kept_patches
from fastmae.kernels.patchify import gather_patches_op, scatter_patches_op
from fastmae.kernels.unshuffle import unshuffle_op

__all__ = [
    "random_masking_indices",
    "embed_visible_patches",
    "unshuffle_tokens",
    "patchify",
    "unpatchify",
    "masked_pixel_loss",
]


def random_masking_indices(noise: torch.Tensor, len_keep: int):
    """noise ``[N, L]`` -> ``(ids_keep [N, K], ids_restore [N, L], mask [N, L])``.

    ``ids_keep`` and ``ids_restore`` are int64; ``mask`` (1 = removed) has the default float
    dtype. For distinct noise values they equal the official double-argsort results.
    """
    _checks.check_floating(noise, "noise")
    if noise.dim() != 2:
        raise ValueError(f"noise must be [N, L], got shape {tuple(noise.shape)}")
    if isinstance(len_keep, bool) or not isinstance(len_keep, int):
        raise TypeError(f"len_keep must be an int, got {len_keep!r}")
    if not 0 <= len_keep <= noise.shape[1]:
        raise ValueError(f"len_keep must be in [0, L={noise.shape[1]}], got {len_keep}")
    return _random_masking_indices(noise, len_keep)


def _random_masking_indices(noise, len_keep):
    if functorch_active():
        return reference.masking_indices(noise, len_keep)
    # The mask has the default dtype, as the official torch.ones; the op has no gradient.
    mask_dtype = torch.get_default_dtype()
    return masking_op(noise.detach(), len_keep, mask_dtype, use_triton(noise))


def embed_visible_patches(
    imgs, ids_keep, weight, bias, cls_token, pos_embed, *, validate_ids: bool = True
):
    """Encoder input from the kept patches: ``[N, 1+K, D]``, cls token first.

    imgs ``[N, C, H, W]`` float; ids_keep ``[N, K]`` int64 (row-major patch indices, distinct
    within a row); weight ``[D, C, ph, pw]`` and bias ``[D]`` of the patch-embed conv; cls_token
    ``[1, 1, D]``; pos_embed ``[1, 1+L, D]``. Equals conv, ``+ pos_embed[:, 1:]``, gather,
    prepend cls. ``validate_ids=False`` skips the value check of ids_keep (a host sync).
    """
    _checks.check_images(imgs, None, None)
    _checks.check_tensor(weight, "weight")
    if weight.dim() != 4 or weight.shape[1] != imgs.shape[1]:
        raise ValueError(
            f"weight must be [D, C={imgs.shape[1]}, ph, pw], got shape {tuple(weight.shape)}"
        )
    width, _, ph, pw = weight.shape
    n, _, height, img_width = imgs.shape
    _checks.check_divisible(height, img_width, (ph, pw))
    num_patches = (height // ph) * (img_width // pw)
    _checks.check_ids(ids_keep, "ids_keep", n, imgs.device, max_length=num_patches)
    _checks.check_shape(bias, "bias", (width,))
    _checks.check_shape(cls_token, "cls_token", (1, 1, width))
    _checks.check_shape(pos_embed, "pos_embed", (1, num_patches + 1, width))
    if validate_ids:
        _checks.check_index_values(
            "embed_visible_patches", "ids_keep", ids_keep, num_patches, distinct=True
        )
    return _embed_visible_patches(imgs, ids_keep, weight, bias, cls_token, pos_embed)


def _embed_visible_patches(imgs, ids_keep, weight, bias, cls_token, pos_embed):
    """Also for videos ``[N, C, T, H, W]`` with a Conv3d weight, and without a cls token."""
    if functorch_active():
        return reference.embed_visible_patches(imgs, ids_keep, weight, bias, cls_token, pos_embed)
    triton_path = use_triton(imgs, weight, bias, cls_token, pos_embed)
    return _embed_kept_patches(
        imgs, ids_keep.long(), weight, bias, cls_token, pos_embed, triton_path
    )


def _add_positions(tokens, ids_keep, cls_token, pos_embed):
    """Embedded kept tokens ``[N, K, D]`` -> ``[N, S+K, D]``: the cls token (if not None) +
    ``pos_embed[0]`` first, then each token + its position ``pos_embed[S + ids_keep]``."""
    if functorch_active():
        return reference.add_positions(tokens, ids_keep, cls_token, pos_embed)
    width = tokens.shape[2]
    triton_path = use_triton(tokens, cls_token, pos_embed)
    cls_token = None if cls_token is None else cls_token.reshape(width)
    pos_embed = pos_embed.reshape(-1, width)
    return add_positions_op(tokens, ids_keep.long(), cls_token, pos_embed, triton_path)


def unshuffle_tokens(x, ids_restore, mask_token, pos_embed, *, validate_ids: bool = True):
    """Decoder input ``[N, 1+L, D]``: each position's kept token or mask_token, + pos_embed.

    x ``[N, 1+K, D]`` (cls first); ids_restore ``[N, L]`` int64 from the masking, a permutation
    of ``0..L-1`` in each row; mask_token ``[1, 1, D]``; pos_embed ``[1, 1+L, D]``.
    ``validate_ids=False`` skips the value check of ids_restore (a host sync).
    """
    _checks.check_tensor(x, "x")
    if x.dim() != 3:
        raise ValueError(f"x must be [N, 1+K, D], got shape {tuple(x.shape)}")
    n, _, width = x.shape
    length = _checks.check_ids(ids_restore, "ids_restore", n, x.device)
    if x.shape[1] > length + 1:
        raise ValueError(f"x holds {x.shape[1] - 1} tokens after cls, more than L={length}")
    _checks.check_shape(mask_token, "mask_token", (1, 1, width))
    _checks.check_shape(pos_embed, "pos_embed", (1, length + 1, width))
    if validate_ids:
        _checks.check_index_values(
            "unshuffle_tokens", "ids_restore", ids_restore, length, distinct=True
        )
    return _unshuffle_tokens(x, ids_restore, mask_token, pos_embed)


def _unshuffle_tokens(x, ids_restore, mask_token, pos_embed, has_cls: bool = True):
    """``has_cls=False``: x ``[N, K, D]`` and pos_embed ``[1, L, D]`` have no cls row."""
    if functorch_active():
        return reference.unshuffle_tokens(x, ids_restore, mask_token, pos_embed, has_cls)
    width = x.shape[2]
    triton_path = use_triton(x, mask_token, pos_embed)
    mask_token, pos_embed = mask_token.reshape(width), pos_embed.reshape(-1, width)
    return unshuffle_op(x, ids_restore.long(), mask_token, pos_embed, has_cls, triton_path)


def patchify(imgs: torch.Tensor, patch_size) -> torch.Tensor:
    """imgs ``[N, C, H, W]`` -> ``[N, h*w, ph*pw*C]``, pixel index ``(i*pw + j)*C + c``."""
    patch_size = to_2tuple(patch_size, "patch_size")
    _checks.check_images(imgs, None, None)
    _checks.check_divisible(imgs.shape[2], imgs.shape[3], patch_size)
    return _patchify(imgs, patch_size)


def _patchify(imgs, patch_size):
    if functorch_active():
        return reference.patch_rows(imgs, patch_size)
    return gather_patches_op(imgs, None, list(patch_size), True, use_triton(imgs))


def unpatchify(x: torch.Tensor, patch_size, grid_size) -> torch.Tensor:
    """``[N, h*w, ph*pw*C]`` -> imgs ``[N, C, h*ph, w*pw]``; grid_size is ``(h, w)`` or an int."""
    patch_size = to_2tuple(patch_size, "patch_size")
    grid_size = to_2tuple(grid_size, "grid_size")
    _checks.check_patch_rows(x, patch_size, grid_size)
    return _unpatchify(x, patch_size, grid_size)


def _unpatchify(x, patch_size, grid_size):
    """Also for videos: patch ``(u, ph, pw)`` and grid ``(t, h, w)``."""
    if functorch_active():
        return reference.unpatch_rows(x, patch_size, grid_size)
    sizes = [grid * side for grid, side in zip(grid_size, patch_size)]
    image_shape = [x.shape[0], x.shape[2] // math.prod(patch_size), *sizes]
    return scatter_patches_op(x, None, list(patch_size), image_shape, True, use_triton(x))


def masked_pixel_loss(imgs, pred, mask, patch_size, norm_pix_loss: bool = False):
    """MAE loss: per-patch MSE against the (normalised) target pixels, mean over removed patches.

    imgs ``[N, C, H, W]``; pred ``[N, L, ph*pw*C]`` fp32/bf16/fp16/fp64, any strides; mask
    ``[N, L]`` (1 = removed; any real weights). Returns the official
    ``(mse * mask).sum() / mask.sum()`` as a 0-dim tensor, differentiable in imgs, pred and
    mask; 0 when the mask sums to exactly 0. Patches of weight 0 are not read, so a NaN there
    does not reach the loss (unless mask requires grad: its gradient needs every patch's MSE).
    """
    patch_size = to_2tuple(patch_size, "patch_size")
    _checks.check_loss_inputs(imgs, pred, mask, patch_size)
    return _masked_pixel_loss(imgs, pred, mask, patch_size, norm_pix_loss)


def _masked_pixel_loss(imgs, pred, mask, patch_size, norm_pix_loss, frames=None):
    """Also for videos: imgs ``[N, C, T, H, W]``, patch ``(u, ph, pw)``, and ``frames`` the
    int64 frame of each tubelet frame (the video MAE's target frames), read in place."""
    if functorch_active():
        return reference.masked_pixel_loss(imgs, pred, mask, patch_size, norm_pix_loss, frames)
    # The mask's gradient needs every patch's MSE, so only then are all patches read.
    all_patches = mask.requires_grad and torch.is_grad_enabled()
    triton_path = use_triton(imgs, pred, mask)
    flags = (bool(norm_pix_loss), all_patches, triton_path)
    return masked_pixel_loss_op(imgs, pred, mask, frames, list(patch_size), *flags)[0]
