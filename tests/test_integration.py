"""fastmae in real training setups: torch.compile, autocast, and no host synchronisation
(DDP and FSDP2: tests/test_distributed.py)."""

import pathlib
import sys

import pytest
import torch

import fastmae
import fastmae.video
from fastmae import reference
from fastmae.kernels import loss, masking, patch_embed, patchify, unshuffle
from fastmae.kernels._triton import FUSED_OPS
from tests.configs import TINY, TINY_CLIP, TINY_IMAGE
from tests.helpers import assert_as_accurate, assert_close

CONFIG = TINY_IMAGE


def twins():
    ref = reference.MaskedAutoencoderViT(**CONFIG)
    fused = fastmae.MaskedAutoencoderViT(**CONFIG)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def step(model, imgs, noise):
    model.zero_grad()
    loss_value, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    loss_value.backward()
    params = model.named_parameters()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in params if p.grad is not None}
    return loss_value, pred, mask, grads


def test_compile_fullgraph_matches_eager(backend):
    _, fused = twins()
    imgs, noise = torch.randn(3, 3, 8, 12), torch.rand(3, 24)
    eager = step(fused, imgs, noise)
    torch._dynamo.reset()
    compiled_model = torch.compile(fused, fullgraph=True)  # any graph break raises
    compiled = step(compiled_model, imgs, noise)
    assert torch.equal(compiled[2], eager[2])
    assert_close(compiled[0], eager[0])
    assert_close(compiled[1], eager[1])
    for name, grad in eager[3].items():
        assert_close(compiled[3][name], grad, "gradient", name)


