"""Test setup: Triton kernels run in the interpreter on the CPU (set before triton loads)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: the workers share the cores
    torch.set_num_threads(1)

import fastmae  # noqa: E402
from fastmae.kernels import HAS_TRITON, reset_launch_counts  # noqa: E402
from tests.helpers import seed_for  # noqa: E402

BACKENDS = (
    ["triton", "torch"] if HAS_TRITON and os.environ["TRITON_INTERPRET"] == "1" else ["torch"]
)


def _nan_filled(allocate):
    """``allocate`` (torch.empty, empty_like or Tensor.new_empty) whose floating results are
    filled with NaN, as flash-linear-attention's tests do: a kernel that reads memory it never
    wrote then fails a test instead of reading whatever was there."""

    def nan_filled(*args, **kwargs):
        tensor = allocate(*args, **kwargs)
        if tensor.is_floating_point() and tensor.device.type != "meta":
            with torch.no_grad():
                tensor.fill_(float("nan"))
        return tensor

    return nan_filled


@pytest.fixture(autouse=True)
def uninitialised_memory_is_nan(monkeypatch):
    """Every torch.empty, empty_like and new_empty in a test is NaN-filled (fastmae's, and the
    libraries' it calls, which write what they allocate)."""
    if torch.compiler.is_compiling():  # pragma: no cover - fixtures run eagerly
        return
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _nan_filled(torch.Tensor.new_empty))


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Every test seeds torch before it runs (see :func:`tests.helpers.seed_for`: from its
    own id unless FASTMAE_TEST_SEED says otherwise); the seed is printed so a failure can be
    replayed."""
    seed = seed_for(request.node.nodeid)
    print(f"torch seed {seed} (replay with FASTMAE_TEST_SEED={seed})")
    torch.manual_seed(seed)
    return seed


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test once per fused-op backend, forced through fastmae's switch."""
    with fastmae.use_backend(request.param):
        reset_launch_counts()
        yield request.param


@pytest.fixture
def any_backend():
    """For a test whose code path the backend does not change (checks that fail before any
    dispatch, Hugging Face's fallbacks, float64, torch.func): one run, on the Triton backend
    where it can run, so that a kernel launched where none should be shows in the counts."""
    with fastmae.use_backend(BACKENDS[0]):
        reset_launch_counts()
        yield BACKENDS[0]
