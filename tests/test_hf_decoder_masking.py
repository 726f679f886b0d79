"""Decoder masking in fastmae.hf (``apply_fastmae(model, decoder_mask_ratio=...)``, VideoMAE's
``decoder_mask``): the patched ViTMAE and VideoMAE equal the plain-torch oracles of
``fastmae.hf.reference`` on the unpatched model, forward and backward, on both backends; the
oracles at no decoder masking are HF's own forwards; Trainer steps match; bad input is refused
naming the argument."""

import copy
import functools
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastmae.hf  # noqa: E402
from fastmae.hf import reference, videomae  # noqa: E402
from fastmae.hf.vitmae import _LOSS_METHOD  # noqa: E402
from tests.clients import assert_trainer_matches  # noqa: E402
from tests.configs import TINY_HF, TINY_VIDEOMAE  # noqa: E402
from tests.helpers import assert_as_accurate, assert_close, assert_tensors_match  # noqa: E402
from tests.test_hf_videomae import clip_and_mask, num_tubelets  # noqa: E402

NUM_PATCHES = (32 // 8) ** 2
needs_5x = pytest.mark.skipif(
    bool(_LOSS_METHOD), reason="ViTMAE decoder masking needs transformers 5 (tested below)"
)


def vitmae_twins(ratio, **overrides):
    """An HF ViTMAE and a deep copy patched with decoder masking at ``ratio``."""
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**{**TINY_HF, **overrides}))
    return hf, fastmae.hf.apply_fastmae(copy.deepcopy(hf), decoder_mask_ratio=ratio)


def videomae_twins(ratio=0.0, **overrides):
    config = transformers.VideoMAEConfig(**{**TINY_VIDEOMAE, **overrides})
    hf = transformers.VideoMAEForPreTraining(config)
    return hf, fastmae.hf.apply_fastmae(copy.deepcopy(hf), decoder_mask_ratio=ratio)


def outputs_and_grads(call, model, *inputs):
    """``call(model, *inputs)``'s output and the gradients of its loss (inputs' too)."""
    model.zero_grad()
    out = call(model, *inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"input{i}": x.grad for i, x in enumerate(inputs) if x.grad is not None})
    return out, grads


def patched(model, *inputs):
    return model(*inputs)


def assert_same(fused, oracle, fields=("loss", "logits")):
    (fused_out, fused_grads), (oracle_out, oracle_grads) = fused, oracle
    for field in fields:
        assert_close(getattr(fused_out, field), getattr(oracle_out, field), "model", field)
    assert_tensors_match(fused_grads, oracle_grads)


def lowest_noise_subset(bool_masked_pos, noise, decoded: int):
    """The ``decoded`` masked tubelets of lowest noise, per sample, as a bool mask."""
    chosen = torch.zeros_like(bool_masked_pos)
    for sample, (masked, values) in enumerate(zip(bool_masked_pos, noise)):
        candidates = masked.nonzero().squeeze(1)
        chosen[sample, candidates[values[candidates].argsort()[:decoded]]] = True
    return chosen


# -- ViTMAE ----------------------------------------------------------------------------------


@needs_5x
@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_vitmae_matches_the_oracle(backend, ratio, norm_pix):
    hf, fused = vitmae_twins(ratio, norm_pix_loss=norm_pix)
    pixel_values, noise = torch.randn(3, 3, 32, 32), torch.rand(3, NUM_PATCHES)
    oracle = functools.partial(reference.vitmae_pretraining, decoder_mask_ratio=ratio)
    fused_run = outputs_and_grads(patched, fused, pixel_values, noise)
    oracle_run = outputs_and_grads(oracle, hf, pixel_values, noise)
    assert_same(fused_run, oracle_run, ("loss", "logits", "mask", "ids_restore"))
    # pred is zero exactly where a removed patch was not decoded: M of the 12 removed are.
    decoded_removed = fused_run[0].logits.abs().sum(-1).ne(0) & fused_run[0].mask.bool()
    assert decoded_removed.sum(1).tolist() == [int(12 * (1 - ratio))] * 3