def op_samples(use_triton: bool):
    """One call of every fastmae custom op, with inputs that need grad where it can flow; the
    loss backward takes the state its forward saved on that path."""
    n, length, keep, width = 3, 24, 6, 10
    noise = torch.rand(n, length)
    ids_keep, ids_restore, mask = masking.masking_op(noise, keep, torch.float32, False)
    imgs = torch.randn(n, 3, 8, 12, requires_grad=True)
    pred = torch.randn(n, length, 12, requires_grad=True)
    decoder_out = torch.randn(n, length + 1, 12, requires_grad=True)  # pred as a strided slice
    grad_out = torch.randn(n, length + 1, width)
    video = torch.randn(n, 3, 4, 4, 12, requires_grad=True)  # 2 x 2 x 6 tubelets of 2 x 2 x 2
    frames = torch.tensor([0, 3])  # one target frame per temporal index: 2 x 2 x 6 patches
    video_pred = torch.randn(n, length, 12, requires_grad=True)
    clip = torch.randn(n, 4, 3, 4, 12)  # HF VideoMAE's [N, F, C, H, W]: 2 x 2 x 6 tubelets
    masked = length - keep
    ids_shuffle = torch.argsort(mask, dim=1, stable=True)  # kept patches first, in order
    ids_masked = ids_shuffle[:, keep:]
    clip_pred = torch.randn(n, masked, 24, requires_grad=True)
    with torch.no_grad():
        _, _, weight, residual, mean, rstd, _ = loss.masked_pixel_loss_op(
            imgs, pred, mask, None, None, None, [2, 2], "patch", False, use_triton
        )
        _, _, video_weight, video_residual, video_mean, video_rstd, _ = loss.masked_pixel_loss_op(
            video, video_pred, mask, None, frames, None, [1, 2, 2], "patch", False, use_triton
        )
    scale = torch.full((1,), 0.01)
    image_geometry = ([n, 3, 8, 12], length, [2, 2], True, torch.float32)
    video_geometry = ([n, 3, 4, 4, 12], length, [1, 2, 2], True, torch.float32)
    return [
        (masking.masking_op, (noise, keep, torch.float32)),
        (patchify.gather_patches_op, (imgs, ids_keep, [2, 2], False)),
        (patchify.gather_patches_op, (imgs, None, [2, 2], True)),
        (patchify.scatter_patches_op, (pred, None, [2, 2], [n, 3, 8, 12], True)),
        (
            patchify.scatter_patches_op,
            (pred[:, :keep].detach().requires_grad_(), ids_keep, [2, 2], [n, 3, 8, 12], False),
        ),
        (
            patch_embed.add_positions_op,
            (
                torch.randn(n, keep, width, requires_grad=True),
                ids_keep,
                torch.randn(width, requires_grad=True),
                torch.randn(length + 1, width, requires_grad=True),
            ),
        ),
        (
            unshuffle.unshuffle_op,
            (
                torch.randn(n, keep + 1, width, requires_grad=True),
                ids_restore,
                torch.randn(width, requires_grad=True),
                torch.randn(length + 1, width),
                True,
                False,
            ),
        ),
        (
            unshuffle.unshuffle_backward_op,
            (grad_out, ids_restore, keep, torch.float32, True, False),
        ),
        # HF VideoMAE's decoder input: shuffled order, positions by ids_shuffle.
        (
            unshuffle.unshuffle_op,
            (
                torch.randn(n, keep, width, requires_grad=True),
                ids_shuffle,
                torch.randn(width, requires_grad=True),
                torch.randn(length, width, requires_grad=True),
                False,
                True,
            ),
        ),
        (
            unshuffle.unshuffle_backward_op,
            (grad_out[:, 1:], ids_shuffle, keep, torch.float32, False, True),
        ),
        # The video MAE's forms: no cls row, tubelets, trainable positions, a frame table.
        (
            unshuffle.unshuffle_op,
            (
                torch.randn(n, keep, width, requires_grad=True),
                ids_restore,
                torch.randn(width, requires_grad=True),
                torch.randn(length, width, requires_grad=True),
                False,
                False,
            ),
        ),
        (
            patch_embed.add_positions_op,
            (
                torch.randn(n, keep, width, requires_grad=True),
                ids_keep,
                None,
                torch.randn(length, width, requires_grad=True),
            ),
        ),
        (patchify.gather_patches_op, (video, ids_keep, [2, 2, 2], False)),
        (patchify.gather_patches_op, (video, None, [2, 2, 2], True)),
        (
            loss.masked_pixel_loss_op,
            (video, video_pred, mask, None, frames, None, [1, 2, 2], "patch", False),
        ),
        (loss.masked_pixel_loss_op, (imgs, pred, mask, None, None, None, [2, 2], "patch", False)),
        (
            loss.masked_pixel_loss_op,
            (imgs.detach(), pred, mask, None, None, None, [2, 2], "none", False),
        ),
        (
            loss.masked_pixel_loss_op,
            (imgs, decoder_out[:, 1:], mask.clone().requires_grad_(), None, None, None, [2, 2])
            + ("patch", True),
        ),
        # HF VideoMAE's form: a [N, F, C, H, W] clip read as a permuted view, pred rows by ids
        # (the masked tubelets), un-normalised targets, per-channel normalisation.
        (
            loss.masked_pixel_loss_op,
            (
                clip.permute(0, 2, 1, 3, 4),
                clip_pred,
                torch.ones(n, masked),
                ids_masked,
                None,
                torch.rand(2, 3) + 0.5,
                [2, 2, 2],
                "channel",
                False,
            ),
        ),
        (
            loss.masked_pixel_loss_backward_op,
            (scale, residual, weight, imgs.detach(), mean, rstd, None, *image_geometry),
        ),
        (
            loss.masked_pixel_loss_backward_op,
            (scale, residual, weight, None, mean, rstd, None, *image_geometry),
        ),
        (
            loss.masked_pixel_loss_backward_op,
            (scale, video_residual, video_weight, video.detach(), video_mean, video_rstd, frames)
            + video_geometry,
        ),
    ]


# opcheck's utilities that depend on the implementation behind the op: the schema test (it
# runs the op and looks for undeclared mutation) and the fake-tensor test (fake outputs against
# real ones). The autograd registration and AOT dispatch are the op's, the same on either path.
IMPLEMENTATION_CHECKS = ("test_schema", "test_faketensor")


