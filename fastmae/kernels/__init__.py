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

import hashlib
import pathlib

import torch

from ._triton import HAS_TRITON, interpreting, launch_counts, reset_launch_counts


def _tag_compile_caches() -> None:
    """torch.compile's caches (Inductor's FX graph cache, AOTAutograd's cache) key a graph by its
    text, not by the Python behind a custom op, so a fastmae whose op bodies, schemas or backward
    formulas changed would be served the old compiled graph from a warm cache (seen with torch
    2.13). A digest of these op sources, appended to torch's cache-key tag, keys them in. This is
    the one guard against stale compiled graphs, for users and tests alike: the tests share
    torch's default cache directory."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return
    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    marker = f"fastmae-{digest.hexdigest()[:16]}"
    if marker not in config.cache_key_tag:
        config.cache_key_tag = (
            f"{config.cache_key_tag}|{marker}" if config.cache_key_tag else marker
        )


_tag_compile_caches()

__all__ = ["HAS_TRITON", "interpreting", "launch_counts", "reset_launch_counts"]
