"""Shared assertions and steps for the tests (their tiny models are in tests/configs.py)."""

import json
import os
import pathlib
import random
import subprocess
import sys
import zlib

import torch


def seed_for(key: str) -> int:
    """The torch seed of a test (or of a module's shared run) named ``key``: by default
    derived from the key, so every run draws the same inputs and each test its own;
    ``FASTMAE_TEST_SEED=N`` sets one seed for all, ``FASTMAE_TEST_SEED=random`` draws fresh
    ones."""
    chosen = os.environ.get("FASTMAE_TEST_SEED")
    if chosen is None:
        return zlib.crc32(key.encode())
    if chosen == "random":
        return random.randrange(2**31)
    return int(chosen)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, computed in float64; NaN anywhere fails."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    norm = expected.norm().item()
    return (actual - expected).norm().item() / (norm if norm > 0 else 1.0)


# The relative error (rel_err) fastmae may have against the oracle run in the same dtype:
# "op", one fused op (rounding in another summation order); "model", a whole model's outputs
# (loss, pred, latent) or parameters, over one step or a training run; "gradient", one
# parameter's gradient of a whole step. Rounding compounds through the blocks into each
# gradient tensor: the oracle's own fp32 gradients of the tiny test models are up to 1.4e-5
# off their float64 values (measured over 60 seeds of the image model and the four video
# layouts; the fused model's up to 0.9e-5), so two fp32 implementations may differ by twice
# that.
TOLERANCES = {
    torch.float64: {"op": 1e-13, "model": 1e-12, "gradient": 1e-12},
    torch.float32: {"op": 1e-6, "model": 1e-5, "gradient": 3e-5},
}
# In bf16 or fp16 two implementations cannot agree bit for bit, so fastmae's error against an
# exact (fp32 or fp64) result may be at most SLACK times the oracle's own error in that dtype,
# plus, for a single tensor, FLOOR (where the oracle's own error happens to be near zero).
LOW_PRECISION = {
    torch.bfloat16: dict(slack=2.0, floor=1e-3),
    torch.float16: dict(slack=2.0, floor=1e-4),
    torch.float32: dict(slack=2.0, floor=1e-6),
}


def assert_close(
    actual, expected, scope: str = "model", name: str = "", dtype=torch.float32
) -> None:
    """actual within the TOLERANCES for results computed in ``dtype`` (whatever dtype they
    are stored in: fp32 losses are often gathered in a float64 tensor)."""
    error = rel_err(actual, expected)
    limit = TOLERANCES[dtype][scope]
    assert error <= limit, f"{name}: relative error {error:.3g} > {limit:g} ({scope}, {dtype})"


def assert_as_accurate(
    actual, oracle, exact, dtype, name: str = "", slack: float = None, floor: bool = True
) -> None:
    """fastmae's ``actual`` in ``dtype`` is as accurate as the ``oracle`` in ``dtype``, both
    against ``exact``: LOW_PRECISION's rule. ``floor=False`` for errors aggregated over many
    tensors or steps, where a near-zero oracle error cannot happen by chance."""
    rule = LOW_PRECISION[dtype]
    error, oracle_error = rel_err(actual, exact), rel_err(oracle, exact)
    limit = (slack or rule["slack"]) * oracle_error + (rule["floor"] if floor else 0.0)
    assert error <= limit, f"{name}: error {error:.3g} > {limit:.3g} (oracle's {oracle_error:.3g})"


# Attention key biases: softmax ignores a shift shared by all keys, so their gradient is zero
# in exact arithmetic and rounding noise in any two implementations (names: fastmae video /
# mae_st, transformers 5.x, transformers 4.x).
ZERO_GRADIENT_SUFFIXES = ("attn.k.bias", "k_proj.bias", "attention.key.bias")


def assert_tensors_match(actual: dict, expected: dict, scope: str = "gradient") -> None:
    """Same names; each tensor within the ``scope`` tolerance, except the attention key biases'
    gradients (and what SGD makes of them), which must both be negligible (< 1e-6)."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if name.endswith(ZERO_GRADIENT_SUFFIXES):
            assert value.norm() < 1e-6 and actual[name].norm() < 1e-6, name
        else:
            assert_close(actual[name], value, scope, name)


def run_step(model, imgs, ratio, seed):
    """One forward+backward under ``seed`` -> (loss, pred, mask, {name: gradient})."""
    torch.manual_seed(seed)
    model.zero_grad()
    loss, pred, mask = model(imgs, mask_ratio=ratio)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, pred, mask, grads


def run_without_interpreter(code: str):
    """Runs ``code`` in a new Python at the checkout's root with Triton's interpreter off (this
    process's kernels are the interpreter's, which do not compile for a GPU) and returns the
    JSON of the last line it prints; fails the test with its stderr if it fails."""
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        env=dict(os.environ, TRITON_INTERPRET="0"),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
