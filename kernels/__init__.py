"""fastmae's Triton kernels, installed as ``fastmae.kernels``: one module per op family, each
with its forward and backward kernels, launch code, torch fallback and autograd.Function."""

from ._triton import HAS_TRITON, interpreting, launch_counts, reset_launch_counts

__all__ = ["HAS_TRITON", "interpreting", "launch_counts", "reset_launch_counts"]
