"""A full training step: forward, backward and AdamW, official / reference / fastmae rows (and
compile_blocks rows), same weights."""

from __future__ import annotations

import pytest
import torch

import fastmae
from fastmae import reference
from fastmae.layers import set_fused_attn


@pytest.mark.benchmark(group="train-step")
def test_train_step(benchmark, measure, settings, impl, model_name):
    benchmark.group = f"train-step {model_name} n={settings.step_batch}"
    module = fastmae if impl.startswith("fastmae") else reference
    torch.manual_seed(0)
    model = getattr(module, model_name)().to(settings.device)
    if impl == "official":  # what facebookresearch/mae runs: timm 0.3.2's attention arithmetic
        set_fused_attn(model, False)
    if impl.endswith("+compile_blocks"):
        fastmae.compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95))
    forward = torch.compile(model) if impl.endswith("+compile") else model
    size = model.patch_embed.img_size
    inputs = [
        (torch.randn(settings.step_batch, 3, *size, device=settings.device),)
        for _ in range(settings.input_sets)
    ]

    def step(imgs):
        with settings.autocast():
            loss, _, _ = forward(imgs, mask_ratio=0.75)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measure(step, inputs)
