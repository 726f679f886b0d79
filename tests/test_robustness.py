"""Awkward and wrong input, as a careful user would try it: index values, the official methods
called on their own, the loss as a function of the mask, and float64. Every test runs on both
backends; the memory-safety test runs in a subprocess so that a crash fails it."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastmae
from fastmae import functional, reference
from fastmae.kernels import launch_counts, reset_launch_counts
from tests.configs import TINY, TINY_IMAGE
from tests.conftest import BACKENDS
from tests.helpers import assert_close

# -- 1. index values ---------------------------------------------------------------------------


def embed_args(n=2, width=6):
    """imgs [n, 3, 8, 8] with 4x4 patches: L = 4."""
    return (
        torch.randn(n, 3, 8, 8),
        torch.randn(width, 3, 4, 4),
        torch.randn(width),
        torch.randn(1, 1, width),
        torch.randn(1, 5, width),
    )


@pytest.mark.parametrize("bad", [10**6, -1, 4, -9])
def test_embed_refuses_ids_out_of_range(any_backend, bad):
    imgs, *params = embed_args()
    ids_keep = torch.tensor([[0, 2], [3, bad]])
    with pytest.raises(
        ValueError, match=rf"embed_visible_patches: ids_keep\[1, 1\] = {bad} is outside \[0, 4\)"
    ):
        functional.embed_visible_patches(imgs, ids_keep, *params)


def test_embed_refuses_repeated_ids(any_backend):
    imgs, *params = embed_args(n=1)
    with pytest.raises(
        ValueError, match=r"ids_keep\[0\] holds 0 twice \(at columns 0 and 1\); .* distinct"
    ):
        functional.embed_visible_patches(imgs, torch.tensor([[0, 0]]), *params)


def unshuffle_args(n=1, length=4, keep=2, width=5):
    return (
        torch.randn(n, keep + 1, width),
        torch.randn(1, 1, width),
        torch.randn(1, length + 1, width),
    )


@pytest.mark.parametrize("bad", [-1, 4, 10**6, -7])
def test_unshuffle_refuses_ids_out_of_range(any_backend, bad):
    x, token, pos = unshuffle_args()
    with pytest.raises(
        ValueError, match=rf"unshuffle_tokens: ids_restore\[0, 2\] = {bad} is outside \[0, 4\)"
    ):
        functional.unshuffle_tokens(x, torch.tensor([[0, 1, bad, 3]]), token, pos)


def test_unshuffle_refuses_a_non_permutation(any_backend):
    x, token, pos = unshuffle_args()
    with pytest.raises(ValueError, match=r"ids_restore\[0\] holds 0 twice \(at columns 0 and 1\)"):
        functional.unshuffle_tokens(x, torch.tensor([[0, 0, 1, 1]]), token, pos)


def test_validate_ids_false_skips_the_host_read(backend):
    """The documented opt-out reads nothing on the host: no .any() / nonzero on the ids."""
    imgs, *params = embed_args()
    ids_keep = torch.tensor([[0, 2], [3, 1]])
    expected = functional.embed_visible_patches(imgs, ids_keep, *params)
    calls = []
    original = torch.Tensor.any

    def record(*args, **kwargs):
        calls.append("any")
        return original(*args, **kwargs)

    torch.Tensor.any = record
    try:
        got = functional.embed_visible_patches(imgs, ids_keep, *params, validate_ids=False)
    finally:
        torch.Tensor.any = original
    assert calls == [] and torch.equal(got, expected)


GARBAGE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import fastmae
    from fastmae import functional

    torch.manual_seed(int(sys.argv[2]))
    results = {}
    with fastmae.use_backend(sys.argv[1]):
        imgs = torch.randn(2, 3, 8, 8, requires_grad=True)
        weight = torch.randn(6, 3, 4, 4, requires_grad=True)
        bias, cls = torch.randn(6), torch.randn(1, 1, 6)
        pos = torch.randn(1, 5, 6, requires_grad=True)
        ids_keep = torch.tensor([[10**6, -1, 2], [4, -9, -2**40]])
        out = functional.embed_visible_patches(
            imgs, ids_keep, weight, bias, cls, pos, validate_ids=False
        )
        out.sum().backward()
        results["embed"] = out.tolist()
        results["embed_grads"] = [imgs.grad.tolist(), weight.grad.tolist(), pos.grad.tolist()]

        x = torch.randn(2, 3, 5, requires_grad=True)
        token = torch.randn(1, 1, 5, requires_grad=True)
        dec_pos = torch.randn(1, 5, 5)
        ids_restore = torch.tensor([[-7, 3, 10**6, 0], [-1, 1, 1, 2**40]])
        out = functional.unshuffle_tokens(x, ids_restore, token, dec_pos, validate_ids=False)
        out.sum().backward()
        results["unshuffle"] = out.tolist()
        results["unshuffle_grads"] = [x.grad.tolist(), token.grad.tolist()]
    print(json.dumps(results))
    """
)


