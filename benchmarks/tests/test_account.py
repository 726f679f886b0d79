"""python -m benchmarks.account: deterministic per-region counts that show the fused regions."""

import pathlib

import pytest
import torch

import fastmae
from benchmarks import account
from fastmae import reference
from fastmae.kernels import loss
from fastmae.kernels._triton import FUSED_OPS
from tests.configs import TINY, TINY_CLIP, TINY_IMAGE, TINY_VIDEOMAE

CONFIG = TINY_IMAGE


def tallies(decoder_mask_ratio=0.0):
    """The reference's and fastmae's tallies (fastmae's with ``decoder_mask_ratio``)."""
    out = {}
    for name, cls in (
        ("reference", reference.MaskedAutoencoderViT),
        ("fastmae", fastmae.MaskedAutoencoderViT),
    ):
        torch.manual_seed(0)
        options = {"decoder_mask_ratio": decoder_mask_ratio} if name == "fastmae" else {}
        model = cls(**CONFIG, **options)
        torch.manual_seed(1)
        imgs = torch.randn(4, 3, 8, 12)
        with fastmae.use_backend("torch"):
            out[name] = account.account_step(
                model, imgs, "fp32", account.PROFILES[account.DEFAULT_PROFILE]
            )
    return out


def assert_fused_regions_move_less(ref, fused) -> None:
    """The regions the fused ops replace move fewer bytes under fastmae; the transformer blocks,
    the same code in both, move the same (and some)."""

    def region_bytes(tally, region):
        return sum(v for (r, _), v in tally.bytes.items() if r == region)

    for region in account.FUSED_REGIONS:
        assert region_bytes(fused, region) < region_bytes(ref, region), region
    for region in ("encoder blocks", "decoder blocks"):
        assert region_bytes(fused, region) == region_bytes(ref, region) > 0, region


def test_accounting_is_deterministic_and_shows_the_fused_regions():
    first, second = tallies(), tallies()
    for name in first:
        for table in ("bytes", "flops", "saved"):
            assert dict(getattr(first[name], table)) == dict(getattr(second[name], table))
    ref, fused = first["reference"], first["fastmae"]
    assert_fused_regions_move_less(ref, fused)
    for region in ("encoder blocks", "decoder blocks"):  # the blocks are the same code
        assert fused.saved[region] == ref.saved[region], region
    assert any(kind == "fastmae fused op" for _, kind in fused.bytes)
    assert sum(fused.saved.values()) < sum(ref.saved.values())
    text = account.report("tiny", first, 4, "fp32", account.DEFAULT_PROFILE)
    for title in ("Saved activations", "Traffic and FLOPs by region", "by op type", "Modelled"):
        assert title in text


def test_decoder_masking_shrinks_the_decoder_in_proportion():
    """24 patches, 6 kept, 18 removed; at 0.5 the decoder sees 1 + 6 + 9 of 25 rows: its
    blocks' saved activations shrink in that proportion (each is a row-wise tensor), their
    FLOPs between it and its square (attention), the encoder's stay."""
    ref, fused = tallies(decoder_mask_ratio=0.5).values()
    rows = (1 + 6 + 9) / (1 + 24)
    assert fused.saved["decoder blocks"] == pytest.approx(rows * ref.saved["decoder blocks"])
    assert fused.saved["encoder blocks"] == ref.saved["encoder blocks"]

    def flops(tally, region):
        return sum(v for (r, _), v in tally.flops.items() if r == region)

    share = flops(fused, "decoder blocks") / flops(ref, "decoder blocks")
    assert rows**2 < share < rows
    assert flops(fused, "encoder blocks") == flops(ref, "encoder blocks")
    text = account.report("tiny", {"reference": ref, "fastmae": fused}, 4, "fp32", "h200", 0.5)
    assert "(reference -> fastmae with decoder_mask_ratio 0.5)" in text


def test_loss_kernel_bytes_count_the_patches_read():
    imgs, pred = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 48, dtype=torch.bfloat16)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 0]])
    args = (imgs, pred, mask, None, None, None, [4, 4], "patch", False, False)
    outputs = loss.masked_pixel_loss_op(*args)
    counted = FUSED_OPS["fastmae::masked_pixel_loss"].bytes(*args, outputs=outputs)
    removed = 3  # patches with a nonzero weight: pixels fp32 + pred bf16 each
    stats = 2 * 8 * 4  # mean and rstd of every patch slot, fp32
    state = 8 * 4 + 8 * 48 * 4  # the weights' copy and the residual of every patch slot, fp32
    assert counted == removed * 48 * (4 + 2) + mask.numel() * 4 + stats + 8 * 4 + state


def test_kernels_readme_byte_table_is_current():
    """fastmae/kernels/README.md's byte table is what the registered byte counts give today."""
    readme = pathlib.Path(account.__file__).parent.parent / "fastmae" / "kernels" / "README.md"
    text = readme.read_text()
    start, end = (text.index(marker) for marker in account.README_TABLE)
    printed = text[start + len(account.README_TABLE[0]) : end].strip()
    assert printed == account.fused_op_table(), "run python -m benchmarks.account --readme"


def test_video_step_accounting_shows_the_fused_regions():
    """A tiny mae_st model: the fused regions move fewer bytes, the blocks the same."""
    from fastmae import video

    config = dict(**TINY_CLIP, **TINY, sep_pos_embed=True, cls_embed=True, norm_pix_loss=True)
    tallies = {}
    for name, cls in (
        ("reference", video.reference.MaskedAutoencoderViT),
        ("fastmae", video.MaskedAutoencoderViT),
    ):
        torch.manual_seed(0)
        model = cls(**config)
        torch.manual_seed(1)
        clips = torch.randn(3, 3, 4, 8, 8)
        with fastmae.use_backend("torch"):
            profile = account.PROFILES[account.DEFAULT_PROFILE]
            tallies[name] = account.account_step(model, clips, "fp32", profile, 0.5)
    ref, fused = tallies["reference"], tallies["fastmae"]
    assert_fused_regions_move_less(ref, fused)
    assert "per clip" in account.report("video.tiny", tallies, 3, "fp32", account.DEFAULT_PROFILE)


