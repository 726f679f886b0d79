"""The static GPU check compiles what real steps launch: its specs are recorded from the
steps' launches (in the interpreter, at tiny sizes here), cover every registered kernel with
every argument, and include the bf16 launches of bf16 autocast (compiling is left to
``benchmarks/gpu_check.sh``: minutes on the CPU)."""

import pytest

pytest.importorskip("triton")

from fastmae.kernels._triton import fused_kernel_names  # noqa: E402
from tests.helpers import run_without_interpreter  # noqa: E402

RECORD = """
import json
from benchmarks import static_check
from fastmae.kernels._triton import kernel_name

specs = static_check.recorded_specs(tiny=True)
print(json.dumps([
    [label, kernel_name(kernel), sorted(kernel.arg_names), sorted(args), sorted(constexprs), warps]
    for label, kernel, args, constexprs, warps in specs
]))
"""


def test_recorded_specs_cover_every_kernel_and_argument():
    """Recorded in a subprocess without the interpreter, where the kernels are jit functions."""
    specs = run_without_interpreter(RECORD)
    assert {name for _, name, *_ in specs} == fused_kernel_names()
    for label, _, arg_names, args, constexprs, warps in specs:
        assert arg_names == sorted(args + constexprs), label
        assert warps in (1, 2, 4, 8, 16), label
    bf16_launched = {name for label, name, *_ in specs if "(bf16" in label}
    activations = {"_add_positions_kernel", "_unshuffle_fwd_kernel", "_unshuffle_bwd_kernel"}
    activations |= {"_masked_loss_fwd_kernel", "_masked_loss_bwd_kernel", "_masking_kernel"}
    assert activations <= bf16_launched
