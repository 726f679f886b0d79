"""Encoder input from the kept patches only: gather, GEMM, position embedding, cls token.

    x[n, 0]   = cls_token + pos_embed[0]                                  (with a cls token)
    x[n, S+t] = patch(imgs[n], ids_keep[n, t]) @ weight.T + bias + pos_embed[S + ids_keep[n, t]]

with S = 1 with a cls token, 0 without (the video MAE's default). Images take a Conv2d weight
``[D, C, ph, pw]``, videos ``[N, C, F, H, W]`` a Conv3d weight ``[D, C, u, ph, pw]``.

The official code embeds all L patches with a convolution and then throws 75% away; here the
GEMM runs on K of L patches, fed by the patch gather kernel in the conv weight's (c, i, j) order.
Each step is an op with its own backward, so autograd and torch.compile see the composition.
"""

from typing import Optional

import torch
from torch import Tensor

from ._jit import row_tile, store_rows_plus_positions
from ._triton import (
    fused_op,
    ids_in_range,
    launch_row_tiles,
    nbytes,
    promoted_dtype,
    sum_rows_by_ids,
    tl,
    triton,
)
from .patchify import gather_patches_op


@triton.jit
def _add_positions_kernel(
    out_ptr,  # [N, CLS+K, D] out
    tokens_ptr,  # [N, K, D] embedded kept patches (bias included)
    ids_keep_ptr,  # [N, K] int64
    cls_ptr,  # [D] (read only with CLS)
    pos_ptr,  # [CLS+L, D]
    K,
    L,
    D,
    CLS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(N, cdiv(CLS+K, BLOCK_T), cdiv(D, BLOCK_D))``: one tile of output rows per
    program; CLS is 1 with a cls row first, else 0. A patch id outside ``[0, L)`` adds no
    position (its row is the token alone)."""
    image, row, row_valid, col, col_valid, tile = row_tile(K + CLS, D, BLOCK_T, BLOCK_D)
    is_patch = row_valid & (row >= CLS)
    patch = tl.load(ids_keep_ptr + image * K + row - CLS, mask=is_patch, other=-CLS)
    patch = patch.to(tl.int64)
    has_position = (row < CLS) | (is_patch & (patch >= 0) & (patch < L))
    store_rows_plus_positions(
        out_ptr,
        tokens_ptr,
        cls_ptr,
        pos_ptr,
        out_rows=image * (K + CLS) + row,
        source_rows=image * K + row - CLS,
        reads_source=is_patch,
        uses_fill=row < CLS,
        pos_rows=patch + CLS,
        has_position=has_position,
        col=col,
        col_valid=col_valid,
        tile=tile,
        D=D,
    )


def _add_positions_triton(out, tokens, ids_keep, cls_token, pos_embed):
    n, keep, width = tokens.shape
    cls = int(cls_token is not None)
    launch_row_tiles(
        _add_positions_kernel,
        n,
        keep + cls,
        width,
        out,
        tokens.contiguous(),
        ids_keep.contiguous(),
        pos_embed if cls_token is None else cls_token.contiguous(),  # any pointer without cls
        pos_embed.contiguous(),
        keep,
        pos_embed.shape[0] - cls,
        width,
        CLS=cls,
    )


def _add_positions_torch(out, tokens, ids_keep, cls_token, pos_embed):
    cls = int(cls_token is not None)
    safe_ids, in_range = ids_in_range(ids_keep, pos_embed.shape[0] - cls)
    if cls_token is not None:
        out[:, 0] = cls_token + pos_embed[0]
    out[:, cls:] = tokens + torch.where(in_range[..., None], pos_embed[cls:][safe_ids], 0)


def _add_positions_shape_dtype(tokens, cls_token, pos_embed):
    n, keep, width = tokens.shape
    rows = keep + int(cls_token is not None)
    extra = () if cls_token is None else (cls_token,)
    return (n, rows, width), promoted_dtype(tokens, *extra, pos_embed)


@torch.library.custom_op("fastmae::add_positions", mutates_args=())
def add_positions_op(
    tokens: Tensor,
    ids_keep: Tensor,
    cls_token: Optional[Tensor],
    pos_embed: Tensor,
    use_triton: bool,
) -> Tensor:
    """tokens ``[N, K, D]``, ids_keep ``[N, K]`` int64, cls_token ``[D]`` or None, pos_embed
    ``[S+L, D]`` (S = 1 with a cls token) -> ``[N, S+K, D]`` in the promotion of the dtypes."""
    shape, dtype = _add_positions_shape_dtype(tokens, cls_token, pos_embed)
    out = torch.empty(shape, dtype=dtype, device=tokens.device)
    path = _add_positions_triton if use_triton else _add_positions_torch
    path(out, tokens, ids_keep, cls_token, pos_embed)
    return out


@add_positions_op.register_fake
def _(tokens, ids_keep, cls_token, pos_embed, use_triton):
    shape, dtype = _add_positions_shape_dtype(tokens, cls_token, pos_embed)
    return tokens.new_empty(shape, dtype=dtype)


@fused_op("fastmae::add_positions", kernels=[_add_positions_kernel])
def _add_positions_bytes(tokens, ids_keep, cls_token, pos_embed, use_triton, outputs):
    gathered_positions = tokens.numel() * pos_embed.element_size()
    return nbytes(tokens) + nbytes(ids_keep) + gathered_positions + nbytes(outputs)


def _setup_add_positions(ctx, inputs, output):
    tokens, ids_keep, cls_token, pos_embed, _ = inputs
    ctx.save_for_backward(ids_keep)
    ctx.cls = int(cls_token is not None)
    ctx.dtypes = (tokens.dtype, None if cls_token is None else cls_token.dtype, pos_embed.dtype)
    ctx.pos_rows = pos_embed.shape[0]


def _backward_add_positions(ctx, grad_out):
    (ids_keep,) = ctx.saved_tensors
    tokens_dtype, cls_dtype, pos_dtype = ctx.dtypes
    needs, cls = ctx.needs_input_grad, ctx.cls
    grad_tokens = grad_out[:, cls:].to(tokens_dtype) if needs[0] else None
    grad_cls = grad_out[:, 0].sum(0).to(cls_dtype) if cls and needs[2] else None
    grad_pos = None
    if needs[3]:
        # Frozen in the image MAE, trained in the video MAE.
        patches = sum_rows_by_ids(grad_out[:, cls:], ids_keep, ctx.pos_rows - cls)
        grad_pos = torch.cat([grad_out[:, :cls].sum(0), patches]).to(pos_dtype)
    return grad_tokens, None, grad_cls, grad_pos, None


add_positions_op.register_autograd(_backward_add_positions, setup_context=_setup_add_positions)


def embed_visible_patches(imgs, ids_keep, weight, bias, cls_token, pos_embed, use_triton: bool):
    """imgs ``[N, C, H, W]`` or ``[N, C, F, H, W]``, ids_keep ``[N, K]`` int64 -> encoder input
    ``[N, S+K, D]`` (S = 1 with a cls token first).

    weight ``[D, C, ph, pw]`` (``[D, C, u, ph, pw]`` for videos) and bias ``[D]`` are the
    patch-embed conv's; cls_token ``[1, 1, D]`` or None; pos_embed ``[1, S+L, D]``. The GEMM
    runs in the autocast dtype under autocast, as the official conv does; the output dtype is
    the promotion of the GEMM's and the embeddings'. Autograd flows through the gather (into
    imgs, if it requires grad), the GEMM (weight and bias) and the position add (cls_token,
    and pos_embed if it is trainable).
    """
    n, keep = ids_keep.shape
    width = weight.shape[0]
    patch_size = list(weight.shape[2:])
    pixels = gather_patches_op(imgs, ids_keep, patch_size, False, use_triton)
    tokens = torch.addmm(
        bias, pixels.view(n * keep, pixels.shape[-1]), weight.reshape(width, -1).t()
    )
    cls_token = None if cls_token is None else cls_token.reshape(width)
    return add_positions_op(
        tokens.view(n, keep, width), ids_keep, cls_token, pos_embed.reshape(-1, width), use_triton
    )
