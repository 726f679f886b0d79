"""The static GPU check's kernel specs follow the kernels' signatures: every argument of every
registered kernel is given, so ``benchmarks/gpu_check.sh`` compiles them all (compiling is left
to that script: minutes on the CPU)."""

import pytest

pytest.importorskip("triton")

from benchmarks import static_check  # noqa: E402
from fastmae.kernels._triton import fused_kernel_names, kernel_name  # noqa: E402


@pytest.mark.parametrize("width", [768, 1024], ids=["ViT-B", "ViT-L"])
def test_every_kernel_argument_is_specified(width):
    specs = static_check.kernel_specs(width)
    assert {kernel_name(kernel) for _, kernel, *_ in specs} == fused_kernel_names()
    for label, kernel, args, constexprs, warps in specs:
        assert set(kernel.arg_names) == set(args) | set(constexprs), label
        assert warps in (1, 2, 4, 8, 16), label
