"""Decoder input in one pass: every position gets its kept token or the mask token, plus pos.

    out[n, 0]   = x[n, 0] + pos[0]                                   (the cls token)
    out[n, 1+l] = (x[n, 1+r] if r < K else mask_token) + pos[1+l],   r = ids_restore[n, l]

The official code concatenates mask tokens, gathers with a repeated int64 index and adds the
position embedding in three passes. The backward is the same map read the other way: the
kept rows' gradients go back to ``x`` (a permutation, so no two writes collide) and the mask
rows' gradients are summed per program into partial sums, then reduced by a ``.sum`` - no
atomics, so two runs give bit-identical ``mask_token`` gradients.
"""

import torch

from ._triton import accumulation_dtype, block_size, kernel_bytes, launch, nbytes, tl, triton


@triton.jit
def _source_rows(ids_restore_ptr, image, row, row_valid, L, K):
    """For output rows ``row`` (0..L) of one image: the row of x each reads, whether it reads
    one (the cls row and kept patches), and whether it is a mask-token row instead. A rank
    outside ``[0, L)`` (possible only unchecked) reads neither: its row is the position alone."""
    is_patch = row_valid & (row > 0)
    rank = tl.load(ids_restore_ptr + image * L + row - 1, mask=is_patch, other=0)
    reads_x = (row == 0) | (is_patch & (rank >= 0) & (rank < K))
    is_masked = is_patch & (rank >= K) & (rank < L)
    source = tl.where(is_patch & reads_x, rank + 1, 0)
    return source, reads_x, is_masked


