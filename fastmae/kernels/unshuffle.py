"""Decoder input in one pass: every position gets its kept token or the mask token, plus pos.

    out[n, 0]   = x[n, 0] + pos[0]                                   (a cls token, if any)
    out[n, S+l] = (x[n, S+r] if r < K else mask_token) + pos[S+l],   r = ids_restore[n, l]

with S = 1 where x and the output start with a cls row (the image MAE), 0 where they do not
(the video MAE without ``cls_embed``). In shuffled order (Hugging Face VideoMAE's decoder input,
which keeps the visible tokens first and the masked ones after, and moves the positions
instead of the tokens) the rows stay where they are and ``ids`` are ``ids_shuffle``:

    out[n, S+r] = (x[n, S+r] if r < K else mask_token) + pos[S+ids[n, r]]

where ``ids`` may be the first R of a sample's L ids (decoder masking: the decoder sees the K
visible tokens and the R - K removed ones of lowest noise), so positions range over the table's
L rows, not over the R output rows.

The official code concatenates mask tokens, gathers with a repeated int64 index and adds the
position embedding in three passes. The backward is the same map read the other way: the
kept rows' gradients go back to ``x`` (a permutation, so no two writes collide) and the mask
rows' gradients are summed per program into partial sums, then reduced by a ``.sum`` - no
atomics, so two runs give bit-identical ``mask_token`` gradients.
"""

import torch
from torch import Tensor

from ._jit import row_tile, store_rows_plus_positions
from ._triton import (
    accumulation_dtype,
    fused_op,
    ids_in_range,
    launch_row_tiles,
    nbytes,
    promoted_dtype,
    row_tile_grid,
    sum_rows_by_ids,
    tl,
    triton,
)


@triton.jit
def _source_rows(ids_ptr, image, row, row_valid, L, K, CLS: tl.constexpr, SHUFFLED: tl.constexpr):
    """For output rows ``row`` (0..CLS+L-1) of one sample: the row of x each reads, whether it
    reads one (the cls row and kept patches), and whether it is a mask-token row instead. A
    rank outside ``[0, L)`` (possible only unchecked) reads neither: its row is the position
    alone. In SHUFFLED order a row's rank is its own index."""
    is_patch = row_valid & (row >= CLS)
    if SHUFFLED:
        rank = row - CLS
    else:
        rank = tl.load(ids_ptr + image * L + row - CLS, mask=is_patch, other=0)
    reads_x = (row < CLS) | (is_patch & (rank >= 0) & (rank < K))
    is_masked = is_patch & (rank >= K) & (rank < L)
    source = tl.where(is_patch & reads_x, rank + CLS, 0)
    return image * (K + CLS) + source, reads_x, is_masked


