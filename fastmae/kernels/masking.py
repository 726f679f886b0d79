"""Random masking without the double argsort: one pass ranks each patch's noise in its row.

``rank[l]`` = number of patches whose noise sorts before patch ``l`` (ties broken by index, NaN
last, as a stable ``torch.sort``). The rank is ``ids_restore``; the patches of rank below
``len_keep`` are kept, and are scattered to ``ids_keep[rank]``. For distinct noise values the
result equals the official ``argsort(argsort(noise))``.

The op is not differentiable (its outputs are indices and a 0/1 mask), so it has no backward.
"""

import torch
from torch import Tensor

from ._triton import block_size, fused_op, launch, nbytes, tl, triton


@triton.jit
def _masking_kernel(
    ids_keep_ptr,  # [N, K] int64, out: kept patch indices in ascending-noise order
    ids_restore_ptr,  # [N, L] int64, out: rank of each patch's noise in its row
    mask_ptr,  # [N, L] float, out: 0 kept, 1 removed
    noise_ptr,  # [N, L] float
    L,
    K,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid ``(N, cdiv(L, BLOCK_Q))``: each program ranks BLOCK_Q patches of one row."""
    row = tl.program_id(0).to(tl.int64)
    query = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    query_valid = query < L
    noise_row = noise_ptr + row * L
    # fp32 comparisons for every noise dtype: exact for bf16/fp16, and Triton 3.0/3.1 cannot
    # compare bf16 values.
    query_noise = tl.load(noise_row + query, mask=query_valid, other=0.0).to(tl.float32)
    query_nan = query_noise != query_noise

    rank = tl.zeros([BLOCK_Q], dtype=tl.int32)
    for start in range(0, L, BLOCK_K):
        other = start + tl.arange(0, BLOCK_K)
        other_valid = other < L
        other_noise = tl.load(noise_row + other, mask=other_valid, other=0.0).to(tl.float32)
        other_nan = other_noise != other_noise
        q = query_noise[:, None]
        o = other_noise[None, :]
        # Total order of a stable sort: numbers ascending, NaN after every number, ties by index.
        same = (o == q) | (other_nan[None, :] & query_nan[:, None])
        # (x == 0), not ~x: the interpreters of Triton 3.0-3.3 cannot invert a boolean.
        before = (o < q) | (query_nan[:, None] & (other_nan[None, :] == 0))
        before = before | (same & (other[None, :] < query[:, None]))
        before = before & other_valid[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)

    tl.store(ids_restore_ptr + row * L + query, rank.to(tl.int64), mask=query_valid)
    # Through fp32: Triton 3.0/3.1 cannot convert a boolean straight to bf16.
    removed = tl.where(rank >= K, 1.0, 0.0).to(mask_ptr.dtype.element_ty)
    tl.store(mask_ptr + row * L + query, removed, mask=query_valid)
    is_kept = query_valid & (rank < K)
    tl.store(ids_keep_ptr + row * K + rank, query.to(tl.int64), mask=is_kept)


def launch_config(length: int) -> dict:
    """Launch parameters of the masking kernel: up to 64 x 64 noise comparisons a step."""
    return dict(BLOCK_Q=block_size(length, 64), BLOCK_K=block_size(length, 64), num_warps=4)


def _masking_triton(noise: torch.Tensor, len_keep: int, mask_dtype: torch.dtype):
    n, length = noise.shape
    ids_keep = torch.empty(n, len_keep, dtype=torch.int64, device=noise.device)
    ids_restore = torch.empty(n, length, dtype=torch.int64, device=noise.device)
    mask = torch.empty(n, length, dtype=mask_dtype, device=noise.device)
    config = launch_config(length)
    launch(
        _masking_kernel,
        (n, triton.cdiv(length, config["BLOCK_Q"])),
        ids_keep,
        ids_restore,
        mask,
        noise,
        length,
        len_keep,
        **config,
    )
    return ids_keep, ids_restore, mask


def _inverse_permutation(ids: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of permutations ``ids [N, L]`` by one scatter (not a second argsort)."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return torch.empty_like(ids).scatter_(1, ids, positions)


def _masking_torch(noise: torch.Tensor, len_keep: int, mask_dtype: torch.dtype):
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = _inverse_permutation(ids_shuffle)
    mask = (ids_restore >= len_keep).to(mask_dtype)
    return ids_shuffle[:, :len_keep].contiguous(), ids_restore, mask


@torch.library.custom_op("fastmae::random_masking", mutates_args=())
def masking_op(
    noise: Tensor, len_keep: int, mask_dtype: torch.dtype, use_triton: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """noise ``[N, L]`` float -> ``ids_keep [N, K]`` int64, ``ids_restore [N, L]`` int64,
    ``mask [N, L]`` in ``mask_dtype``. Not differentiable."""
    noise = noise.contiguous()
    if use_triton:
        return _masking_triton(noise, len_keep, mask_dtype)
    return _masking_torch(noise, len_keep, mask_dtype)


@masking_op.register_fake
def _(noise, len_keep, mask_dtype, use_triton):
    n, length = noise.shape
    return (
        noise.new_empty(n, len_keep, dtype=torch.int64),
        noise.new_empty(n, length, dtype=torch.int64),
        noise.new_empty(n, length, dtype=mask_dtype),
    )


@fused_op("fastmae::random_masking", kernels=[_masking_kernel])
def _masking_bytes(noise, len_keep, mask_dtype, use_triton, outputs):
    return nbytes(noise) + sum(nbytes(out) for out in outputs)