@triton.jit
def _unshuffle_fwd_kernel(
    out_ptr,  # [N, 1+L, D] out
    x_ptr,  # [N, 1+K, D]
    ids_restore_ptr,  # [N, L] int64
    mask_token_ptr,  # [D]
    pos_ptr,  # [1+L, D]
    L,
    K,
    D,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(N, cdiv(1+L, BLOCK_T), cdiv(D, BLOCK_D))``."""
    image = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_valid = row < L + 1
    col_valid = col < D
    tile = row_valid[:, None] & col_valid[None, :]
    source, reads_x, is_masked = _source_rows(ids_restore_ptr, image, row, row_valid, L, K)

    x_rows = image * (K + 1) + source
    tokens = tl.load(
        x_ptr + x_rows[:, None] * D + col[None, :], mask=tile & reads_x[:, None], other=0.0
    ).to(tl.float32)
    mask_token = tl.load(mask_token_ptr + col, mask=col_valid, other=0.0).to(tl.float32)
    values = tl.where(is_masked[:, None], mask_token[None, :], tokens)
    positions = tl.load(pos_ptr + row[:, None] * D + col[None, :], mask=tile, other=0.0)
    values = values + positions.to(tl.float32)
    out_rows = image * (L + 1) + row
    tl.store(
        out_ptr + out_rows[:, None] * D + col[None, :],
        values.to(out_ptr.dtype.element_ty),
        mask=tile,
    )


@triton.jit
def _unshuffle_bwd_kernel(
    grad_x_ptr,  # [N, 1+K, D] out
    mask_token_partial_ptr,  # [N, cdiv(1+L, BLOCK_T), D] fp32 out: per-program sums
    grad_out_ptr,  # [N, 1+L, D]
    ids_restore_ptr,  # [N, L] int64
    L,
    K,
    D,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(N, cdiv(1+L, BLOCK_T), cdiv(D, BLOCK_D))``, the same tiles as the forward."""
    image = tl.program_id(0).to(tl.int64)
    row_block = tl.program_id(1)
    row = row_block * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_valid = row < L + 1
    col_valid = col < D
    tile = row_valid[:, None] & col_valid[None, :]
    source, reads_x, is_masked = _source_rows(ids_restore_ptr, image, row, row_valid, L, K)

    out_rows = image * (L + 1) + row
    grad = tl.load(grad_out_ptr + out_rows[:, None] * D + col[None, :], mask=tile, other=0.0)
    x_rows = image * (K + 1) + source
    tl.store(
        grad_x_ptr + x_rows[:, None] * D + col[None, :],
        grad.to(grad_x_ptr.dtype.element_ty),
        mask=tile & reads_x[:, None],
    )
    masked_sum = tl.sum(tl.where(is_masked[:, None], grad.to(tl.float32), 0.0), axis=0)
    partial_row = image * tl.num_programs(1) + row_block
    tl.store(mask_token_partial_ptr + partial_row * D + col, masked_sum, mask=col_valid)


_BLOCK_T = 16


def _tiles(n, length, width):
    block_d = block_size(width, 128)
    return block_d, (n, triton.cdiv(length + 1, _BLOCK_T), triton.cdiv(width, block_d))


def _unshuffle_forward(x, ids_restore, mask_token, pos_embed, use_triton):
    n, keep_plus_one, width = x.shape
    length, keep = ids_restore.shape[1], keep_plus_one - 1
    out_dtype = torch.promote_types(x.dtype, torch.promote_types(mask_token.dtype, pos_embed.dtype))
    if not use_triton:
        # As the kernel: rank < K reads x, K <= rank < L the mask token, anything else zeros.
        source = torch.cat([torch.zeros_like(ids_restore[:, :1]), ids_restore + 1], dim=1)
        cls_row = torch.arange(length + 1, device=x.device) == 0
        reads_x = (cls_row | ((source > 0) & (source <= keep)))[..., None]
        is_masked = ((source > keep) & (source <= length))[..., None]
        rows = torch.arange(n, device=x.device)[:, None]
        tokens = x[rows, torch.where(reads_x[..., 0], source, 0)].to(out_dtype)
        tokens = torch.where(is_masked, mask_token.to(out_dtype), torch.where(reads_x, tokens, 0))
        return tokens + pos_embed
    out = torch.empty(n, length + 1, width, dtype=out_dtype, device=x.device)
    block_d, grid = _tiles(n, length, width)
    launch(
        _unshuffle_fwd_kernel,
        grid,
        out,
        x.contiguous(),
        ids_restore.contiguous(),
        mask_token.contiguous(),
        pos_embed.contiguous(),
        length,
        keep,
        width,
        BLOCK_T=_BLOCK_T,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


def _unshuffle_backward(grad_out, ids_restore, keep, x_dtype, use_triton):
    """-> grad_x ``[N, 1+K, D]`` in x's dtype, and mask_token's gradient ``[D]`` in fp32."""
    grad_out, ids_restore = grad_out.contiguous(), ids_restore.contiguous()
    n, length_plus_one, width = grad_out.shape
    length = length_plus_one - 1
    if not use_triton:
        # Each kept position's gradient goes to its row of x; the others to a spare last row.
        is_kept = (ids_restore >= 0) & (ids_restore < keep)
        target_rows = torch.where(is_kept, ids_restore, keep)[..., None].expand(-1, -1, width)
        grad_kept = grad_out.new_zeros(n, keep + 1, width)
        grad_kept.scatter_(1, target_rows, grad_out[:, 1:])
        grad_x = torch.cat([grad_out[:, :1], grad_kept[:, :keep]], dim=1)
        is_masked = ((ids_restore >= keep) & (ids_restore < length))[..., None]
        grad_rows = grad_out[:, 1:].to(accumulation_dtype(grad_out))
        grad_mask_token = torch.where(is_masked, grad_rows, 0.0).sum((0, 1))
        return grad_x.to(x_dtype), grad_mask_token
    grad_x = grad_out.new_empty(n, keep + 1, width, dtype=x_dtype)
    block_d, grid = _tiles(n, length, width)
    partial = grad_out.new_empty(n, grid[1], width, dtype=torch.float32)
    launch(
        _unshuffle_bwd_kernel,
        grid,
        grad_x,
        partial,
        grad_out,
        ids_restore,
        length,
        keep,
        width,
        BLOCK_T=_BLOCK_T,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return grad_x, partial.sum((0, 1))


@torch.library.custom_op("fastmae::unshuffle", mutates_args=())
def unshuffle_op(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor,
    use_triton: bool,
) -> torch.Tensor:
    """x ``[N, 1+K, D]``, ids_restore ``[N, L]`` int64, mask_token ``[D]``, pos_embed
    ``[1+L, D]`` -> ``[N, 1+L, D]`` in the promotion of the three dtypes (as the official
    ``cat`` and ``+`` give)."""
    return _unshuffle_forward(x, ids_restore, mask_token, pos_embed, use_triton)


@unshuffle_op.register_fake
def _(x, ids_restore, mask_token, pos_embed, use_triton):
    out_dtype = torch.promote_types(x.dtype, torch.promote_types(mask_token.dtype, pos_embed.dtype))
    return x.new_empty(x.shape[0], ids_restore.shape[1] + 1, x.shape[2], dtype=out_dtype)


@torch.library.custom_op("fastmae::unshuffle_backward", mutates_args=())
def unshuffle_backward_op(
    grad_out: torch.Tensor,
    ids_restore: torch.Tensor,
    keep: int,
    x_dtype: torch.dtype,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _unshuffle_backward(grad_out, ids_restore, keep, x_dtype, use_triton)


@unshuffle_backward_op.register_fake
def _(grad_out, ids_restore, keep, x_dtype, use_triton):
    n, _, width = grad_out.shape
    return (
        grad_out.new_empty(n, keep + 1, width, dtype=x_dtype),
        grad_out.new_empty(width, dtype=torch.float32),
    )


@kernel_bytes("fastmae::unshuffle")
def _unshuffle_bytes(x, ids_restore, mask_token, pos_embed, use_triton, outputs):
    # Kept rows and the ids read, every row written; mask_token and pos_embed stay in cache.
    return nbytes(x) + nbytes(ids_restore) + nbytes(pos_embed) + nbytes(outputs)


@kernel_bytes("fastmae::unshuffle_backward")
def _unshuffle_backward_bytes(grad_out, ids_restore, keep, x_dtype, use_triton, outputs):
    return nbytes(grad_out) + nbytes(ids_restore) + sum(nbytes(out) for out in outputs)


def _setup_unshuffle(ctx, inputs, output):
    x, ids_restore, mask_token, pos_embed, ctx.use_triton = inputs
    ctx.save_for_backward(ids_restore)
    ctx.keep = x.shape[1] - 1
    ctx.dtypes = (x.dtype, mask_token.dtype, pos_embed.dtype)


def _backward_unshuffle(ctx, grad_out):
    (ids_restore,) = ctx.saved_tensors
    x_dtype, mask_token_dtype, pos_dtype = ctx.dtypes
    grad_x, grad_mask_token = unshuffle_backward_op(
        grad_out, ids_restore, ctx.keep, x_dtype, ctx.use_triton
    )
    needs = ctx.needs_input_grad
    grad_mask_token = grad_mask_token.to(mask_token_dtype) if needs[2] else None
    grad_pos = grad_out.sum(0).to(pos_dtype) if needs[3] else None
    return grad_x, None, grad_mask_token, grad_pos, None


unshuffle_op.register_autograd(_backward_unshuffle, setup_context=_setup_unshuffle)