@triton.jit
def _unshuffle_fwd_kernel(
    out_ptr,  # [N, CLS+L, D] out
    x_ptr,  # [N, CLS+K, D]
    ids_ptr,  # [N, L] int64: ids_restore, or ids_shuffle when SHUFFLED
    mask_token_ptr,  # [D]
    pos_ptr,  # [CLS+num_positions, D]: num_positions = L, or (SHUFFLED) at least L
    L,
    K,
    D,
    num_positions,
    CLS: tl.constexpr,
    SHUFFLED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(N, cdiv(CLS+L, BLOCK_T), cdiv(D, BLOCK_D))``."""
    image, row, row_valid, col, col_valid, tile = row_tile(L + CLS, D, BLOCK_T, BLOCK_D)
    x_rows, reads_x, is_masked = _source_rows(ids_ptr, image, row, row_valid, L, K, CLS, SHUFFLED)
    pos_rows, has_position = row, row_valid
    if SHUFFLED:  # the position of the patch this row holds; an id out of range adds none
        is_patch = row_valid & (row >= CLS)
        patch = tl.load(ids_ptr + image * L + row - CLS, mask=is_patch, other=0).to(tl.int64)
        has_position = (row_valid & (row < CLS)) | (
            is_patch & (patch >= 0) & (patch < num_positions)
        )
        pos_rows = tl.where(is_patch, patch + CLS, row)
    store_rows_plus_positions(
        out_ptr,
        x_ptr,
        mask_token_ptr,
        pos_ptr,
        out_rows=image * (L + CLS) + row,
        source_rows=x_rows,
        reads_source=reads_x,
        uses_fill=is_masked,
        pos_rows=pos_rows,
        has_position=has_position,
        col=col,
        col_valid=col_valid,
        tile=tile,
        D=D,
    )


@triton.jit
def _unshuffle_bwd_kernel(
    grad_x_ptr,  # [N, CLS+K, D] out
    mask_token_partial_ptr,  # [N, cdiv(CLS+L, BLOCK_T), D] fp32 out: per-program sums
    grad_out_ptr,  # [N, CLS+L, D]
    ids_ptr,  # [N, L] int64: ids_restore (not read when SHUFFLED)
    L,
    K,
    D,
    CLS: tl.constexpr,
    SHUFFLED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(N, cdiv(CLS+L, BLOCK_T), cdiv(D, BLOCK_D))``, the same tiles as the forward."""
    image, row, row_valid, col, col_valid, tile = row_tile(L + CLS, D, BLOCK_T, BLOCK_D)
    x_rows, reads_x, is_masked = _source_rows(ids_ptr, image, row, row_valid, L, K, CLS, SHUFFLED)
    out_rows = image * (L + CLS) + row
    grad = tl.load(grad_out_ptr + out_rows[:, None] * D + col[None, :], mask=tile, other=0.0)
    tl.store(
        grad_x_ptr + x_rows[:, None] * D + col[None, :],
        grad.to(grad_x_ptr.dtype.element_ty),
        mask=tile & reads_x[:, None],
    )
    masked_sum = tl.sum(tl.where(is_masked[:, None], grad.to(tl.float32), 0.0), axis=0)
    partial_row = image * tl.num_programs(1) + tl.program_id(1)
    tl.store(mask_token_partial_ptr + partial_row * D + col, masked_sum, mask=col_valid)


def _unshuffle_triton(out, x, ids, mask_token, pos_embed, cls: int, shuffled: bool):
    n, rows, width = out.shape
    launch_row_tiles(
        _unshuffle_fwd_kernel,
        n,
        rows,
        width,
        out,
        x.contiguous(),
        ids.contiguous(),
        mask_token.contiguous(),
        pos_embed.contiguous(),
        rows - cls,
        x.shape[1] - cls,
        width,
        pos_embed.shape[0] - cls,
        CLS=cls,
        SHUFFLED=shuffled,
    )


def _unshuffle_backward_triton(grad_x, grad_out, ids, cls: int, shuffled: bool):
    """Writes grad_x; returns mask_token's gradient ``[D]`` in fp32."""
    n, rows, width = grad_out.shape
    grid = row_tile_grid(n, rows, width)
    partial = grad_out.new_empty(n, grid[1], width, dtype=torch.float32)
    launch_row_tiles(
        _unshuffle_bwd_kernel,
        n,
        rows,
        width,
        grad_x,
        partial,
        grad_out,
        ids,
        rows - cls,
        grad_x.shape[1] - cls,
        width,
        CLS=cls,
        SHUFFLED=shuffled,
    )
    return partial.sum((0, 1))


def _unshuffle_torch(out, x, ids, mask_token, pos_embed, cls: int, shuffled: bool):
    if shuffled:
        _shuffled_torch(out, x, ids, mask_token, pos_embed, cls)
        return
    ids_restore = ids
    # As the kernel: rank < K reads x, K <= rank < L the mask token, anything else zeros.
    n, length = ids_restore.shape
    keep = x.shape[1] - cls
    source = torch.cat([torch.zeros_like(ids_restore[:, :cls]), ids_restore + cls], dim=1)
    cls_row = torch.arange(cls + length, device=x.device) < cls
    reads_x = (cls_row | ((source >= cls) & (source < keep + cls)))[..., None]
    is_masked = (~cls_row & (source >= keep + cls) & (source < length + cls))[..., None]
    rows = torch.arange(n, device=x.device)[:, None]
    if x.shape[1]:
        tokens = x[rows, torch.where(reads_x[..., 0], source, 0)].to(out.dtype)
    else:  # no cls row and nothing kept: no row of x to read
        tokens = out.new_zeros(out.shape)
    tokens = torch.where(is_masked, mask_token.to(out.dtype), torch.where(reads_x, tokens, 0))
    torch.add(tokens, pos_embed, out=out)


def _shuffled_torch(out, x, ids_shuffle, mask_token, pos_embed, cls: int):
    """The shuffled order: x's rows, then mask tokens, each plus its patch's position."""
    n, length = ids_shuffle.shape
    keep = x.shape[1] - cls
    fill = mask_token.to(out.dtype).expand(n, length - keep, -1)
    tokens = torch.cat([x.to(out.dtype), fill], dim=1)
    safe_ids, in_range = ids_in_range(ids_shuffle, pos_embed.shape[0] - cls)
    positions = torch.where(in_range[..., None], pos_embed[cls:][safe_ids], 0)
    torch.add(tokens, torch.cat([pos_embed[:cls].expand(n, -1, -1), positions], 1), out=out)


def _unshuffle_backward_torch(grad_x, grad_out, ids, cls: int, shuffled: bool):
    """Writes grad_x; returns mask_token's gradient ``[D]`` in the accumulation dtype."""
    n, rows, width = grad_out.shape
    keep = grad_x.shape[1] - cls
    if shuffled:  # rows stay in place: x's first, the mask tokens' after
        grad_x.copy_(grad_out[:, : cls + keep])
        return grad_out[:, cls + keep :].to(accumulation_dtype(grad_out)).sum((0, 1))
    ids_restore = ids
    # Each kept position's gradient goes to its row of x; the others to a spare last row.
    is_kept = (ids_restore >= 0) & (ids_restore < keep)
    target_rows = torch.where(is_kept, ids_restore, keep)[..., None].expand(-1, -1, width)
    grad_kept = grad_out.new_zeros(n, keep + 1, width)
    grad_kept.scatter_(1, target_rows, grad_out[:, cls:])
    grad_x[:, :cls] = grad_out[:, :cls]
    grad_x[:, cls:] = grad_kept[:, :keep]
    is_masked = ((ids_restore >= keep) & (ids_restore < rows - cls))[..., None]
    grad_rows = grad_out[:, cls:].to(accumulation_dtype(grad_out))
    return torch.where(is_masked, grad_rows, 0.0).sum((0, 1))


@torch.library.custom_op("fastmae::unshuffle", mutates_args=())
def unshuffle_op(
    x: Tensor,
    ids: Tensor,
    mask_token: Tensor,
    pos_embed: Tensor,
    has_cls: bool,
    shuffled: bool,
    use_triton: bool,
) -> Tensor:
    """x ``[N, S+K, D]`` (S = 1 with ``has_cls``, its cls row first), ids ``[N, L]`` int64
    (``ids_restore``, or with ``shuffled`` ``ids_shuffle``, or its first R columns: see the
    module docstring), mask_token ``[D]``, pos_embed ``[S+L, D]`` (``[S+L', D]``, L' >= R, in
    shuffled order) -> ``[N, S+L, D]`` (``[N, S+R, D]``) in the promotion of the three dtypes
    (as the official ``cat`` and ``+`` give)."""
    out_dtype = promoted_dtype(x, mask_token, pos_embed)
    rows = ids.shape[1] + int(has_cls)
    out = torch.empty(x.shape[0], rows, x.shape[2], dtype=out_dtype, device=x.device)
    path = _unshuffle_triton if use_triton else _unshuffle_torch
    path(out, x, ids, mask_token, pos_embed, int(has_cls), shuffled)
    return out


@unshuffle_op.register_fake
def _(x, ids, mask_token, pos_embed, has_cls, shuffled, use_triton):
    out_dtype = promoted_dtype(x, mask_token, pos_embed)
    rows = ids.shape[1] + int(has_cls)
    return x.new_empty(x.shape[0], rows, x.shape[2], dtype=out_dtype)


@torch.library.custom_op("fastmae::unshuffle_backward", mutates_args=())
def unshuffle_backward_op(
    grad_out: Tensor,
    ids: Tensor,
    keep: int,
    x_dtype: torch.dtype,
    has_cls: bool,
    shuffled: bool,
    use_triton: bool,
) -> tuple[Tensor, Tensor]:
    """-> grad_x ``[N, S+K, D]`` in ``x_dtype``, and mask_token's gradient ``[D]`` (fp32, or
    fp64 for fp64 gradients)."""
    grad_out, ids = grad_out.contiguous(), ids.contiguous()
    n, _, width = grad_out.shape
    grad_x = grad_out.new_empty(n, keep + int(has_cls), width, dtype=x_dtype)
    path = _unshuffle_backward_triton if use_triton else _unshuffle_backward_torch
    return grad_x, path(grad_x, grad_out, ids, int(has_cls), shuffled)


@unshuffle_backward_op.register_fake
def _(grad_out, ids, keep, x_dtype, has_cls, shuffled, use_triton):
    n, _, width = grad_out.shape
    return (
        grad_out.new_empty(n, keep + int(has_cls), width, dtype=x_dtype),
        grad_out.new_empty(width, dtype=torch.float32),
    )


@fused_op("fastmae::unshuffle", kernels=[_unshuffle_fwd_kernel])
def _unshuffle_bytes(x, ids, mask_token, pos_embed, has_cls, shuffled, use_triton, outputs):
    # Kept rows and the ids read, every row written; mask_token and pos_embed stay in cache
    # (in shuffled order each row reads its patch's position row: the table once).
    return nbytes(x) + nbytes(ids) + nbytes(pos_embed) + nbytes(outputs)


@fused_op("fastmae::unshuffle_backward", kernels=[_unshuffle_bwd_kernel])
def _unshuffle_backward_bytes(grad_out, ids, keep, x_dtype, has_cls, shuffled, *_, outputs):
    ids_read = 0 if shuffled else nbytes(ids)
    return nbytes(grad_out) + ids_read + sum(nbytes(out) for out in outputs)


def _setup_unshuffle(ctx, inputs, output):
    x, ids, mask_token, pos_embed, ctx.has_cls, ctx.shuffled, ctx.use_triton = inputs
    ctx.save_for_backward(ids)
    ctx.keep = x.shape[1] - int(ctx.has_cls)
    ctx.dtypes = (x.dtype, mask_token.dtype, pos_embed.dtype)
    ctx.pos_rows = pos_embed.shape[0]


def _backward_unshuffle(ctx, grad_out):
    (ids,) = ctx.saved_tensors
    x_dtype, mask_token_dtype, pos_dtype = ctx.dtypes
    grad_x, grad_mask_token = unshuffle_backward_op(
        grad_out, ids, ctx.keep, x_dtype, ctx.has_cls, ctx.shuffled, ctx.use_triton
    )
    needs = ctx.needs_input_grad
    grad_mask_token = grad_mask_token.to(mask_token_dtype) if needs[2] else None
    grad_pos = None
    if needs[3] and ctx.shuffled:  # row r added position S + ids[r]
        cls = int(ctx.has_cls)
        grad_rows = grad_out[:, cls:]
        grad_pos = torch.cat(
            [grad_out[:, :cls].sum(0), sum_rows_by_ids(grad_rows, ids, ctx.pos_rows - cls)]
        )
        grad_pos = grad_pos.to(pos_dtype)
    elif needs[3]:
        grad_pos = grad_out.sum(0).to(pos_dtype)
    return grad_x, None, grad_mask_token, grad_pos, None, None, None


unshuffle_op.register_autograd(_backward_unshuffle, setup_context=_setup_unshuffle)