def test_opcheck_every_custom_op(backend):
    use_triton = backend == "triton"
    samples = op_samples(use_triton)
    assert {op._qualname for op, _ in samples} == set(FUSED_OPS)
    options = {"test_utils": IMPLEMENTATION_CHECKS} if use_triton else {}  # else all of them
    for op, args in samples:
        torch.library.opcheck(op, (*args, use_triton), **options)


@pytest.mark.parametrize("backend_name", ["auto", "torch"])
def test_bf16_autocast_on_cpu(backend_name):
    # "auto" mixes paths under the interpreter: fp32 ops run Triton, bf16 ones the torch path.
    ref, fused = twins()
    imgs, noise = torch.randn(4, 3, 8, 12), torch.rand(4, 24)
    oracle = step(ref, imgs, noise)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16), fastmae.use_backend(backend_name):
        ref_bf16 = step(ref, imgs, noise)
        fused_bf16 = step(fused, imgs, noise)
    assert torch.isfinite(fused_bf16[0]) and fused_bf16[0].dtype == torch.float32
    assert torch.equal(fused_bf16[2], oracle[2])
    for got, same_dtype, expected in zip(fused_bf16[:2], ref_bf16[:2], oracle[:2]):
        assert_as_accurate(got, same_dtype, expected, torch.bfloat16)
    for name, grad in oracle[3].items():
        assert fused_bf16[3][name].dtype == torch.float32, name
        assert_as_accurate(fused_bf16[3][name], ref_bf16[3][name], grad, torch.bfloat16, name)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_no_host_synchronisation_in_a_step(kind):
    """No .item(), .nonzero(), .cpu(), bool() or .tolist() on tensors anywhere in a fused
    forward+backward on the Triton path (the torch path selects rows with nonzero on purpose)."""
    if fastmae.dispatch.use_triton(torch.zeros(1)) is False:
        pytest.skip("needs the Triton path: CUDA or TRITON_INTERPRET=1")
    if kind == "image":
        _, fused = twins()
        imgs = torch.randn(3, 3, 8, 12)
    else:
        layout = dict(sep_pos_embed=True, cls_embed=True, norm_pix_loss=True)
        fused = fastmae.video.MaskedAutoencoderViT(**TINY_CLIP, **layout, **TINY)
        imgs = torch.randn(3, 3, 4, 8, 8)
    names = ["item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__"]
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in names}
    original_nonzero = torch.nonzero

    package_dirs = tuple(
        str(pathlib.Path(module.__file__).parent) for module in (fastmae, fastmae.kernels)
    )

    def recorder(name, original):
        def record(*args, **kwargs):
            # fastmae's own code only: Triton's CPU interpreter moves tensors itself.
            if sys._getframe(1).f_code.co_filename.startswith(package_dirs):
                calls.append(name)
            return original(*args, **kwargs)

        return record

    try:
        for name in names:
            setattr(torch.Tensor, name, recorder(name, originals[name]))
        torch.nonzero = recorder("torch.nonzero", original_nonzero)
        with fastmae.use_backend("triton"):
            loss_value, _, _ = fused(imgs)
            loss_value.backward()
    finally:
        for name in names:
            setattr(torch.Tensor, name, originals[name])
        torch.nonzero = original_nonzero
    assert calls == []
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters() if p.grad is not None)


def test_compile_caches_are_keyed_by_the_op_sources():
    """A warm torch.compile cache must not serve a graph built against other fastmae op code."""
    import hashlib

    import fastmae.kernels

    if not hasattr(torch.compiler, "config") or not hasattr(torch.compiler.config, "cache_key_tag"):
        pytest.skip(f"torch {torch.__version__} has no compile cache-key tag to extend")

    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(fastmae.kernels.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    assert f"fastmae-{digest.hexdigest()[:16]}" in torch.compiler.config.cache_key_tag
