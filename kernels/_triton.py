"""Triton import shim, launch counting and the helpers every kernel file shares.

Triton is a Linux-only dependency: without it (or with a Triton too old for the kernels and
``FASTMAE_BACKEND=torch``) the kernel modules still import (``@triton.jit`` becomes a no-op and
``tl.constexpr`` a plain annotation) and only the torch path runs. Versions are checked in
``_versions.py``.
"""

from __future__ import annotations

import os
import typing
from collections import Counter

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

# Bytes each fused op's kernels move, as functions of the op's arguments and outputs: the one
# source for the benchmark summary's GB/s and the step accounting (python -m benchmarks.account).
KERNEL_BYTES: dict = {}


def kernel_bytes(op_name: str):
    """Register ``fn(*args, outputs) -> int``: the bytes op ``op_name``'s kernels read and write
    (each input read once, each output written once; small cache-resident tables once)."""

    def register(fn):
        KERNEL_BYTES[op_name] = fn
        return fn

    return register


def ids_in_range(ids: torch.Tensor, upper: int):
    """The torch paths' twin of the kernels' masked id accesses: ``ids`` with every entry
    outside ``[0, upper)`` replaced by 0 (safe to index with), and the ``in range`` mask."""
    in_range = (ids >= 0) & (ids < upper)
    return torch.where(in_range, ids, 0), in_range


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


# Read once: Triton decides at import whether its kernels are interpreted, and torch.compile
# (before torch 2.5) cannot trace a read of os.environ.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1`` when
    fastmae was imported)."""
    return _INTERPRETING


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` and count it under the kernel's name."""
    kernel[grid](*args, **kwargs)
    _LAUNCHES[getattr(kernel, "fn", kernel).__name__] += 1


def launch_counts() -> dict[str, int]:
    """How many times each Triton kernel was launched since the last :func:`reset_launch_counts`."""
    return dict(_LAUNCHES)


def reset_launch_counts() -> None:
    _LAUNCHES.clear()


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
