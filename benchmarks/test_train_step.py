"""A full training step: forward, backward and AdamW, official / reference / fastmae rows (and
decoder-masked and compile_blocks rows), same weights; and Hugging Face's ViTMAE-Base, unpatched
vs ``fastmae.hf.apply_fastmae``."""

from __future__ import annotations

import pytest
import torch

import fastmae
from benchmarks.conftest import decoder_mask_ratio, training_step
from fastmae import reference
from fastmae.config import IMAGE_SIZE
from fastmae.layers import set_fused_attn


@pytest.mark.benchmark(group="train-step")
def test_train_step(benchmark, measure, settings, impl, model_name):
    benchmark.group = f"train-step {model_name} n={settings.step_batch}"

    def make_step(impl):
        module = fastmae if impl.startswith("fastmae") else reference
        torch.manual_seed(0)
        model = getattr(module, model_name)(decoder_mask_ratio=decoder_mask_ratio(impl))
        model = model.to(settings.device)
        if impl == "official":  # what facebookresearch/mae runs: timm 0.3.2's attention
            set_fused_attn(model, False)
        if impl.endswith("+compile_blocks"):
            fastmae.compile_blocks(model)
        forward = torch.compile(model) if impl.endswith("+compile") else model
        return training_step(model, forward, settings)

    inputs = [
        (torch.randn(settings.step_batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=settings.device),)
        for _ in range(settings.input_sets)
    ]
    measure(make_step, inputs, count_bytes=False)


@pytest.mark.benchmark(group="vitmae train-step")
def test_vitmae_train_step(benchmark, measure, settings, impl):
    """HF's ViTMAEForPreTraining at its default (base) configuration, norm_pix_loss on."""
    transformers = pytest.importorskip("transformers")
    from fastmae.hf import apply_fastmae

    benchmark.group = f"vitmae train-step base n={settings.step_batch}"
    if impl.endswith("+compile"):
        pytest.skip("the Hugging Face groups time eager steps")

    def make_step(impl):
        torch.manual_seed(0)
        config = transformers.ViTMAEConfig(norm_pix_loss=True)
        model = transformers.ViTMAEForPreTraining(config).to(settings.device)
        if impl.startswith("fastmae"):
            apply_fastmae(model, decoder_mask_ratio=decoder_mask_ratio(impl))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95))

        def step(pixel_values):
            with settings.autocast():
                loss = model(pixel_values).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    inputs = [
        (torch.randn(settings.step_batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=settings.device),)
        for _ in range(settings.input_sets)
    ]
    measure(make_step, inputs, count_bytes=False)