def run_garbage(backend_name, seed):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", GARBAGE_SCRIPT, backend_name, str(seed)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.splitlines()[-1])


def test_garbage_ids_unchecked_do_not_crash(backend, fresh_seed):
    """With the check off, ids far outside [0, L) read and write nothing outside the tensors
    (a segfault or an out-of-bounds read ends the subprocess or leaves garbage behind), and
    both backends give the same defined answer: an out-of-range id contributes zeros."""
    got = run_garbage(backend, fresh_seed)
    torch.manual_seed(fresh_seed)
    imgs, weight = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4)
    bias, cls, pos = torch.randn(6), torch.randn(1, 1, 6), torch.randn(1, 5, 6)
    embed = torch.tensor(got["embed"])
    assert torch.isfinite(embed).all()
    # The one valid kept patch (id 2) is exact; the others hold the bias alone (zero pixels,
    # no position); the cls row is cls + pos[0].
    valid = functional.embed_visible_patches(imgs[:1], torch.tensor([[2]]), weight, bias, cls, pos)
    assert torch.allclose(embed[0, 3], valid[0, 1], atol=1e-6)
    assert torch.allclose(embed[:, 0], (cls[0] + pos[:, 0]).expand(2, -1), atol=1e-6)
    for row in [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]:
        assert torch.allclose(embed[row], bias, atol=1e-6), row
    x, token, dec_pos = torch.randn(2, 3, 5), torch.randn(1, 1, 5), torch.randn(1, 5, 5)
    unshuffled = torch.tensor(got["unshuffle"])
    assert torch.allclose(unshuffled[0, 2], token[0, 0] + dec_pos[0, 2], atol=1e-6)  # K <= 3 < L
    assert torch.allclose(unshuffled[0, 4], x[0, 1] + dec_pos[0, 4], atol=1e-6)  # rank 0
    assert torch.allclose(unshuffled[0, 1], dec_pos[0, 1], atol=1e-6)  # rank -7: nothing
    assert torch.allclose(unshuffled[1, 4], dec_pos[0, 4], atol=1e-6)  # rank 2**40: nothing
    for grads in got["embed_grads"]:  # zero-initialised buffers: defined for any ids
        assert torch.isfinite(torch.tensor(grads)).all()
    # Rows of x that no valid rank names get no defined gradient (the kernel writes each kept
    # row once, with no zero fill); the rows that are named get theirs, the mask token its sum.
    x_grad, token_grad = (torch.tensor(g) for g in got["unshuffle_grads"])
    assert torch.equal(x_grad[:, 0], torch.ones(2, 5))  # cls rows
    assert torch.equal(x_grad[0, 1], torch.ones(5)) and torch.equal(x_grad[1, 2], torch.ones(5))
    assert torch.equal(token_grad, torch.ones(1, 1, 5))  # one masked position (rank 3)
    if backend == "triton":  # the torch path gives the same answer
        other = run_garbage("torch", fresh_seed)
        for key in ("embed", "unshuffle"):
            assert torch.allclose(torch.tensor(got[key]), torch.tensor(other[key]), atol=1e-5)


