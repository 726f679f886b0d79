"""Test setup: Triton kernels run in the interpreter on the CPU (set before triton loads)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fastmae  # noqa: E402
from fastmae.kernels import HAS_TRITON, reset_launch_counts  # noqa: E402

BACKENDS = (
    ["triton", "torch"] if HAS_TRITON and os.environ["TRITON_INTERPRET"] == "1" else ["torch"]
)


@pytest.fixture(autouse=True)
def fresh_seed():
    """Every test draws fresh random inputs; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("FASTMAE_TEST_SEED", random.randrange(2**31)))
    print(f"torch seed {seed} (replay with FASTMAE_TEST_SEED={seed})")
    torch.manual_seed(seed)
    return seed


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test once per fused-op backend, forced through fastmae's switch."""
    with fastmae.use_backend(request.param):
        reset_launch_counts()
        yield request.param