@needs_5x
@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
def test_vitmae_gradient_into_the_images(backend, norm_pix):
    """The images' gradient (through the normalised targets) equals the oracle's."""
    hf, fused = vitmae_twins(0.5, norm_pix_loss=norm_pix)
    pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, NUM_PATCHES)
    oracle = functools.partial(reference.vitmae_pretraining, decoder_mask_ratio=0.5)
    runs = []
    for call, model in ((patched, fused), (oracle, hf)):
        images = pixel_values.clone().requires_grad_()
        runs.append(outputs_and_grads(call, model, images, noise))
    assert "input0" in runs[1][1]
    assert_same(*runs)


@needs_5x
def test_vitmae_edge_ratios(backend):
    """Ratio 0 through apply_fastmae is HF's own step; a ratio that decodes no removed patch
    (M = int(12 * 0.05) = 0) gives loss 0 and HF's other gradients as the oracle has them."""
    pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, NUM_PATCHES)
    hf, fused = vitmae_twins(0.0)
    assert_same(
        outputs_and_grads(patched, fused, pixel_values, noise),
        outputs_and_grads(patched, hf, pixel_values, noise),
    )
    hf, fused = vitmae_twins(0.95)
    oracle = functools.partial(reference.vitmae_pretraining, decoder_mask_ratio=0.95)
    fused_run = outputs_and_grads(patched, fused, pixel_values, noise)
    assert fused_run[0].loss.item() == 0
    assert_same(fused_run, outputs_and_grads(oracle, hf, pixel_values, noise))


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
def test_the_oracles_without_decoder_masking_are_hf_forwards(norm_pix):
    """The oracles are HF's forwards plus the decoded subset: with every masked patch
    decoded they give HF's outputs and gradients."""
    if not _LOSS_METHOD:
        hf = vitmae_twins(0.0, norm_pix_loss=norm_pix)[0]
        pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, NUM_PATCHES)
        assert_same(
            outputs_and_grads(reference.vitmae_pretraining, hf, pixel_values, noise),
            outputs_and_grads(patched, hf, pixel_values, noise),
            ("loss", "logits", "mask", "ids_restore"),
        )
    hf = videomae_twins(norm_pix_loss=norm_pix)[0]
    pixel_values, mask = clip_and_mask(hf.config)
    assert_same(
        outputs_and_grads(reference.videomae_pretraining, hf, pixel_values, mask, mask),
        outputs_and_grads(patched, hf, pixel_values, mask),
    )


@needs_5x
def test_vitmae_bf16_autocast_within_the_oracle_own_error():
    hf, fused = vitmae_twins(0.5, norm_pix_loss=True)
    pixel_values, noise = torch.randn(4, 3, 32, 32), torch.rand(4, NUM_PATCHES)
    oracle = functools.partial(reference.vitmae_pretraining, decoder_mask_ratio=0.5)
    exact = oracle(copy.deepcopy(hf).double(), pixel_values.double(), noise.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, oracle_bf16 = fused(pixel_values, noise=noise), oracle(hf, pixel_values, noise)
    for field in ("loss", "logits"):
        args = (getattr(got, field), getattr(oracle_bf16, field), getattr(exact, field))
        assert_as_accurate(*args, torch.bfloat16, field, floor=False)


class _Images(torch.utils.data.Dataset):
    def __init__(self, count):
        self.images = torch.randn(count, 3, 32, 32)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"pixel_values": self.images[index]}


def oracle_model(model, forward):
    """The unpatched ``model`` whose forward is the oracle ``forward(model, ...)``."""
    model.forward = functools.partial(forward, model)
    return model


@needs_5x
@pytest.mark.parametrize("accumulation", [1, 2])
def test_vitmae_trainer_two_steps_match_the_oracle(backend, tmp_path, accumulation):
    """Both draw the noise from the Trainer's seeded stream at the same point."""
    pytest.importorskip("accelerate")
    hf, fused = vitmae_twins(0.5, norm_pix_loss=True)
    forward = functools.partial(reference.vitmae_pretraining, decoder_mask_ratio=0.5)
    oracle = oracle_model(hf, lambda model, pixel_values: forward(model, pixel_values))
    assert_trainer_matches(
        fused, oracle, _Images(4 * accumulation), tmp_path, accumulation, backend
    )