def test_hf_videomae_step_is_counted_by_region():
    """HF VideoMAE (the unpatched model against apply_fastmae's): the fused regions move
    fewer bytes, the transformer blocks the same, and the report is per clip."""
    pytest.importorskip("transformers")

    tallies = {}
    for name in ("reference", "fastmae"):
        model, ratio = account.build(name, account.HF_VIDEOMAE, **TINY_VIDEOMAE)
        assert ratio == 0.9 and model.config.num_frames == 4
        clips = account.sample_batch(model, 2)
        assert clips.shape == (2, 4, 3, 16, 16)  # [N, T, C, H, W]
        with fastmae.use_backend("torch"):
            profile = account.PROFILES[account.DEFAULT_PROFILE]
            tallies[name] = account.account_step(model, clips, "fp32", profile, ratio)
    ref, fused = tallies["reference"], tallies["fastmae"]
    assert_fused_regions_move_less(ref, fused)
    assert fused.fused["fastmae::masked_pixel_loss"] > 0
    text = account.report(account.HF_VIDEOMAE, tallies, 2, "fp32", account.DEFAULT_PROFILE)
    assert "per clip" in text


def test_tube_mask_masks_the_same_patches_in_every_frame():
    import types

    config = types.SimpleNamespace(image_size=16, patch_size=4, num_frames=4, tubelet_size=2)
    mask = account.tube_mask(config, 3, 0.9)
    assert mask.shape == (3, 32) and mask.dtype == torch.bool
    assert torch.equal(mask[:, :16], mask[:, 16:])
    assert (mask.sum(1) == 2 * int(0.9 * 16)).all()


def test_checkpointed_saved_activations_are_what_checkpointing_keeps():
    """Under checkpoint_blocks, the saved activations are counted where checkpointing keeps
    them: "full" keeps each block's input (and the final norms save what they save in any
    mode); "selective" keeps more than "full" and less than eager."""
    torch.manual_seed(0)
    model = fastmae.MaskedAutoencoderViT(**CONFIG)
    imgs, batch = torch.randn(4, 3, 8, 12), 4
    saved = {}
    with fastmae.use_backend("torch"):
        for mode in ("eager", "full", "selective"):
            if mode != "eager":
                fastmae.checkpoint_blocks(model, mode)
            checkpoint = None if mode == "eager" else mode
            profile = account.PROFILES[account.DEFAULT_PROFILE]
            tally = account.account_step(model, imgs, "fp32", profile, 0.75, checkpoint, False)
            saved[mode] = dict(tally.saved)
    num_patches, kept = 24, 6  # an 8 x 12 image in patches of 2, ratio 0.75

    def kept_by_full(tokens, width, depth):
        # fp32: each block's input, then LayerNorm's input, mean and rstd
        return depth * batch * tokens * width * 4 + batch * tokens * (width + 2) * 4

    assert saved["full"]["encoder blocks"] == kept_by_full(1 + kept, 32, TINY["depth"])
    decoder_tokens, decoder_width = 1 + num_patches, TINY["decoder_embed_dim"]
    assert saved["full"]["decoder blocks"] == kept_by_full(
        decoder_tokens, decoder_width, TINY["decoder_depth"]
    )
    for region in ("encoder blocks", "decoder blocks"):
        assert saved["full"][region] < saved["selective"][region] < saved["eager"][region]
    for region in account.FUSED_REGIONS:  # outside the blocks nothing changes
        assert saved["full"][region] == saved["selective"][region] == saved["eager"][region]


def test_memory_plan_counts_states_and_batches():
    ranks = 4
    plan = account.memory_plan("mae_vit_base_patch16", ranks, img_size=32, depth=1, decoder_depth=1)
    model, _ = account.build(
        "fastmae", "mae_vit_base_patch16", img_size=32, depth=1, decoder_depth=1
    )
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.parameters == parameters
    # fp32 parameters, fp32 gradients, AdamW's two fp32 moments, sharded over the ranks
    assert plan.sharded == (4 * parameters + 12 * trainable) // ranks
    assert plan.per_image["full"] < plan.per_image["selective"] < plan.per_image["eager"]
    h100, h200 = account.GPU_MEMORY.values()
    for mode in account.MEMORY_MODES:
        batch = plan.largest_batch(h100, mode)
        per_image = plan.per_image[mode] + plan.working_per_image
        fixed = plan.sharded + plan.gathered
        assert fixed + batch * per_image <= account.USABLE_FRACTION * h100
        assert fixed + (batch + 1) * per_image > account.USABLE_FRACTION * h100
        assert plan.largest_batch(h200, mode) > batch


def test_readme_memory_table_is_current():
    """benchmarks/README.md's memory table is what python -m benchmarks.account --memory
    prints today (checked on its first row, the quickest to count)."""
    readme = (pathlib.Path(account.__file__).parent / "README.md").read_text()
    start, end = (readme.index(marker) for marker in account.MEMORY_TABLE)
    printed = readme[start + len(account.MEMORY_TABLE[0]) : end].strip().splitlines()
    first = next(iter(account.MEMORY_MODELS))
    expected = account.memory_table(models=[first]).splitlines()
    assert printed[: len(expected)] == expected, (
        "run python -m benchmarks.account --memory --readme"
    )
    assert len(printed) == len(expected) + len(account.MEMORY_MODELS) - 1