def test_repeated_ids_unchecked_do_not_crash(backend):
    imgs, *params = embed_args(n=1)
    imgs.requires_grad_()
    out = functional.embed_visible_patches(
        imgs, torch.tensor([[0, 0]]), *params, validate_ids=False
    )
    assert torch.allclose(out[0, 1] - params[-1][0, 1], out[0, 2] - params[-1][0, 1], atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(imgs.grad).all()


# -- 2. the official methods on their own --------------------------------------------------------

# The oracle runs on one backend (it has no fused ops), fastmae on each.
MODELS = [(reference.MaskedAutoencoderViT, "torch")]
MODELS += [(fastmae.MaskedAutoencoderViT, backend) for backend in BACKENDS]


@pytest.fixture(params=MODELS, ids=lambda case: f"{case[0].__module__}-{case[1]}")
def model(request):
    model_class, backend = request.param
    with fastmae.use_backend(backend):
        yield model_class(img_size=16, patch_size=4, in_chans=3, **TINY)  # L = 16


@pytest.mark.parametrize("with_noise", [True, False], ids=["noise", "drawn"])
def test_random_masking_takes_its_length_from_x(model, with_noise, fresh_seed):
    x = torch.randn(2, 10, 32)
    noise = torch.rand(2, 10) if with_noise else None
    torch.manual_seed(fresh_seed)
    got = model.random_masking(x, 0.5, noise)
    torch.manual_seed(fresh_seed)
    expected = reference.random_masking(x, 0.5, noise)
    assert got[0].shape == (2, 5, 32)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("size", [(8, 8), (24, 24), (12, 20)])
def test_patchify_and_unpatchify_take_other_image_sizes(model, size):
    imgs = torch.randn(2, 3, *size)
    patches = model.patchify(imgs)
    assert torch.equal(patches, reference.patchify(imgs, 4))
    if size[0] == size[1]:  # the official unpatchify infers a square grid
        assert torch.equal(model.unpatchify(patches), imgs)
    else:
        with pytest.raises(ValueError, match=r"L = 16 .* or a square number, got shape"):
            model.unpatchify(patches)


def test_patchify_still_checks_channels_and_divisibility(model):
    with pytest.raises(ValueError, match=r"1 channels, the model expects in_chans=3"):
        model.patchify(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"image size 8x10 \(H x W\) is not divisible"):
        model.patchify(torch.randn(1, 3, 8, 10))


@pytest.mark.parametrize(
    "ratio",
    [torch.tensor(0.75), torch.tensor(0.75, dtype=torch.float64), np.float32(0.75), np.array(0.75)],
    ids=["tensor", "tensor64", "numpy-scalar", "numpy-0d"],
)
def test_mask_ratio_as_tensor_or_numpy(model, ratio):
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    expected = model(imgs, mask_ratio=0.75, noise=noise)
    got = model(imgs, mask_ratio=ratio, noise=noise)
    assert torch.equal(got[2], expected[2]) and torch.equal(got[0], expected[0])


def test_mask_ratio_tensor_out_of_range_keeps_the_message(model):
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\), got 1.0"):
        model(torch.randn(1, 3, 16, 16), mask_ratio=torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"mask_ratio must be a real number"):
        model(torch.randn(1, 3, 16, 16), mask_ratio=torch.tensor([0.5, 0.5]))


# -- 3. the loss as a function of the mask -----------------------------------------------------


def official_loss(imgs, pred, mask, patch, norm_pix):
    """models_mae.forward_loss verbatim, for any mask (no zero-sum guard)."""
    target = reference.patchify(imgs, patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def loss_twins(mask_values, n=3):
    imgs = torch.randn(n, 3, 8, 8, requires_grad=True)
    pred = torch.randn(n, 4, 48, requires_grad=True)
    mask = mask_values.clone().requires_grad_()
    twins = [t.detach().clone().requires_grad_() for t in (imgs, pred, mask)]
    return (imgs, pred, mask), twins


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize(
    "kind", ["random-real", "negative", "binary", "all-negative"], ids=lambda v: v
)
def test_loss_and_mask_gradient_match_official(backend, norm_pix, kind):
    n = 3
    masks = {
        "random-real": torch.rand(n, 4) * 2 - 0.5,
        "negative": -torch.rand(n, 4),
        "binary": (torch.rand(n, 4) < 0.5).float(),
        "all-negative": -torch.ones(n, 4),
    }
    mask_values = masks[kind]
    mask_values[0, 0] = 1.0 if kind == "binary" else mask_values[0, 0]  # sum != 0
    ours, twins = loss_twins(mask_values, n)
    loss = functional.masked_pixel_loss(*ours, 4, norm_pix)
    expected = official_loss(*twins, 4, norm_pix)
    assert_close(loss, expected)
    grad = torch.randn(())
    loss.backward(grad)
    expected.backward(grad)
    for name, got, want in zip(["imgs", "pred", "mask"], ours, twins):
        assert_close(got.grad, want.grad, "model", name)


def test_all_ones_negated_mask_value(backend):
    imgs, pred = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 48)
    mask = -torch.ones(2, 4)
    got = functional.masked_pixel_loss(imgs, pred, mask, 4, True)
    assert_close(got, official_loss(imgs, pred, mask, 4, True), "op")
    assert got > 0


