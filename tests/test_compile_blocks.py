"""fastmae.compile_blocks: each block through Inductor, the rest eager, equal to eager."""

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import fastmae
from fastmae import reference
from fastmae.layers import set_fused_attn
from tests.helpers import TINY, rel_err

CONFIG = dict(img_size=(8, 12), patch_size=2, in_chans=3, norm_pix_loss=True)
CONFIG.update(TINY, depth=3, decoder_depth=2)


def step(model, imgs, noise):
    model.zero_grad()
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    inner = getattr(model, "module", model)
    grads = {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
    return loss, pred, mask, grads


def assert_same(got, expected, tolerance):
    assert torch.equal(got[2], expected[2])
    assert rel_err(got[0], expected[0]) <= tolerance and rel_err(got[1], expected[1]) <= tolerance
    assert got[3].keys() == expected[3].keys()
    for name, grad in expected[3].items():
        assert rel_err(got[3][name], grad) <= tolerance, name


def test_compile_blocks_equals_eager_and_shares_graphs(tmp_path):
    torch._dynamo.reset()
    counters.clear()
    imgs, noise = torch.randn(3, 3, 8, 12), torch.rand(3, 24)
    for cls in (fastmae.MaskedAutoencoderViT, reference.MaskedAutoencoderViT):
        eager = cls(**CONFIG)
        compiled = cls(**CONFIG)
        compiled.load_state_dict(eager.state_dict())
        assert fastmae.compile_blocks(compiled) is compiled
        assert list(compiled.state_dict()) == list(eager.state_dict())
        assert_same(step(compiled, imgs, noise), step(eager, imgs, noise), 1e-5)
    # Five blocks of two shapes in each model: one graph per shape, shared by both models.
    assert counters["stats"]["unique_graphs"] == 2

    # Under bf16 autocast: within twice eager bf16's own error against fp32 (plus slack).
    oracle = step(eager, imgs, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_bf16, compiled_bf16 = step(eager, imgs, noise), step(compiled, imgs, noise)
    for got, same_dtype, expected in zip(compiled_bf16[:2], eager_bf16[:2], oracle[:2]):
        assert rel_err(got, expected) <= 2 * rel_err(same_dtype, expected) + 1e-3

    # Under DDP (one gloo process here; compile before wrapping).
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(compiled)
        assert (
            fastmae.compile_blocks(ddp) is ddp
        )  # finds the wrapped model; compiling again is harmless
        assert_same(step(ddp, imgs, noise), oracle, 1e-5)
    finally:
        dist.destroy_process_group()


def test_compile_blocks_refuses_other_models():
    with pytest.raises(TypeError, match=r"expects an MAE model with .blocks .* got Linear"):
        fastmae.compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("cls", [fastmae.MaskedAutoencoderViT, reference.MaskedAutoencoderViT])
def test_official_attention_arithmetic_matches_sdpa(cls):
    """The benchmarks' `official` row: timm 0.3.2's explicit attention, the same function."""
    model = cls(**CONFIG)
    imgs, noise = torch.randn(2, 3, 8, 12), torch.rand(2, 24)
    fused = step(model, imgs, noise)
    set_fused_attn(model, False)
    assert all(not block.attn.fused_attn for block in [*model.blocks, *model.decoder_blocks])
    assert_same(step(model, imgs, noise), fused, 1e-5)
