"""Encoder input from the kept patches only: gather, GEMM, position embedding, cls token.

    x[n, 0]   = cls_token + pos_embed[0]
    x[n, 1+t] = patch(imgs[n], ids_keep[n, t]) @ weight.T + bias + pos_embed[1 + ids_keep[n, t]]

The official code embeds all L patches with a convolution and then throws 75% away; here the
GEMM runs on K of L patches, fed by the patch gather kernel in the conv weight's (c, i, j) order.
The backward recomputes that gather rather than keep a copy of the kept pixels alive.
"""

from __future__ import annotations

import torch

from ._triton import block_size, launch, tl, triton
from .patchify import gather_patches, scatter_patches


@triton.jit
def _add_positions_kernel(
    out_ptr,  # [N, 1+K, D] out
    tokens_ptr,  # [N, K, D] embedded kept patches (bias included)
    ids_keep_ptr,  # [N, K] int64
    cls_ptr,  # [D]
    pos_ptr,  # [1+L, D]
    K,
    D,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(N, cdiv(1+K, BLOCK_T), cdiv(D, BLOCK_D))``: one tile of output rows per program."""
    image = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_valid = row < K + 1
    col_valid = col < D
    is_patch = row_valid & (row > 0)
    patch = tl.load(ids_keep_ptr + image * K + row - 1, mask=is_patch, other=-1).to(tl.int64)
    tile = row_valid[:, None] & col_valid[None, :]

    token_rows = image * K + row - 1
    tokens = tl.load(
        tokens_ptr + token_rows[:, None] * D + col[None, :],
        mask=is_patch[:, None] & col_valid[None, :],
        other=0.0,
    ).to(tl.float32)
    cls = tl.load(cls_ptr + col, mask=col_valid, other=0.0).to(tl.float32)
    values = tl.where(is_patch[:, None], tokens, cls[None, :])
    positions = tl.load(pos_ptr + (patch + 1)[:, None] * D + col[None, :], mask=tile, other=0.0)
    values = values + positions.to(tl.float32)
    out_rows = image * (K + 1) + row
    tl.store(
        out_ptr + out_rows[:, None] * D + col[None, :],
        values.to(out_ptr.dtype.element_ty),
        mask=tile,
    )


def _add_positions(tokens, ids_keep, cls_token, pos_embed, out_dtype, use_triton):
    n, keep, width = tokens.shape
    if not use_triton:
        out = torch.empty(n, keep + 1, width, dtype=out_dtype, device=tokens.device)
        out[:, 0] = cls_token + pos_embed[0]
        out[:, 1:] = tokens + pos_embed[1:][ids_keep]
        return out
    out = torch.empty(n, keep + 1, width, dtype=out_dtype, device=tokens.device)
    block_t, block_d = 16, block_size(width, 128)
    grid = (n, triton.cdiv(keep + 1, block_t), triton.cdiv(width, block_d))
    launch(
        _add_positions_kernel,
        grid,
        out,
        tokens.contiguous(),
        ids_keep,
        cls_token,
        pos_embed,
        keep,
        width,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


def _kept_pixels(imgs, ids_keep, patch_size, use_triton):
    return gather_patches(imgs, ids_keep, patch_size, False, use_triton)


class EmbedVisiblePatchesFunction(torch.autograd.Function):
    """imgs ``[N, C, H, W]``, ids_keep ``[N, K]`` -> encoder input ``[N, 1+K, D]``.

    weight ``[D, C, ph, pw]`` and bias ``[D]`` are the patch-embed conv's; cls_token
    ``[1, 1, D]``; pos_embed ``[1, 1+L, D]``. The output dtype is the promotion of the GEMM's
    (the autocast dtype under autocast) and the embeddings', as in the official code.
    """

    @staticmethod
    def forward(ctx, imgs, ids_keep, weight, bias, cls_token, pos_embed, use_triton):
        n, keep = ids_keep.shape
        width = weight.shape[0]
        patch_size = tuple(weight.shape[2:])
        ids_keep = ids_keep.contiguous()
        pixels = _kept_pixels(imgs, ids_keep, patch_size, use_triton)
        weight_2d = weight.reshape(width, -1)
        tokens = torch.addmm(bias, pixels.view(n * keep, -1), weight_2d.t()).view(n, keep, width)
        out_dtype = torch.promote_types(
            tokens.dtype, torch.promote_types(cls_token.dtype, pos_embed.dtype)
        )
        cls = cls_token.reshape(width).contiguous()
        pos = pos_embed.reshape(-1, width).contiguous()
        out = _add_positions(tokens, ids_keep, cls, pos, out_dtype, use_triton)
        ctx.save_for_backward(imgs, ids_keep, weight)
        ctx.use_triton = use_triton
        ctx.pos_shape = pos_embed.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        imgs, ids_keep, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        n, keep = ids_keep.shape
        width = weight.shape[0]
        patch_size = tuple(weight.shape[2:])
        grad_tokens = grad_out[:, 1:].reshape(n * keep, width)
        grad_imgs = grad_weight = grad_bias = grad_cls = grad_pos = None
        if needs[2]:
            pixels = _kept_pixels(imgs, ids_keep, patch_size, ctx.use_triton)
            grad_weight = grad_tokens.t().mm(pixels.view(n * keep, -1).to(grad_tokens.dtype))
            grad_weight = grad_weight.view(weight.shape).to(weight.dtype)
        if needs[3]:
            grad_bias = grad_tokens.sum(0).to(weight.dtype)
        if needs[4]:
            grad_cls = grad_out[:, 0].sum(0).view(1, 1, width)
        if needs[0]:
            grad_pixels = grad_tokens.mm(weight.reshape(width, -1).to(grad_tokens.dtype))
            grad_imgs = scatter_patches(
                grad_pixels.view(n, keep, -1).to(imgs.dtype),
                ids_keep,
                patch_size,
                imgs.shape,
                False,
                ctx.use_triton,
            )
        if needs[5]:
            # Rare (the official position embedding is frozen): each image keeps a patch at most
            # once, so a per-image scatter followed by a sum is exact and deterministic.
            length = ctx.pos_shape[1] - 1
            per_image = grad_out.new_zeros(n, length, width)
            per_image.scatter_(1, ids_keep[..., None].expand(-1, -1, width), grad_out[:, 1:])
            grad_pos = torch.cat([grad_out[:, :1].sum(0), per_image.sum(0)]).view(ctx.pos_shape)
        return grad_imgs, None, grad_weight, grad_bias, grad_cls, grad_pos, None
