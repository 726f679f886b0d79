"""Per-op groups, forward+backward at ViT-B/16 sizes (224 px, D 768, decoder 512, ratio 0.75).

Each group calls the models' own step for that op (reference vs fastmae), so the benchmark
times exactly what a training step runs. ``bytes`` is the least each fused op must move
through memory, forward plus backward (each input read once, each output written once).
"""

from __future__ import annotations

import pytest
import torch

import fastmae
from fastmae import reference

IMG, PATCH, WIDTH, DECODER_WIDTH, RATIO = 224, 16, 768, 512, 0.75
LENGTH = (IMG // PATCH) ** 2
KEEP = int(LENGTH * (1 - RATIO))
PIXELS = PATCH * PATCH * 3


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


def element_size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@pytest.mark.benchmark(group="masking+encoder-input")
def test_masking_encoder_input(benchmark, measure, settings, impl):
    model = op_model(impl, settings.device)
    n, device = settings.batch, settings.device
    inputs = [
        (
            torch.randn(n, 3, IMG, IMG, device=device),
            torch.rand(n, LENGTH, device=device),
            torch.randn(n, KEEP + 1, WIDTH, device=device),
        )
        for _ in range(settings.input_sets)
    ]
    embed = compiled(impl, lambda imgs, noise: model._embed_and_mask(imgs, RATIO, noise)[0])

    def step(imgs, noise, grad):
        with settings.autocast():
            x = embed(imgs, noise)
        x.backward(grad)

    pixels = n * KEEP * PIXELS * 4
    tokens = n * (KEEP + 1) * WIDTH * 4
    masking = n * LENGTH * (4 + 8 + 4) + n * KEEP * 8
    measure(step, inputs, bytes_moved=masking + 2 * pixels + 2 * tokens)


@pytest.mark.benchmark(group="decoder-unshuffle")
def test_decoder_unshuffle(benchmark, measure, settings, impl):
    model = op_model(impl, settings.device)
    n, device = settings.batch, settings.device
    x_dtype = settings.autocast_dtype or torch.float32
    inputs = []
    for _ in range(settings.input_sets):
        ids_restore = torch.argsort(torch.rand(n, LENGTH, device=device), dim=1).argsort(dim=1)
        x = torch.randn(
            n, KEEP + 1, DECODER_WIDTH, device=device, dtype=x_dtype, requires_grad=True
        )
        inputs.append((x, ids_restore, torch.randn(n, LENGTH + 1, DECODER_WIDTH, device=device)))
    unshuffle = compiled(impl, model._unshuffle)

    def step(x, ids_restore, grad):
        unshuffle(x, ids_restore).backward(grad)

    x_bytes = n * (KEEP + 1) * DECODER_WIDTH * element_size(x_dtype)
    out_bytes = n * (LENGTH + 1) * DECODER_WIDTH * 4
    measure(step, inputs, bytes_moved=2 * (x_bytes + out_bytes + n * LENGTH * 8))


@pytest.mark.benchmark(group="patchify")
def test_patchify(benchmark, measure, settings, impl):
    model = op_model(impl, settings.device)
    n, device = settings.batch, settings.device
    inputs = [
        (
            torch.randn(n, 3, IMG, IMG, device=device, requires_grad=True),
            torch.randn(n, LENGTH, PIXELS, device=device),
        )
        for _ in range(settings.input_sets)
    ]
    patchify = compiled(impl, model.patchify)

    def step(imgs, grad):
        patchify(imgs).backward(grad)

    measure(step, inputs, bytes_moved=4 * n * 3 * IMG * IMG * 4)


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
def test_loss(benchmark, measure, settings, impl, norm_pix):
    benchmark.group = "loss-normpix" if norm_pix else "loss-pix"
    model = op_model(impl, settings.device, norm_pix)
    n, device = settings.batch, settings.device
    pred_dtype = settings.autocast_dtype or torch.float32
    inputs = []
    for _ in range(settings.input_sets):
        mask = torch.ones(n, LENGTH, device=device)
        mask.scatter_(1, torch.rand(n, LENGTH, device=device).argsort(1)[:, :KEEP], 0.0)
        pred = torch.randn(n, LENGTH, PIXELS, device=device, dtype=pred_dtype, requires_grad=True)
        inputs.append((torch.randn(n, 3, IMG, IMG, device=device), pred, mask))
    loss_fn = compiled(impl, model.forward_loss)

    def step(imgs, pred, mask):
        loss_fn(imgs, pred, mask).backward()

    removed = n * (LENGTH - KEEP) * PIXELS
    pred_size = element_size(pred_dtype)
    # forward and backward each read the removed patches' pixels and predictions and the mask;
    # the backward writes every gradient row (zeros where kept).
    reads = 2 * (removed * (4 + pred_size) + n * LENGTH * 4)
    measure(step, inputs, bytes_moved=reads + n * LENGTH * PIXELS * pred_size)
