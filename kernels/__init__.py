"""fastmae's Triton kernels, installed as ``fastmae.kernels``: one module per op family, each
with its forward and backward kernels, launch code, the torch-path version of the same
algorithm, and the ops that tie forward to backward.

The ops are ``torch.library.custom_op``s with fake kernels and registered autograd, rather than
``torch.library.triton_op`` with ``wrap_triton``: a custom op is opaque to torch.compile, so the
same op serves compiled Triton on CUDA, Triton's interpreter on the CPU (which ``wrap_triton``
cannot trace) and the torch path, with no graph break; Inductor still fuses everything around
it. The cost is that Inductor cannot fuse into our kernels, which are memory-bound copies and
reductions it would not improve.
"""

from ._triton import HAS_TRITON, interpreting, launch_counts, reset_launch_counts

__all__ = ["HAS_TRITON", "interpreting", "launch_counts", "reset_launch_counts"]
