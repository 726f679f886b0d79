"""The fused MAE ops as functions: checked inputs, backend dispatch, autograd.

Each op equals the official op sequence (see :mod:`fastmae.reference`) to float32 rounding
(float64 inputs are computed in float64), has a backward, and makes no host synchronisation on
the Triton path. Each takes images ``[N, C, H, W]`` with patches ``(ph, pw)`` (an int for square
ones) and videos ``[N, C, T, H, W]`` with tubelets ``(u, ph, pw)``, as mae_st cuts them; a
token's pixels are ordered ``(u, i, j, c)``, channel fastest, as the official ``patchify``.

Every op checks its inputs, with a clear error for a wrong call, then runs its unchecked form
in :mod:`fastmae._unchecked`; the models check a step's inputs once and run those directly.

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

from fastmae import _checks, _unchecked

__all__ = [
    "random_masking_indices",
    "embed_visible_patches",
    "add_positions",
    "unshuffle_tokens",
    "patchify",
    "unpatchify",
    "masked_pixel_loss",
]


def random_masking_indices(noise: torch.Tensor, len_keep: int):
    """noise ``[N, L]`` -> ``(ids_keep [N, K], ids_restore [N, L], mask [N, L])``, K = len_keep.

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
    return _unchecked.random_masking_indices(noise, len_keep)


def embed_visible_patches(
    imgs, ids_keep, weight, bias, cls_token, pos_embed, *, validate_ids: bool = True
):
    """Encoder input from the kept patches: ``[N, S+K, D]``, the cls token first (S = 1), or
    no cls row (S = 0) when ``cls_token`` is None.

    imgs ``[N, C, H, W]`` with the patch-embed Conv2d's weight ``[D, C, ph, pw]``, or videos
    ``[N, C, T, H, W]`` with a Conv3d weight ``[D, C, u, ph, pw]``; bias ``[D]``; ids_keep
    ``[N, K]`` int64 (row-major token indices, distinct within a row); cls_token ``[1, 1, D]``
    or None; pos_embed ``[1, S+L, D]``. Equals the convolution, the gather of the kept tokens,
    ``+ pos_embed`` at each one's position, cls + ``pos_embed[:, :1]`` in front.
    ``validate_ids=False`` skips the value check of ids_keep (a host sync).
    """
    _checks.check_floating(imgs, "imgs")
    _checks.check_tensor(weight, "weight")
    layout = "[D, C, ph, pw]" if imgs.dim() == 4 else "[D, C, u, ph, pw]"
    if weight.dim() != imgs.dim() or weight.shape[1] != imgs.shape[1]:
        raise ValueError(
            f"weight must be {layout} with C={imgs.shape[1]} for imgs of shape "
            f"{tuple(imgs.shape)}, got shape {tuple(weight.shape)}"
        )
    _, grid = _checks.check_patch_grid(imgs, tuple(weight.shape[2:]))
    width, length = weight.shape[0], math.prod(grid)
    _checks.check_ids(ids_keep, "ids_keep", imgs.shape[0], imgs.device, max_length=length)
    _checks.check_shape(bias, "bias", (width,))
    _check_cls_and_positions(cls_token, pos_embed, length, width)
    if validate_ids:
        _checks.check_index_values(
            "embed_visible_patches", "ids_keep", ids_keep, length, distinct=True
        )
    return _unchecked.embed_visible_patches(imgs, ids_keep, weight, bias, cls_token, pos_embed)


def add_positions(tokens, ids_keep, cls_token, pos_embed, *, validate_ids: bool = True):
    """Embedded kept tokens ``[N, K, D]`` -> ``[N, S+K, D]``: each token + its position
    ``pos_embed[:, S + id]``, after the cls token + ``pos_embed[:, :1]`` (S = 1) unless
    ``cls_token`` is None (S = 0). What :func:`embed_visible_patches` does after its GEMM, for
    a patch embedding of your own. ids_keep ``[N, K]`` int64, distinct within a row;
    pos_embed ``[1, S+L, D]``. ``validate_ids=False`` skips the value check (a host sync).
    """
    _checks.check_floating(tokens, "tokens")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [N, K, D], got shape {tuple(tokens.shape)}")
    n, keep, width = tokens.shape
    _checks.check_tensor(pos_embed, "pos_embed")
    length = pos_embed.shape[1] - (cls_token is not None) if pos_embed.dim() == 3 else -1
    _check_cls_and_positions(cls_token, pos_embed, length, width)
    _checks.check_shape(ids_keep, "ids_keep", (n, keep))
    _checks.check_ids(ids_keep, "ids_keep", n, tokens.device, max_length=length)
    if validate_ids:
        _checks.check_index_values("add_positions", "ids_keep", ids_keep, length, distinct=True)
    return _unchecked.add_positions(tokens, ids_keep, cls_token, pos_embed)


