"""Triton import shim, the fused-op registry, launch counting and the host-side helpers every
kernel file shares (the shared ``@triton.jit`` helpers are in ``_jit.py``).

Triton is a Linux-only dependency: without it (or with a Triton too old for the kernels and
``FASTMAE_BACKEND=torch``) the kernel modules still import (``@triton.jit`` becomes a no-op and
``tl.constexpr`` a plain annotation) and only the torch path runs. Versions are checked in
``_versions.py``.
"""

from __future__ import annotations

import os
import typing
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from ._versions import check_versions

try:
    import triton
    import triton.language as tl

    HAS_TRITON = check_versions(
        torch.__version__, triton.__version__, os.environ.get("FASTMAE_BACKEND", "auto")
    )
except ImportError as error:  # pragma: no cover - exercised on platforms without triton
    if "fastmae" in str(error):  # our own refusal of the versions found
        raise
    check_versions(torch.__version__, None, "torch")
    HAS_TRITON = False

if not HAS_TRITON:

    class _Missing:
        constexpr = int

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Missing()

# Custom-op annotations that torch 2.4's schema inference reads (it predates list[int]).
IntList = typing.List[int]  # noqa: UP006

_LAUNCHES: Counter = Counter()
_RECORDINGS: list[list] = []  # the open record_launches() lists


@dataclass(frozen=True)
class FusedOp:
    """One ``fastmae::`` custom op: the Triton kernels its Triton path launches, and the bytes
    those kernels move as a function ``bytes(*op_args, outputs) -> int`` (each input read once,
    each output written once; small cache-resident tables once)."""

    name: str
    kernels: tuple[str, ...]
    bytes: Callable


# Every fused op, registered by its kernel file: the one list the tests take their kernel
# lists from, and the one source of the byte counts that the benchmark summary's GB/s, the step
# accounting (python -m benchmarks.account) and kernels/README.md's table come from.
FUSED_OPS: dict[str, FusedOp] = {}


def fused_op(op_name: str, kernels: tuple = ()):
    """Register the decorated byte-count function for custom op ``op_name``, which launches
    the jit ``kernels`` on its Triton path."""

    def register(count_bytes):
        FUSED_OPS[op_name] = FusedOp(op_name, tuple(map(kernel_name, kernels)), count_bytes)
        return count_bytes

    return register


def fused_kernel_names() -> set[str]:
    """The names of every Triton kernel some fused op launches."""
    return {name for op in FUSED_OPS.values() for name in op.kernels}


def ids_in_range(ids: torch.Tensor, upper: int):
    """The torch paths' twin of the kernels' masked id accesses: ``ids`` with every entry
    outside ``[0, upper)`` replaced by 0 (safe to index with), and the ``in range`` mask."""
    in_range = (ids >= 0) & (ids < upper)
    return torch.where(in_range, ids, 0), in_range


def sum_rows_by_ids(grad_rows: torch.Tensor, ids: torch.Tensor, length: int) -> torch.Tensor:
    """The gradient ``[length, D]`` of a table whose row ``ids[n, t]`` was added to row t of
    sample n (``grad_rows [N, T, D]``): a per-sample scatter, then a sum over samples. Each
    sample names a row at most once, so this is exact and deterministic (no colliding atomics).
    Ids outside ``[0, length)`` (possible only unchecked) add nothing."""
    n, _, width = grad_rows.shape
    safe_ids, in_range = ids_in_range(ids, length)
    index = safe_ids[..., None].expand(-1, -1, width)
    per_sample = grad_rows.new_zeros(n, length, width)
    per_sample.scatter_add_(1, index, torch.where(in_range[..., None], grad_rows, 0))
    return per_sample.sum(0)


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


# Read once: Triton decides at import whether its kernels are interpreted, and torch.compile
# (before torch 2.5) cannot trace a read of os.environ.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1`` when
    fastmae was imported)."""
    return _INTERPRETING


def kernel_name(kernel) -> str:
    """The Python name of a jit kernel (the plain function's where Triton is missing)."""
    return getattr(kernel, "fn", kernel).__name__


@dataclass(frozen=True)
class PointerArg:
    """A tensor argument of a recorded launch: its dtype, and whether its address is 16-byte
    aligned (Triton's launcher then specialises the pointer as divisible by 16)."""

    dtype: torch.dtype
    aligned: bool


@dataclass(frozen=True)
class Launch:
    """One recorded launch: the jit kernel, and each of its arguments by name (a
    :class:`PointerArg` for a tensor, else the value), launch options included."""

    kernel: object
    arguments: dict


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` and count it under the kernel's name (and
    record it, inside :func:`record_launches`)."""
    kernel[grid](*args, **kwargs)
    _LAUNCHES[kernel_name(kernel)] += 1
    if _RECORDINGS:
        arguments = dict(zip(kernel.arg_names, args), **kwargs)
        for name, value in arguments.items():
            if isinstance(value, torch.Tensor):
                arguments[name] = PointerArg(value.dtype, value.data_ptr() % 16 == 0)
        for recording in _RECORDINGS:
            recording.append(Launch(kernel, arguments))


@contextmanager
def record_launches():
    """Collects every kernel launch inside the block as a :class:`Launch`, in order: the static
    GPU check compiles what real steps launch."""
    recording = []
    _RECORDINGS.append(recording)
    try:
        yield recording
    finally:
        _RECORDINGS.remove(recording)


def launch_counts() -> dict[str, int]:
    """How many times each Triton kernel was launched since the last :func:`reset_launch_counts`."""
    return dict(_LAUNCHES)


def reset_launch_counts() -> None:
    _LAUNCHES.clear()


def promoted_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype torch's type promotion gives the official ops on ``tensors`` (``cat``, ``+``)."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 where any input is float64 (computed exactly there, on the torch path), else the
    float32 that every kernel accumulates and keeps statistics in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def block_size(width: int, cap: int = 1024) -> int:
    """Smallest power of two covering ``width``, at most ``cap``."""
    return min(triton.next_power_of_2(max(int(width), 1)), cap)


def warps_for(block_elements: int) -> int:
    """Warps for a program touching ``block_elements`` values: about 8 values per thread."""
    return max(1, min(16, block_elements // 256))


def row_tile_config(width: int) -> dict:
    """Launch parameters of the row-tile kernels (add-positions, unshuffle forward and
    backward): 16 rows of up to 128 columns per program, 4 warps."""
    return dict(BLOCK_T=16, BLOCK_D=block_size(width, 128), num_warps=4)


def row_tile_grid(n: int, rows: int, width: int) -> tuple[int, int, int]:
    """Grid ``(N, cdiv(rows, BLOCK_T), cdiv(width, BLOCK_D))`` of a row-tile kernel."""
    config = row_tile_config(width)
    return (n, triton.cdiv(rows, config["BLOCK_T"]), triton.cdiv(width, config["BLOCK_D"]))


def launch_row_tiles(kernel, n: int, rows: int, width: int, *args, **constants) -> None:
    """Launch a row-tile kernel over an ``[n, rows, width]`` output (see ``_jit.row_tile``)."""
    launch(kernel, row_tile_grid(n, rows, width), *args, **constants, **row_tile_config(width))
