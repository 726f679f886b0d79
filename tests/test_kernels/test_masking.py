"""Fused random masking against the official double argsort."""

import pytest
import torch

import fastmae
from fastmae import functional, reference
from tests.helpers import run_without_interpreter

SHAPES = [(1, 4, 0.5), (3, 16, 0.75), (7, 49, 0.75), (5, 100, 0.8), (2, 196, 0.9), (4, 30, 0.0)]


@pytest.mark.parametrize("n,length,ratio", SHAPES, ids=lambda v: str(v))
def test_masking_matches_double_argsort(backend, n, length, ratio):
    noise = torch.rand(n, length)
    keep = int(length * (1 - ratio))
    ids_keep, ids_restore, mask = functional.random_masking_indices(noise, keep)
    x = torch.arange(n * length, dtype=torch.float32).view(n, length, 1)
    x_masked, ref_mask, ref_restore = reference.random_masking(x, ratio, noise)
    assert torch.equal(ids_restore, ref_restore)
    assert torch.equal(mask, ref_mask) and mask.dtype == ref_mask.dtype
    assert torch.equal(ids_keep, torch.argsort(noise, dim=1)[:, :keep])
    assert ids_keep.dtype == ids_restore.dtype == torch.int64


def test_ties_and_nan_still_give_a_permutation(backend):
    noise = torch.tensor([[0.5, 0.1, 0.5, float("nan"), 0.1, 0.9, float("nan"), 0.0]])
    ids_keep, ids_restore, mask = functional.random_masking_indices(noise, 3)
    # Stable order: 0.0 (7), 0.1 (1, 4), 0.5 (0, 2), 0.9 (5), NaN (3, 6).
    assert ids_restore.tolist() == [[3, 1, 4, 6, 2, 5, 7, 0]]
    assert ids_keep.tolist() == [[7, 1, 4]]
    assert mask.tolist() == [[1, 0, 1, 1, 0, 1, 1, 0]]


def test_noncontiguous_noise(backend):
    base = torch.rand(12, 5)
    noise = base.t()  # [5, 12], strided
    ids_keep, ids_restore, _ = functional.random_masking_indices(noise, 4)
    assert torch.equal(ids_restore, torch.argsort(torch.argsort(noise, 1), 1))
    assert torch.equal(ids_keep, torch.argsort(noise, 1)[:, :4])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_noise_gives_the_fp32_masks(dtype):
    # Default routing: fp16 runs the kernel in the interpreter, bf16 and fp64 the torch path.
    noise = torch.rand(3, 49).to(dtype)  # ties are likely in bf16: the stable order decides
    got = functional.random_masking_indices(noise, 12)
    with fastmae.use_backend("torch"):
        expected = functional.random_masking_indices(noise.float(), 12)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    stable_order = torch.argsort(noise.float(), dim=1, stable=True)
    assert torch.equal(got[1], torch.argsort(stable_order, dim=1))


COMPILE_BF16_MASKING = """
import json, sys
from benchmarks import static_check

specs = static_check.recorded_specs(tiny=True)
(spec,) = [s for s in specs if s[0].startswith("masking (bf16")]
_, kernel, args, constexprs, warps = spec
usages = []
for arch in (90, 80):
    compiled = static_check.compile_kernel(kernel, args, constexprs, warps, arch)
    usage = static_check.resource_usage(compiled.asm["cubin"])
    usages.append(dict(usage, arch=arch, bf16_in_ptx=".bf16" in compiled.asm["ptx"]))
print(json.dumps(usages))
"""


def test_masking_kernel_compiles_with_bf16_noise_and_mask():
    """On a GPU bf16 noise and masks run the kernel, so compile it for sm_90 and sm_80 here as
    the static check does: Triton 3.0/3.1 once failed on it. In a subprocess, since this
    process's kernels are the interpreter's."""
    pytest.importorskip("triton.backends.nvidia")
    for usage in run_without_interpreter(COMPILE_BF16_MASKING):
        assert usage["local"] == 0 and usage["bf16_in_ptx"], usage  # no spills, bf16 kept