def test_vitmae_bad_ratios_and_calls_are_refused():
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**TINY_HF))
    for ratio, error in ((1.0, ValueError), (-0.1, ValueError), ("half", TypeError)):
        with pytest.raises(error, match="decoder_mask_ratio"):
            fastmae.hf.apply_fastmae(copy.deepcopy(hf), decoder_mask_ratio=ratio)
    encoder = transformers.ViTMAEModel(transformers.ViTMAEConfig(**TINY_HF))
    with pytest.raises(ValueError, match="decoder_mask_ratio needs a model with a decoder"):
        fastmae.hf.apply_fastmae(encoder, decoder_mask_ratio=0.5)
    assert fastmae.hf.apply_fastmae(encoder, decoder_mask_ratio=0.0) is encoder
    if _LOSS_METHOD:  # transformers 4.x
        with pytest.raises(ValueError, match="needs transformers 5"):
            fastmae.hf.apply_fastmae(copy.deepcopy(hf), decoder_mask_ratio=0.5)
        return
    fused = fastmae.hf.apply_fastmae(copy.deepcopy(hf), decoder_mask_ratio=0.5)
    with pytest.raises(ValueError, match="decoder_mask_ratio 0.5 needs pixel_values .* got a"):
        fused(torch.randn(2, 3, 32, 32), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="float64 tensor of shape"):
        fused(torch.randn(2, 3, 32, 32, dtype=torch.float64))


@needs_5x
def test_vitmae_ratio_travels_with_the_model_and_can_be_reset():
    hf, fused = vitmae_twins(0.75)
    pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, NUM_PATCHES)
    copied = copy.deepcopy(fused)
    assert_close(copied(pixel_values, noise=noise).loss, fused(pixel_values, noise=noise).loss)
    removed_decoded = copied(pixel_values, noise=noise).logits.abs().sum(-1).ne(0)
    assert removed_decoded.sum(1).tolist() == [4 + 3] * 2  # K = 4 kept, M = 3 decoded
    assert fused.state_dict().keys() == hf.state_dict().keys()
    fastmae.hf.apply_fastmae(copied)  # the default, 0, turns it off
    assert_close(copied(pixel_values, noise=noise).loss, hf(pixel_values, noise=noise).loss)


