"""A full training step: forward, backward and AdamW, official / reference / fastmae rows (and
decoder-masked and compile_blocks rows), same weights."""

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