def _check_cls_and_positions(cls_token, pos_embed, length: int, width: int) -> None:
    """cls_token ``[1, 1, D]`` or None, pos_embed ``[1, S+L, D]`` (S = 1 with a cls token)."""
    if cls_token is not None:
        _checks.check_shape(cls_token, "cls_token", (1, 1, width))
    _checks.check_shape(pos_embed, "pos_embed", (1, (cls_token is not None) + length, width))


def unshuffle_tokens(
    x, ids_restore, mask_token, pos_embed, *, has_cls: bool = True, validate_ids: bool = True
):
    """Decoder input ``[N, S+L, D]``: each position's kept token or mask_token, + pos_embed.

    x ``[N, S+K, D]``, the cls row first (S = 1) with ``has_cls``, else no cls row (S = 0, as
    mae_st without ``cls_embed``); ids_restore ``[N, L]`` int64 from the masking, a
    permutation of ``0..L-1`` in each row; mask_token ``[1, 1, D]``; pos_embed ``[1, S+L, D]``.
    ``validate_ids=False`` skips the value check of ids_restore (a host sync).
    """
    _checks.check_tensor(x, "x")
    start = int(has_cls)
    if x.dim() != 3 or x.shape[1] < start:
        rows = "[N, 1+K, D]" if has_cls else "[N, K, D]"
        raise ValueError(f"x must be {rows}, got shape {tuple(x.shape)}")
    n, _, width = x.shape
    length = _checks.check_ids(ids_restore, "ids_restore", n, x.device)
    if x.shape[1] > length + start:
        raise ValueError(f"x holds {x.shape[1] - start} tokens, more than L={length}")
    _checks.check_shape(mask_token, "mask_token", (1, 1, width))
    _checks.check_shape(pos_embed, "pos_embed", (1, length + start, width))
    if validate_ids:
        _checks.check_index_values(
            "unshuffle_tokens", "ids_restore", ids_restore, length, distinct=True
        )
    return _unchecked.unshuffle_tokens(x, ids_restore, mask_token, pos_embed, has_cls)


def patchify(imgs: torch.Tensor, patch_size) -> torch.Tensor:
    """imgs ``[N, C, H, W]`` -> ``[N, h*w, ph*pw*C]``, pixel index ``(i*pw + j)*C + c``; videos
    ``[N, C, T, H, W]`` with a tubelet ``(u, ph, pw)`` -> ``[N, t*h*w, u*ph*pw*C]``."""
    patch_size, _ = _checks.check_patch_grid(imgs, patch_size)
    return _unchecked.patchify(imgs, patch_size)


def unpatchify(x: torch.Tensor, patch_size, grid_size) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``[N, h*w, ph*pw*C]`` -> imgs ``[N, C, h*ph, w*pw]``
    (grid_size ``(h, w)`` or an int), or with a tubelet ``(u, ph, pw)`` and grid ``(t, h, w)``
    ``[N, t*h*w, u*ph*pw*C]`` -> videos ``[N, C, t*u, h*ph, w*pw]``."""
    dims = 3 if isinstance(patch_size, (tuple, list)) and len(patch_size) == 3 else 2
    patch_size = _checks.to_tuple(patch_size, "patch_size", dims)
    grid_size = _checks.to_tuple(grid_size, "grid_size", dims)
    _checks.check_patch_rows(x, patch_size, grid_size)
    return _unchecked.unpatchify(x, patch_size, grid_size)


def masked_pixel_loss(imgs, pred, mask, patch_size, norm_pix_loss: bool = False, frames=None):
    """MAE loss: per-patch MSE against the (normalised) target pixels, mean over removed patches.

    imgs ``[N, C, H, W]`` with patch ``(ph, pw)``, or videos ``[N, C, T, H, W]`` with tubelet
    ``(u, ph, pw)`` whose targets are the frames ``frames`` (int64 ``[T']``, mae_st's
    ``pred_t_dim`` frames; all frames when None), read in place; pred ``[N, L, P]``
    fp32/bf16/fp16/fp64, any strides, P the pixels of one patch; mask ``[N, L]`` (1 = removed;
    any real weights). With ``norm_pix_loss`` each target patch is normalised by its mean and
    unbiased variance. Returns the official ``(mse * mask).sum() / mask.sum()`` as a 0-dim
    tensor, differentiable in imgs, pred and mask; 0 when the mask sums to exactly 0. Patches
    of weight 0 are not read, so a NaN there does not reach the loss (unless mask requires
    grad: its gradient needs every patch's MSE).
    """
    patch_size, grid = _checks.check_patch_grid(imgs, patch_size, frames)
    pixels = math.prod(patch_size) * imgs.shape[1]
    _checks.check_pred_and_mask(pred, mask, imgs, math.prod(grid), pixels)
    return _unchecked.masked_pixel_loss(imgs, pred, mask, patch_size, norm_pix_loss, frames)
