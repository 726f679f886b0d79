"""The fused ops without input checks: backend choice (:mod:`fastmae.dispatch`) and the custom
ops of ``fastmae.kernels``.

:mod:`fastmae.functional` checks a call's inputs, then runs the op here. The models call these
directly only inside a training step whose inputs they have already checked once; everything
else goes through :mod:`fastmae.functional`. Shapes and dtypes are as documented there. Under
``torch.func`` transforms (which custom ops do not support) each op runs its plain-torch form
in :mod:`fastmae.naive` instead.
"""

from __future__ import annotations

import math

import torch

from fastmae import naive
from fastmae.dispatch import functorch_active, use_triton
from fastmae.kernels.loss import masked_pixel_loss_op
from fastmae.kernels.masking import masking_op
from fastmae.kernels.patch_embed import add_positions_op
from fastmae.kernels.patch_embed import embed_visible_patches as embed_kept_patches_op
from fastmae.kernels.patchify import gather_patches_op, scatter_patches_op
from fastmae.kernels.unshuffle import unshuffle_op


def random_masking_indices(noise, len_keep: int):
    if functorch_active():
        return naive.masking_indices(noise, len_keep)
    # The mask has the default dtype, as the official torch.ones; the op has no gradient.
    mask_dtype = torch.get_default_dtype()
    return masking_op(noise.detach(), len_keep, mask_dtype, use_triton(noise))


def embed_visible_patches(imgs, ids_keep, weight, bias, cls_token, pos_embed):
    if functorch_active():
        return naive.embed_visible_patches(imgs, ids_keep, weight, bias, cls_token, pos_embed)
    triton_path = use_triton(imgs, weight, bias, cls_token, pos_embed)
    return embed_kept_patches_op(
        imgs, ids_keep.long(), weight, bias, cls_token, pos_embed, triton_path
    )


def add_positions(tokens, ids_keep, cls_token, pos_embed):
    if functorch_active():
        return naive.add_positions(tokens, ids_keep, cls_token, pos_embed)
    width = tokens.shape[2]
    triton_path = use_triton(tokens, cls_token, pos_embed)
    cls_token = None if cls_token is None else cls_token.reshape(width)
    pos_embed = pos_embed.reshape(-1, width)
    return add_positions_op(tokens, ids_keep.long(), cls_token, pos_embed, triton_path)


def unshuffle_tokens(x, ids, mask_token, pos_embed, has_cls: bool = True, shuffled: bool = False):
    """The decoder input (see ``fastmae.kernels.unshuffle``): with ``ids_restore [N, L]`` every
    position in order; with ``shuffled`` and ``ids_shuffle`` (or its first R columns) the rows
    in shuffled order, x's tokens then mask tokens, each plus the position of its patch."""
    if functorch_active():
        if shuffled:
            return naive.shuffled_tokens(x, ids, mask_token, pos_embed, has_cls)
        return naive.unshuffle_tokens(x, ids, mask_token, pos_embed, has_cls)
    width = x.shape[2]
    triton_path = use_triton(x, mask_token, pos_embed)
    mask_token, pos_embed = mask_token.reshape(width), pos_embed.reshape(-1, width)
    return unshuffle_op(x, ids.long(), mask_token, pos_embed, has_cls, shuffled, triton_path)


def shuffle_order(ids_restore):
    """ids_restore ``[N, L]`` (a permutation per row) -> its inverse ``ids_shuffle``: patch
    ``ids_shuffle[n, r]`` has rank r, the kept patches first. One scatter, no sort."""
    ranks = torch.arange(ids_restore.shape[1], device=ids_restore.device)
    # Out of place over ids_restore itself: a permutation overwrites every entry.
    return ids_restore.scatter(1, ids_restore, ranks.expand_as(ids_restore))


def patchify(imgs, patch_size):
    # Off the Triton path the plain reshape and permute is the op: one copy each way, as the
    # kernel's, without a custom op's dispatch around it.
    if functorch_active() or not use_triton(imgs):
        return naive.patch_rows(imgs, patch_size)
    return gather_patches_op(imgs, None, list(patch_size), True, True)


def unpatchify(x, patch_size, grid_size):
    if functorch_active() or not use_triton(x):
        return naive.unpatch_rows(x, patch_size, grid_size)
    sizes = [grid * side for grid, side in zip(grid_size, patch_size)]
    image_shape = [x.shape[0], x.shape[2] // math.prod(patch_size), *sizes]
    return scatter_patches_op(x, None, list(patch_size), image_shape, True, True)


def masked_pixel_loss(imgs, pred, mask, patch_size, norm_pix_loss, frames=None, pred_ids=None):
    """MAE's loss; row r of pred predicts patch r, or patch ``pred_ids[n, r]`` (then the
    images get no gradient: pass them detached)."""
    if functorch_active():
        return naive.masked_pixel_loss(
            imgs, pred, mask, patch_size, norm_pix_loss, frames, pred_ids
        )
    # The mask's gradient needs every patch's MSE, so only then are all patches read.
    all_patches = mask.requires_grad and torch.is_grad_enabled()
    triton_path = use_triton(imgs, pred, mask)
    norm = "patch" if norm_pix_loss else "none"
    pred_ids = None if pred_ids is None else pred_ids.long()
    return masked_pixel_loss_op(
        imgs, pred, mask, pred_ids, frames, None, list(patch_size), norm, all_patches, triton_path
    )[0]


def masked_pixel_loss_by_ids(video, pred, pred_ids, patch_size, norm: str, unnormalise=None):
    """The mean over ``pred [N, M, P]`` of ``(pred - target)^2``, row m's target being patch
    ``pred_ids[n, m]`` of the (strided) video ``[N, C, F, H, W]``, un-normalised by
    ``unnormalise`` ``[2, C]`` (std, mean) and normalised by ``norm`` (see
    ``fastmae.kernels.loss``). No gradient flows into the video."""
    if functorch_active():
        return naive.masked_pixel_loss_by_ids(video, pred, pred_ids, patch_size, norm, unnormalise)
    weight = torch.ones(pred.shape[:2], dtype=video.dtype, device=pred.device)
    triton_path = use_triton(video, pred)
    args = (pred_ids.long(), None, unnormalise, list(patch_size), norm, False, triton_path)
    return masked_pixel_loss_op(video.detach(), pred, weight, *args)[0]
