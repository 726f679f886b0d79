"""The video MAEs, reference vs fastmae: mae_st's (``fastmae.video``) training step and fused
op groups, and Hugging Face's VideoMAE (the unpatched model vs ``fastmae.hf.apply_fastmae``).

On a GPU the step is mae_st's ViT-L default (224 px, 16 frames, tubelets of 2, 8 target
frames, mask ratio 0.9); on the CPU the same layout with a ViT-B of 2 + 1 blocks on 8 frames of
112 px, so that the whole benchmark suite stays under 2 minutes there. The op groups run the
ViT-L default's sizes (batch 1 on the CPU): the encoder input (masking, kept-tubelet
embedding, positions), the decoder unshuffle and the loss over the 8 target frames, each
forward+backward, rated by the bytes the fastmae step moves
(:func:`benchmarks.account.count_bytes`).

VideoMAE runs its base configuration (16 frames of 224 px, tubelets of 2, ViT-B, 90% tube
masking); on the CPU its step has 2 + 1 layers on 8 frames of 112 px. Its groups: the encoder
input (``VideoMAEEmbeddings``), and the decoder input with the loss, which HF computes inline
in its forward: that group runs the forward after the encoder (``encoder_to_decoder``, the
decoder input, the prediction head, the labels and the loss) with no decoder layers, the same
GEMMs in both rows.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.account import tube_mask
from benchmarks.conftest import GPU, decoder_mask_ratio, training_step
from fastmae import video
from fastmae.config import IMAGE_SIZE, VIDEO_CLIP, VIDEOMAE_TUBE_MASK_RATIO, video_step
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
        options = dict(norm_pix_loss=True, decoder_mask_ratio=decoder_mask_ratio(impl))
        model = video_model(impl, settings.device, name, **config, **options)
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


# -- Hugging Face VideoMAE ------------------------------------------------------------------------

VIDEOMAE_STEP = (
    {}
    if GPU
    else dict(image_size=112, num_frames=8, num_hidden_layers=2, decoder_num_hidden_layers=1)
)
VIDEOMAE_STEP_LABEL = "base 224px 16x2 frames" if GPU else "base 2+1 layers 112px 8x2 frames"


def videomae_config(**overrides):
    """VideoMAE's base configuration, ``overrides`` applied."""
    transformers = pytest.importorskip("transformers")
    return transformers.VideoMAEConfig(**overrides)


def videomae(impl: str, device, **overrides):
    """VideoMAEForPreTraining at the base configuration, unpatched for the reference, after
    ``fastmae.hf.apply_fastmae`` for fastmae (with the row's decoder mask ratio)."""
    import transformers

    from fastmae.hf import apply_fastmae

    torch.manual_seed(0)
    model = transformers.VideoMAEForPreTraining(videomae_config(**overrides)).to(device)
    if impl.startswith("fastmae"):
        return apply_fastmae(model, decoder_mask_ratio=decoder_mask_ratio(impl))
    return model


def videomae_inputs(config, settings, batch):
    """Input sets ``(clip [N, T, C, H, W], bool_masked_pos)``, VideoMAE's tube masking."""
    shape = (batch, config.num_frames, config.num_channels, config.image_size, config.image_size)
    return [
        (
            torch.randn(shape, device=settings.device),
            tube_mask(config, batch, VIDEOMAE_TUBE_MASK_RATIO).to(settings.device),
        )
        for _ in range(settings.input_sets)
    ]


@pytest.mark.benchmark(group="videomae train-step")
def test_videomae_train_step(benchmark, measure, settings, impl):
    benchmark.group = f"videomae train-step {VIDEOMAE_STEP_LABEL} n={STEP_BATCH}"
    eager_only(impl)

    def make_step(impl):
        model = videomae(impl, settings.device, **VIDEOMAE_STEP)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95))

        def step(pixel_values, bool_masked_pos):
            with settings.autocast():
                loss = model(pixel_values, bool_masked_pos=bool_masked_pos).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    inputs = videomae_inputs(videomae_config(**VIDEOMAE_STEP), settings, STEP_BATCH)
    measure(make_step, inputs, count_bytes=False)


VIDEOMAE_OPS = dict(num_hidden_layers=0, decoder_num_hidden_layers=0)  # no transformer layers


def _videomae_ops(impl, settings):
    return videomae(impl, settings.device, **VIDEOMAE_OPS)


@pytest.mark.benchmark(group="videomae encoder-input")
def test_videomae_encoder_input(benchmark, measure, settings, impl):
    eager_only(impl)

    def make_step(impl):
        embeddings = _videomae_ops(impl, settings).videomae.embeddings

        def step(pixel_values, bool_masked_pos):
            with settings.autocast():
                out = embeddings(pixel_values, bool_masked_pos)
            out.float().sum().backward()

        return step

    inputs = videomae_inputs(videomae_config(**VIDEOMAE_OPS), settings, _batch(settings))
    measure(make_step, inputs)


class _GivenLatent(torch.nn.Module):
    """Stands in for VideoMAE's encoder: returns the latent it was given, so that the model's
    forward runs from the encoder's output on."""

    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings
        self.latent = None

    def forward(self, pixel_values, bool_masked_pos=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=self.latent)


@pytest.mark.benchmark(group="videomae decoder-input+loss")
def test_videomae_decoder_input_and_loss(benchmark, measure, settings, impl):
    eager_only(impl)

    def make_step(impl):
        model = _videomae_ops(impl, settings)
        model.videomae = _GivenLatent(model.videomae.embeddings)

        def step(pixel_values, bool_masked_pos, latent):
            model.videomae.latent = latent
            with settings.autocast():
                loss = model(pixel_values, bool_masked_pos=bool_masked_pos).loss
            loss.backward()

        return step

    config = videomae_config(**VIDEOMAE_OPS)
    inputs = []
    for pixel_values, bool_masked_pos in videomae_inputs(config, settings, _batch(settings)):
        visible = int((~bool_masked_pos[0]).sum())
        width = config.hidden_size
        latent = torch.randn(len(pixel_values), visible, width, device=settings.device)
        inputs.append((pixel_values, bool_masked_pos, latent.requires_grad_()))
    measure(make_step, inputs)