# -- VideoMAE --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "norm_pix, channels", [(False, 3), (True, 3), (True, 2)], ids=["pix", "normpix", "2ch"]
)
def test_videomae_decoder_mask_matches_the_oracle(backend, norm_pix, channels):
    hf, fused = videomae_twins(norm_pix_loss=norm_pix, num_channels=channels)
    pixel_values, mask = clip_and_mask(hf.config)
    decoder_mask = lowest_noise_subset(mask, torch.rand(mask.shape), 9)  # of 24 masked
    fused_run = outputs_and_grads(
        lambda model, *args: model(*args[:2], decoder_mask=args[2]),
        fused,
        pixel_values,
        mask,
        decoder_mask,
    )
    oracle_run = outputs_and_grads(
        reference.videomae_pretraining, hf, pixel_values, mask, decoder_mask
    )
    assert fused_run[0].logits.shape == (3, 9, 96 * channels // 3)
    assert_same(fused_run, oracle_run)


@pytest.mark.parametrize("ratio", [0.5, 0.99])
def test_videomae_ratio_decodes_the_masked_tubelets_of_lowest_noise(backend, ratio):
    """Without decoder_mask: the ``int(masked * (1 - ratio))`` masked tubelets of lowest
    ``torch.rand`` noise, drawn first in the forward (0.99: none, loss 0)."""
    hf, fused = videomae_twins(ratio)
    pixel_values, mask = clip_and_mask(hf.config)
    seed = torch.seed()
    fused_run = outputs_and_grads(patched, fused, pixel_values, mask)
    torch.manual_seed(seed)
    decoded = int(24 * (1 - ratio))
    decoder_mask = lowest_noise_subset(mask, torch.rand(mask.shape), decoded)
    oracle_run = outputs_and_grads(
        reference.videomae_pretraining, hf, pixel_values, mask, decoder_mask
    )
    assert fused_run[0].logits.shape == (3, decoded, 96)
    assert_same(fused_run, oracle_run)
    assert (fused_run[0].loss.item() == 0) == (decoded == 0)


def test_videomae_random_subset_is_uniform():
    """Over many draws each masked tubelet is decoded with probability M / masked: counts
    within 5 standard deviations of their binomial mean; a visible tubelet never."""
    model = videomae_twins(0.75)[1]
    _, mask = clip_and_mask(model.config, batch=1)
    draws, masked = 4000, int(mask.sum())
    decoded = int(masked * 0.25)
    counts = torch.zeros(mask.shape[1])
    for _ in range(draws):
        chosen, count = videomae._decoder_mask(
            model, None, mask, masked, None, torch.rand(mask.shape)
        )
        assert count == decoded
        counts += chosen[0]
    assert counts[~mask[0]].sum() == 0
    p = decoded / masked
    mean, std = draws * p, (draws * p * (1 - p)) ** 0.5
    assert (counts[mask[0]] - mean).abs().max() < 5 * std


def test_videomae_bf16_autocast_within_the_oracle_own_error():
    hf, fused = videomae_twins(norm_pix_loss=True)
    pixel_values, mask = clip_and_mask(hf.config, batch=4)
    decoder_mask = lowest_noise_subset(mask, torch.rand(mask.shape), 9)
    exact = reference.videomae_pretraining(
        copy.deepcopy(hf).double(), pixel_values.double(), mask, decoder_mask
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(pixel_values, mask, decoder_mask=decoder_mask)
        oracle_bf16 = reference.videomae_pretraining(hf, pixel_values, mask, decoder_mask)
    for field in ("loss", "logits"):
        args = (getattr(got, field), getattr(oracle_bf16, field), getattr(exact, field))
        assert_as_accurate(*args, torch.bfloat16, field, floor=False)


class _Clips(torch.utils.data.Dataset):
    """Clips with tube masks and a decoder mask of half the masked tubelets."""

    def __init__(self, model_config, count):
        self.clips, self.masks = clip_and_mask(model_config, batch=count, ratio=0.75, tube=True)
        self.decoder_masks = lowest_noise_subset(self.masks, torch.rand(self.masks.shape), 12)

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, index):
        return {
            "pixel_values": self.clips[index],
            "bool_masked_pos": self.masks[index],
            "decoder_mask": self.decoder_masks[index],
        }


@pytest.mark.parametrize("accumulation", [1, 2])
def test_videomae_trainer_two_steps_match_the_oracle(backend, tmp_path, accumulation):
    """decoder_mask comes in as a dataset column, which Trainer passes to forward."""
    pytest.importorskip("accelerate")
    hf, fused = videomae_twins(norm_pix_loss=True)
    oracle = oracle_model(
        hf,
        lambda model, pixel_values, bool_masked_pos, decoder_mask: reference.videomae_pretraining(
            model, pixel_values, bool_masked_pos, decoder_mask
        ),
    )
    dataset = _Clips(hf.config, 4 * accumulation)
    assert_trainer_matches(fused, oracle, dataset, tmp_path, accumulation, backend)


def test_videomae_forward_presents_decoder_mask():
    fused = videomae_twins()[1]
    parameter = inspect.signature(fused.forward).parameters["decoder_mask"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is None


def test_videomae_bad_decoder_masks_are_refused():
    hf, fused = videomae_twins()
    pixel_values, mask = clip_and_mask(hf.config)
    length = num_tubelets(hf.config)
    subset = lowest_noise_subset(mask, torch.rand(mask.shape), 6)
    cases = [
        (subset[:, :-1], ValueError, rf"decoder_mask must have shape \[3, {length}\], got"),
        (subset.float(), TypeError, "decoder_mask must be a bool tensor, got torch.float32"),
        (subset | ~mask, ValueError, f"only masked tubelets .* got {3 * (length - 24)} visible"),
        (subset & (torch.arange(3) > 0)[:, None], ValueError, "decoder_mask must mark the same"),
    ]
    for decoder_mask, error, message in cases:
        with pytest.raises(error, match=message):
            fused(pixel_values, mask, decoder_mask=decoder_mask)
    with pytest.raises(ValueError, match="decoder masking .* needs a call the fused path takes"):
        fused(pixel_values.double(), mask, decoder_mask=subset)
    encoder = transformers.VideoMAEModel(hf.config)
    with pytest.raises(ValueError, match="needs a model with a decoder"):
        fastmae.hf.apply_fastmae(encoder, decoder_mask_ratio=0.5)