def test_zero_sum_mask_gives_zero_loss_and_zero_gradients(backend):
    ours, _ = loss_twins(torch.tensor([[1.0, -1.0, 0.0, 0.0]]), n=1)
    loss = functional.masked_pixel_loss(*ours, 4, True)
    loss.backward()
    assert loss.item() == 0.0
    for tensor in ours:
        assert torch.equal(tensor.grad, torch.zeros_like(tensor))


def test_nan_at_a_weight_zero_patch_does_not_reach_the_loss(backend):
    imgs, pred = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 48, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])
    clean = pred.detach().clone()
    with torch.no_grad():
        pred[0, 1] = float("nan")
    loss = functional.masked_pixel_loss(imgs, pred, mask, 4, True)
    assert_close(loss, reference.masked_pixel_loss(imgs, clean, mask, 4, True), "op")
    loss.backward()
    assert torch.equal(pred.grad[0, 1], torch.zeros(48))


# -- 4. float64 --------------------------------------------------------------------------------


def test_double_model_is_exact(any_backend):
    ref = reference.MaskedAutoencoderViT(**TINY_IMAGE).double()
    fused = fastmae.MaskedAutoencoderViT(**TINY_IMAGE).double()
    fused.load_state_dict(ref.state_dict())
    imgs, noise = torch.randn(3, 3, 8, 12, dtype=torch.float64), torch.rand(3, 24)
    expected = ref(imgs, noise=noise)
    got = fused(imgs, noise=noise)
    expected[0].backward()
    got[0].backward()
    assert got[0].dtype == torch.float64
    f64 = torch.float64
    assert_close(got[0], expected[0], "op", "loss", f64)
    assert_close(got[1], expected[1], "op", "pred", f64)
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, "gradient", name, f64)
    # float64 takes the torch path on every backend; only the masking ran (its noise is fp32).
    assert set(launch_counts()) <= {"_masking_kernel"}


def gradcheck_cases():
    f64 = dict(dtype=torch.float64)
    n, length, keep, width = 2, 6, 3, 4
    ids_keep, ids_restore, mask = functional.random_masking_indices(torch.rand(n, length), keep)
    imgs = torch.randn(n, 2, 4, 6, **f64)  # 2x2 patches: L = 6
    return {
        "embed_visible_patches": (
            lambda *t: functional.embed_visible_patches(t[0], ids_keep, *t[1:]),
            (imgs, torch.randn(width, 2, 2, 2, **f64), torch.randn(width, **f64))
            + (torch.randn(1, 1, width, **f64), torch.randn(1, length + 1, width, **f64)),
        ),
        "unshuffle_tokens": (
            lambda x, token, pos: functional.unshuffle_tokens(x, ids_restore, token, pos),
            (torch.randn(n, keep + 1, width, **f64), torch.randn(1, 1, width, **f64))
            + (torch.randn(1, length + 1, width, **f64),),
        ),
        "patchify": (lambda x: functional.patchify(x, 2), (imgs,)),
        "unpatchify": (
            lambda x: functional.unpatchify(x, 2, (2, 3)),
            (torch.randn(n, length, 8, **f64),),
        ),
        "masked_pixel_loss": (
            lambda i, p, m: functional.masked_pixel_loss(i, p, m, 2, False),
            (imgs, torch.randn(n, length, 8, **f64), mask.double() + 0.5),
        ),
        "masked_pixel_loss-normpix": (
            lambda i, p, m: functional.masked_pixel_loss(i, p, m, 2, True),
            (imgs, torch.randn(n, length, 8, **f64), torch.rand(n, length, **f64) - 0.3),
        ),
    }


@pytest.mark.parametrize("name", list(gradcheck_cases()))
def test_gradcheck_float64(any_backend, name):
    fn, inputs = gradcheck_cases()[name]
    inputs = tuple(t.detach().clone().requires_grad_() for t in inputs)
    reset_launch_counts()
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    assert launch_counts() == {}


def test_allocations_are_nan_filled_under_tests():
    """The conftest fixture that makes a read of unwritten memory fail a test is in force."""
    assert torch.isnan(torch.empty(3)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2))).all()
    assert torch.isnan(torch.zeros(2).new_empty(4)).all()
