"""Per-op groups, forward+backward at ViT-B/16 sizes (224 px, D 768, decoder 512, ratio 0.75).

Each group times what a training step runs for that op, reference vs fastmae: the models'
``forward_encoder`` with no blocks (embedding, masking, cls, final LayerNorm), the decoder
unshuffle op, ``patchify`` and ``forward_loss``. ``bytes`` is what the fastmae step moves through
memory, forward plus backward, counted by :func:`benchmarks.account.count_bytes` from the
kernels' own byte counts (each input read once, each output written once) and the eager ops
around them; every row of a group is rated against that figure.
"""

from __future__ import annotations

import functools

import pytest
import torch

import fastmae
from fastmae import functional, reference
from fastmae.config import image_step

SIZES = image_step("mae_vit_base_patch16_dec512d8b")
IMG, PATCH, WIDTH, DECODER_WIDTH = (
    SIZES.img_size,
    SIZES.patch_size,
    SIZES.width,
    SIZES.decoder_width,
)
RATIO, LENGTH, KEEP, PIXELS = SIZES.mask_ratio, SIZES.length, SIZES.keep, SIZES.pixels


def op_model(impl: str, device, norm_pix=False):
    cls = (
        fastmae.MaskedAutoencoderViT
        if impl.startswith("fastmae")
        else reference.MaskedAutoencoderViT
    )
    torch.manual_seed(0)
    model = cls(
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=0,
        num_heads=12,
        decoder_embed_dim=DECODER_WIDTH,
        decoder_depth=0,
        norm_pix_loss=norm_pix,
    )
    return model.to(device)


def compiled(impl, fn):
    return torch.compile(fn) if impl.endswith("+compile") else fn


@pytest.mark.benchmark(group="masking+encoder-input")
def test_masking_encoder_input(benchmark, measure, settings, impl):
    n, device = settings.batch, settings.device
    inputs = [
        (
            torch.randn(n, 3, IMG, IMG, device=device),
            torch.rand(n, LENGTH, device=device),
            torch.randn(n, KEEP + 1, WIDTH, device=device),
        )
        for _ in range(settings.input_sets)
    ]

    def make_step(impl):
        model = op_model(impl, settings.device)
        embed = compiled(impl, lambda imgs, noise: model.forward_encoder(imgs, RATIO, noise)[0])

        def step(imgs, noise, grad):
            with settings.autocast():
                x = embed(imgs, noise)
            x.backward(grad)

        return step

    measure(make_step, inputs)


@pytest.mark.benchmark(group="decoder-unshuffle")
def test_decoder_unshuffle(benchmark, measure, settings, impl):
    n, device = settings.batch, settings.device
    x_dtype = settings.autocast_dtype or torch.float32
    inputs = []
    for _ in range(settings.input_sets):
        ids_restore = torch.argsort(torch.rand(n, LENGTH, device=device), dim=1).argsort(dim=1)
        x = torch.randn(
            n, KEEP + 1, DECODER_WIDTH, device=device, dtype=x_dtype, requires_grad=True
        )
        inputs.append((x, ids_restore, torch.randn(n, LENGTH + 1, DECODER_WIDTH, device=device)))

    def make_step(impl):
        model = op_model(impl, settings.device)
        tables = (model.mask_token, model.decoder_pos_embed)
        if impl.startswith("fastmae"):
            unshuffle = functools.partial(functional.unshuffle_tokens, validate_ids=False)
        else:
            unshuffle = reference.unshuffle_tokens
        unshuffle = compiled(impl, unshuffle)

        def step(x, ids_restore, grad):
            unshuffle(x, ids_restore, *tables).backward(grad)

        return step

    measure(make_step, inputs)


@pytest.mark.benchmark(group="patchify")
def test_patchify(benchmark, measure, settings, impl):
    n, device = settings.batch, settings.device
    inputs = [
        (
            torch.randn(n, 3, IMG, IMG, device=device, requires_grad=True),
            torch.randn(n, LENGTH, PIXELS, device=device),
        )
        for _ in range(settings.input_sets)
    ]

    def make_step(impl):
        patchify = compiled(impl, op_model(impl, settings.device).patchify)

        def step(imgs, grad):
            patchify(imgs).backward(grad)

        return step

    measure(make_step, inputs)


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
def test_loss(benchmark, measure, settings, impl, norm_pix):
    benchmark.group = "loss-normpix" if norm_pix else "loss-pix"
    n, device = settings.batch, settings.device
    pred_dtype = settings.autocast_dtype or torch.float32
    inputs = []
    for _ in range(settings.input_sets):
        mask = torch.ones(n, LENGTH, device=device)
        mask.scatter_(1, torch.rand(n, LENGTH, device=device).argsort(1)[:, :KEEP], 0.0)
        # pred as the model makes it: the slice [:, 1:] of the decoder output (cls row first)
        decoder_out = torch.randn(n, LENGTH + 1, PIXELS, device=device, dtype=pred_dtype)
        decoder_out.requires_grad_()
        inputs.append((torch.randn(n, 3, IMG, IMG, device=device), decoder_out, mask))

    def make_step(impl):
        loss_fn = compiled(impl, op_model(impl, settings.device, norm_pix).forward_loss)

        def step(imgs, decoder_out, mask):
            loss_fn(imgs, decoder_out[:, 1:], mask).backward()

        return step

    measure(make_step, inputs)
