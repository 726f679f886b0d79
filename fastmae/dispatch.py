"""Which implementation of the fused ops runs, decided in this one place.

Backends:
- ``"auto"`` (default): the Triton kernels for CUDA tensors, and for CPU tensors when Triton's
  interpreter is on (``TRITON_INTERPRET=1``, set before triton is imported; numpy has no
  bfloat16, so bf16 tensors take the torch path there); the torch path otherwise.
- ``"triton"``: always the Triton kernels; an error where they cannot run.
- ``"torch"``: always the vectorised torch version of the same fused algorithm.

float64 inputs take the torch path under every backend: the kernels keep float32 statistics,
and the torch path computes float64 in float64, so ``model.double()`` is exact.

Under torch.func transforms (``grad``, ``vmap``, ``jacrev``, ...) every op runs the official op
sequence of :mod:`fastmae.reference` instead: a custom op's registered autograd cannot run under
functorch (torch asks for an ``autograd.Function`` with its own ``setup_context``), and the
plain ops give the reference's values and gradients there. See :func:`functorch_active`.

Choose with the environment variable ``FASTMAE_BACKEND``, with :func:`set_backend`, or for a
block of code with ``with fastmae.use_backend("torch"):``.

The choice is process-wide: one module-level setting that every thread sees, like
``torch.backends`` flags, so :func:`use_backend` in one thread changes the backend of the ops
other threads run meanwhile. Under torch.compile the backend is read while tracing and baked
into the compiled graph.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from fastmae.kernels import HAS_TRITON, interpreting

BACKENDS = ("auto", "triton", "torch")


def _validated(name) -> str:
    if name not in BACKENDS:
        raise ValueError(f"fastmae backend must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _validated(os.environ.get("FASTMAE_BACKEND", "auto"))


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Set the backend for the fused ops: ``"auto"``, ``"triton"`` or ``"torch"``."""
    global _backend
    _backend = _validated(name)


@contextmanager
def use_backend(name: str):
    """Run the enclosed block with backend ``name``, then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


_interpreted_bfloat16 = False


@contextmanager
def interpreting_bfloat16():
    """Inside the block, bfloat16 tensors on the CPU run the kernels in Triton's interpreter
    (recent ones handle bf16) instead of taking the torch path: the static GPU check records
    the launches a GPU makes under bf16 autocast this way."""
    global _interpreted_bfloat16
    previous, _interpreted_bfloat16 = _interpreted_bfloat16, True
    try:
        yield
    finally:
        _interpreted_bfloat16 = previous


def use_triton(*tensors) -> bool:
    """Whether the fused op on ``tensors`` (the first decides the device; None, an absent
    optional input, is skipped) runs Triton kernels."""
    tensors = [t for t in tensors if t is not None]
    device = tensors[0].device
    runnable = HAS_TRITON and (
        device.type == "cuda"
        or (
            device.type == "cpu"
            and interpreting()
            and (_interpreted_bfloat16 or all(t.dtype != torch.bfloat16 for t in tensors))
        )
    )
    if _backend == "torch" or any(t.dtype == torch.float64 for t in tensors):
        return False
    if _backend == "triton" and not runnable:
        raise RuntimeError(
            f"FASTMAE_BACKEND='triton' but the Triton kernels cannot run here: device {device}, "
            f"dtypes {[str(t.dtype) for t in tensors]}, triton installed: {HAS_TRITON}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')} (CPU tensors need the "
            "interpreter and a dtype other than bfloat16)"
        )
    return runnable


def functorch_active() -> bool:
    """True inside a torch.func transform (grad, vmap, jvp, ...), where the fused ops run the
    reference's plain torch ops. False while torch.compile traces, which needs the custom ops."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None
