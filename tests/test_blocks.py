"""fastmae.compile_blocks and fastmae.checkpoint_blocks: whole-block transforms equal to eager."""

import pickle
from copy import deepcopy

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import fastmae
from fastmae import reference
from fastmae.layers import set_fused_attn
from tests.clients import DECODER_MASKED_FAMILIES, FAMILIES, family_step, make_family
from tests.configs import TINY_IMAGE
from tests.helpers import assert_as_accurate, assert_close, assert_tensors_match
from tests.multiprocess import fsdp2

CONFIG = dict(TINY_IMAGE, depth=3, decoder_depth=2)


def step(model, imgs, noise):
    model.zero_grad()
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    inner = getattr(model, "module", model)
    grads = {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
    return loss, pred, mask, grads


def assert_same(got, expected):
    assert torch.equal(got[2], expected[2])
    assert_close(got[0], expected[0])
    assert_close(got[1], expected[1])
    assert got[3].keys() == expected[3].keys()
    for name, grad in expected[3].items():
        assert_close(got[3][name], grad, "gradient", name)


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
        assert_same(step(compiled, imgs, noise), step(eager, imgs, noise))
    # Five blocks of two shapes in each model: one graph per shape, shared by both models.
    assert counters["stats"]["unique_graphs"] == 2

    # Under bf16 autocast: as accurate as eager bf16 against fp32.
    oracle = step(eager, imgs, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_bf16, compiled_bf16 = step(eager, imgs, noise), step(compiled, imgs, noise)
    for got, same_dtype, expected in zip(compiled_bf16[:2], eager_bf16[:2], oracle[:2]):
        assert_as_accurate(got, same_dtype, expected, torch.bfloat16)

    # Under DDP (one gloo process here; compile before wrapping).
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(compiled)
        assert (
            fastmae.compile_blocks(ddp) is ddp
        )  # finds the wrapped model; compiling again is harmless
        assert_same(step(ddp, imgs, noise), oracle)
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
    assert_same(step(model, imgs, noise), fused)


# -- checkpoint_blocks ---------------------------------------------------------------------------


def saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves (outside any checkpointed region) while
    ``step()`` runs."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


@pytest.mark.parametrize("mode", fastmae.blocks.CHECKPOINT_MODES)
@pytest.mark.parametrize("family_name", FAMILIES + DECODER_MASKED_FAMILIES)
def test_checkpoint_blocks_gives_the_same_gradients(family_name, mode, backend, fresh_seed):
    family = make_family(family_name)  # seeds its weights: reseed for fresh inputs
    torch.manual_seed(fresh_seed)
    imgs, noise = family.sample(3), torch.rand(3, family.noise_length)
    for model in (family.oracle, family.fused):  # the oracle is also a model users checkpoint
        keys = list(model.state_dict())
        plain_saved = saved_bytes(lambda m=model: family_step(family, m, imgs, noise))
        plain = family_step(family, model, imgs, noise)
        assert fastmae.checkpoint_blocks(model, mode) is model
        assert list(model.state_dict()) == keys
        checkpointed = family_step(family, model, imgs, noise)
        assert torch.equal(checkpointed[0], plain[0]) and torch.equal(checkpointed[1], plain[1])
        assert_tensors_match(checkpointed[2], plain[2], "op")
        # The blocks' activations are no longer saved by autograd: checkpointing is in force.
        checkpointed_saved = saved_bytes(lambda m=model: family_step(family, m, imgs, noise))
        assert checkpointed_saved < plain_saved / 2


@pytest.mark.parametrize("mode", fastmae.blocks.CHECKPOINT_MODES)
def test_checkpoint_blocks_under_autocast_and_copies(mode):
    family = make_family("image")
    imgs, noise = family.sample(3), torch.rand(3, family.noise_length)
    model = family.fused
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = family_step(family, model, imgs, noise)
        fastmae.checkpoint_blocks(model, mode)
        checkpointed = family_step(family, model, imgs, noise)
    assert torch.equal(checkpointed[0], plain[0])
    assert_tensors_match(checkpointed[2], plain[2], "op")
    # A copy checkpoints too (deepcopy, as Trainer and EMA do; pickle, as torch.save does).
    for copy in (deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(block.forward.args == (block, mode) for block in copy.blocks)


def test_checkpoint_blocks_composes_with_compile_blocks():
    family = make_family("image")
    imgs, noise = family.sample(3), torch.rand(3, family.noise_length)
    torch._dynamo.reset()
    eager = family_step(family, family.fused, imgs, noise)
    fastmae.checkpoint_blocks(family.fused, "selective")
    fastmae.compile_blocks(family.fused)
    compiled = family_step(family, family.fused, imgs, noise)
    assert_close(compiled[0], eager[0])
    assert_tensors_match(compiled[2], eager[2])


def test_checkpoint_blocks_refuses_bad_calls():
    with pytest.raises(ValueError, match=r"mode must be one of \('full', 'selective'\), got 'all'"):
        fastmae.checkpoint_blocks(make_family("image").fused, "all")
    with pytest.raises(TypeError, match=r"checkpoint_blocks expects an MAE model .* got Linear"):
        fastmae.checkpoint_blocks(torch.nn.Linear(2, 2))


def test_selective_checkpointing_needs_whole_blocks_under_fsdp2(tmp_path):
    """Sharding a module inside a block breaks the replay of selective checkpointing: a clear
    error, not torch's "not found in storage" in backward. Whole blocks work (tests/
    test_distributed.py)."""
    fully_shard, _ = fsdp2()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        family = make_family("image")
        fastmae.checkpoint_blocks(family.fused, "selective")
        fully_shard(family.fused.blocks[0].mlp)
        fully_shard(family.fused)
        with pytest.raises(RuntimeError, match=r"shard whole blocks .*or use mode=\"full\""):
            family.call(family.fused, family.sample(2))
    finally:
        dist.destroy_process_group()
