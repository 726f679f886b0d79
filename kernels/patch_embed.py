"""Encoder input from the kept patches only: gather, GEMM, position embedding, cls token.

    x[n, 0]   = cls_token + pos_embed[0]
    x[n, 1+t] = patch(imgs[n], ids_keep[n, t]) @ weight.T + bias + pos_embed[1 + ids_keep[n, t]]

The official code embeds all L patches with a convolution and then throws 75% away; here the
GEMM runs on K of L patches, fed by the patch gather kernel in the conv weight's (c, i, j) order.
Each step is an op with its own backward, so autograd and torch.compile see the composition.
"""

import torch
from torch import Tensor

from ._jit import row_tile, store_rows_plus_positions
from ._triton import fused_op, ids_in_range, launch_row_tiles, nbytes, promoted_dtype, tl, triton
from .patchify import gather_patches_op


@triton.jit
def _add_positions_kernel(
    out_ptr,  # [N, 1+K, D] out
    tokens_ptr,  # [N, K, D] embedded kept patches (bias included)
    ids_keep_ptr,  # [N, K] int64
    cls_ptr,  # [D]
    pos_ptr,  # [1+L, D]
    K,
    L,
    D,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(N, cdiv(1+K, BLOCK_T), cdiv(D, BLOCK_D))``: one tile of output rows per program.
    A patch id outside ``[0, L)`` adds no position (its row is the token alone)."""
    image, row, row_valid, col, col_valid, tile = row_tile(K + 1, D, BLOCK_T, BLOCK_D)
    is_patch = row_valid & (row > 0)
    patch = tl.load(ids_keep_ptr + image * K + row - 1, mask=is_patch, other=-1).to(tl.int64)
    has_position = (row == 0) | (is_patch & (patch >= 0) & (patch < L))
    store_rows_plus_positions(
        out_ptr,
        tokens_ptr,
        cls_ptr,
        pos_ptr,
        out_rows=image * (K + 1) + row,
        source_rows=image * K + row - 1,
        reads_source=is_patch,
        uses_fill=row == 0,
        pos_rows=patch + 1,
        has_position=has_position,
        col=col,
        col_valid=col_valid,
        tile=tile,
        D=D,
    )


def _add_positions_triton(out, tokens, ids_keep, cls_token, pos_embed):
    n, keep, width = tokens.shape
    launch_row_tiles(
        _add_positions_kernel,
        n,
        keep + 1,
        width,
        out,
        tokens.contiguous(),
        ids_keep.contiguous(),
        cls_token.contiguous(),
        pos_embed.contiguous(),
        keep,
        pos_embed.shape[0] - 1,
        width,
    )


def _add_positions_torch(out, tokens, ids_keep, cls_token, pos_embed):
    safe_ids, in_range = ids_in_range(ids_keep, pos_embed.shape[0] - 1)
    out[:, 0] = cls_token + pos_embed[0]
    out[:, 1:] = tokens + torch.where(in_range[..., None], pos_embed[1:][safe_ids], 0)


@torch.library.custom_op("fastmae::add_positions", mutates_args=())
def add_positions_op(
    tokens: Tensor, ids_keep: Tensor, cls_token: Tensor, pos_embed: Tensor, use_triton: bool
) -> Tensor:
    """tokens ``[N, K, D]``, ids_keep ``[N, K]`` int64, cls_token ``[D]``, pos_embed
    ``[1+L, D]`` -> ``[N, 1+K, D]`` in the promotion of the three dtypes."""
    n, keep, width = tokens.shape
    out_dtype = promoted_dtype(tokens, cls_token, pos_embed)
    out = torch.empty(n, keep + 1, width, dtype=out_dtype, device=tokens.device)
    path = _add_positions_triton if use_triton else _add_positions_torch
    path(out, tokens, ids_keep, cls_token, pos_embed)
    return out


@add_positions_op.register_fake
def _(tokens, ids_keep, cls_token, pos_embed, use_triton):
    n, keep, width = tokens.shape
    return tokens.new_empty(n, keep + 1, width, dtype=promoted_dtype(tokens, cls_token, pos_embed))


@fused_op("fastmae::add_positions", kernels=[_add_positions_kernel])
def _add_positions_bytes(tokens, ids_keep, cls_token, pos_embed, use_triton, outputs):
    gathered_positions = tokens.numel() * pos_embed.element_size()
    return nbytes(tokens) + nbytes(ids_keep) + gathered_positions + nbytes(outputs)


def _setup_add_positions(ctx, inputs, output):
    tokens, ids_keep, cls_token, pos_embed, _ = inputs
    ctx.save_for_backward(ids_keep)
    ctx.dtypes = (tokens.dtype, cls_token.dtype, pos_embed.dtype)
    ctx.pos_rows = pos_embed.shape[0]


def _backward_add_positions(ctx, grad_out):
    (ids_keep,) = ctx.saved_tensors
    tokens_dtype, cls_dtype, pos_dtype = ctx.dtypes
    needs = ctx.needs_input_grad
    grad_tokens = grad_out[:, 1:].to(tokens_dtype) if needs[0] else None
    grad_cls = grad_out[:, 0].sum(0).to(cls_dtype) if needs[2] else None
    grad_pos = None
    if needs[3]:
        # Rare (the official position embedding is frozen): each image keeps a patch at most
        # once, so a per-image scatter followed by a sum is exact and deterministic. Ids out
        # of range (possible only unchecked) add zeros to row 0 instead of indexing outside.
        n, _, width = grad_out.shape
        safe_ids, in_range = ids_in_range(ids_keep, ctx.pos_rows - 1)
        index = safe_ids[..., None].expand(-1, -1, width)
        per_image = grad_out.new_zeros(n, ctx.pos_rows - 1, width)
        per_image.scatter_add_(1, index, torch.where(in_range[..., None], grad_out[:, 1:], 0))
        grad_pos = torch.cat([grad_out[:, 0].sum(0, keepdim=True), per_image.sum(0)]).to(pos_dtype)
    return grad_tokens, None, grad_cls, grad_pos, None


add_positions_op.register_autograd(_backward_add_positions, setup_context=_setup_add_positions)


def embed_visible_patches(imgs, ids_keep, weight, bias, cls_token, pos_embed, use_triton: bool):
    """imgs ``[N, C, H, W]``, ids_keep ``[N, K]`` int64 -> encoder input ``[N, 1+K, D]``.

    weight ``[D, C, ph, pw]`` and bias ``[D]`` are the patch-embed conv's; cls_token
    ``[1, 1, D]``; pos_embed ``[1, 1+L, D]``. The GEMM runs in the autocast dtype under autocast,
    as the official conv does; the output dtype is the promotion of the GEMM's and the
    embeddings'. Autograd flows through the gather (into imgs, if it requires grad), the GEMM
    (weight and bias) and the position add (cls_token, and pos_embed if it is trainable).
    """
    n, keep = ids_keep.shape
    width = weight.shape[0]
    patch_size = list(weight.shape[2:])
    pixels = gather_patches_op(imgs, ids_keep, patch_size, False, use_triton)
    tokens = torch.addmm(
        bias, pixels.view(n * keep, pixels.shape[-1]), weight.reshape(width, -1).t()
    )
    return add_positions_op(
        tokens.view(n, keep, width),
        ids_keep,
        cls_token.reshape(width),
        pos_embed.reshape(-1, width),
        use_triton,
    )
