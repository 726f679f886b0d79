"""The video MAE (mae_st): a training step and the fused op groups, reference vs fastmae.

On a GPU the step is mae_st's ViT-L default (224 px, 16 frames, tubelets of 2, 8 target
frames, mask ratio 0.9); on the CPU the same layout with a ViT-B of 2 + 1 blocks on 8 frames of
112 px, so that the whole benchmark suite stays under 2 minutes there. The op groups run the
ViT-L default's sizes (batch 1 on the CPU): the encoder input (masking, kept-tubelet
embedding, positions), the decoder unshuffle and the loss over the 8 target frames, each
forward+backward, rated by the bytes the fastmae step moves
(:func:`benchmarks.account.count_bytes`).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import GPU, training_step
from fastmae import video
from fastmae.config import IMAGE_SIZE, VIDEO_CLIP, video_step
from fastmae.video import reference

SIZES = video_step("mae_vit_large_patch16")  # the ViT-L default
RATIO, LENGTH, KEEP = SIZES.mask_ratio, SIZES.length, SIZES.keep
WIDTH, PIXELS = SIZES.width, SIZES.pixels  # encoder width; target pixels per tubelet
STEP_BATCH = 16 if GPU else 1
STEP = (
    ("mae_vit_large_patch16", dict(VIDEO_CLIP, img_size=IMAGE_SIZE))
    if GPU
    else (
        "mae_vit_base_patch16",
        dict(img_size=112, num_frames=8, t_patch_size=2, pred_t_dim=4, depth=2, decoder_depth=1),
    )
)
STEP_LABEL = "ViT-L/16 224px 16x2 frames" if GPU else "ViT-B/16 2+1 blocks 112px 8x2 frames"


def video_model(impl: str, device, name="mae_vit_large_patch16", **config):
    module = video if impl.startswith("fastmae") else reference
    torch.manual_seed(0)
    return getattr(module, name)(**config).to(device)


def eager_only(impl):
    if impl.endswith("+compile"):
        pytest.skip("the video groups time eager steps")


def op_model(impl, device, norm_pix=False):
    """The ViT-L default's embedding, tables and loss, without transformer blocks."""
    config = dict(VIDEO_CLIP, depth=0, decoder_depth=0, norm_pix_loss=norm_pix)
    return video_model(impl, device, **config)


def clips(settings, batch, requires_grad=False):
    shape = (batch, SIZES.in_chans, SIZES.num_frames, SIZES.img_size, SIZES.img_size)
    return torch.randn(shape, device=settings.device, requires_grad=requires_grad)


@pytest.mark.benchmark(group="video train-step")
def test_video_train_step(benchmark, measure, settings, impl):
    benchmark.group = f"video train-step {STEP_LABEL} n={STEP_BATCH}"
    eager_only(impl)
    name, config = STEP

    def make_step(impl):
        model = video_model(impl, settings.device, name, **config, norm_pix_loss=True)
        return training_step(model, model, settings, mask_ratio=RATIO)

    size = (config["num_frames"], config["img_size"], config["img_size"])
    inputs = [
        (torch.randn(STEP_BATCH, 3, *size, device=settings.device),)
        for _ in range(settings.input_sets)
    ]
    measure(make_step, inputs, count_bytes=False)


def _batch(settings):
    return max(1, settings.batch // 8)


def measure_op(measure, settings, impl, inputs, method: str, norm_pix=False):
    """Time ``op_model(impl).<method>(*inputs)`` forward+backward (under the settings'
    autocast), rated by the bytes the fastmae step moves."""

    def make_step(impl):
        run = getattr(op_model(impl, settings.device, norm_pix), method)

        def step(*args):
            with settings.autocast():
                out = run(*args)
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()

        return step

    measure(make_step, inputs)


@pytest.mark.benchmark(group="video encoder-input")
def test_video_encoder_input(benchmark, measure, settings, impl):
    eager_only(impl)
    n = _batch(settings)
    inputs = [
        (clips(settings, n), RATIO, torch.rand(n, LENGTH, device=settings.device))
        for _ in range(settings.input_sets)
    ]
    measure_op(measure, settings, impl, inputs, "forward_encoder")


@pytest.mark.benchmark(group="video decoder-unshuffle")
def test_video_decoder_unshuffle(benchmark, measure, settings, impl):
    eager_only(impl)
    n = _batch(settings)
    inputs = []
    for _ in range(settings.input_sets):
        ids_restore = torch.rand(n, LENGTH, device=settings.device).argsort(1).argsort(1)
        latent = torch.randn(n, KEEP, WIDTH, device=settings.device, requires_grad=True)
        inputs.append((latent, ids_restore))
    measure_op(measure, settings, impl, inputs, "forward_decoder")


@pytest.mark.benchmark(group="video loss-normpix")
def test_video_loss(benchmark, measure, settings, impl):
    eager_only(impl)
    n = _batch(settings)
    pred_dtype = settings.autocast_dtype or torch.float32
    inputs = []
    for _ in range(settings.input_sets):
        mask = torch.ones(n, LENGTH, device=settings.device)
        mask.scatter_(1, torch.rand(n, LENGTH, device=settings.device).argsort(1)[:, :KEEP], 0.0)
        pred = torch.randn(n, LENGTH, PIXELS, device=settings.device, dtype=pred_dtype)
        inputs.append((clips(settings, n), pred.requires_grad_(), mask))
    measure_op(measure, settings, impl, inputs, "forward_loss", norm_pix=True)
