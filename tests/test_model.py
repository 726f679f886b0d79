"""The fused drop-in against the reference: same weights and noise, same loss, pred, mask and
parameter gradients (within tests.helpers.TOLERANCES), on both fused-op backends."""

import functools

import pytest
import torch

import fastmae
from fastmae import _checks, reference
from fastmae.base import make_factories
from fastmae.kernels import launch_counts
from fastmae.kernels._triton import fused_kernel_names
from tests.configs import TINY
from tests.helpers import assert_close, run_step

CONFIGS = {
    "rgb-square": dict(img_size=8, patch_size=2, in_chans=3),
    "gray-nonsquare": dict(img_size=(6, 10), patch_size=2, in_chans=1),
    "4ch-rect-patch": dict(img_size=(8, 12), patch_size=(4, 2), in_chans=4),
}


def twin_models(norm_pix=False, **config):
    ref = reference.MaskedAutoencoderViT(**config, **TINY, norm_pix_loss=norm_pix)
    fused = fastmae.MaskedAutoencoderViT(**config, **TINY, norm_pix_loss=norm_pix)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_drop_in_matches_reference(backend, config, ratio, norm_pix, fresh_seed):
    ref, fused = twin_models(norm_pix, **CONFIGS[config])
    size = ref.patch_embed.img_size
    imgs = torch.randn(3, ref.patch_embed.in_chans, *size)
    ref_out = run_step(ref, imgs, ratio, fresh_seed)
    fused_out = run_step(fused, imgs, ratio, fresh_seed)
    assert torch.equal(ref_out[2], fused_out[2])
    assert_close(fused_out[0], ref_out[0])
    assert_close(fused_out[1], ref_out[1])
    assert ref_out[3].keys() == fused_out[3].keys()
    assert "mask_token" in fused_out[3] and "cls_token" in fused_out[3]
    for name, grad in ref_out[3].items():
        assert_close(fused_out[3][name], grad, "gradient", name)
    if backend == "triton":
        assert fused_kernel_names() <= set(launch_counts())
    else:
        assert launch_counts() == {}


def test_truncated_len_keep_matches_reference(backend, fresh_seed):
    ref, fused = twin_models(**dict(img_size=20, patch_size=2, in_chans=1))
    imgs = torch.randn(2, 1, 20, 20)
    ref_out, fused_out = (
        run_step(ref, imgs, 0.8, fresh_seed),
        run_step(fused, imgs, 0.8, fresh_seed),
    )
    assert torch.equal(ref_out[2], fused_out[2]) and fused_out[2].sum().item() == 2 * 81
    assert_close(fused_out[0], ref_out[0])
    for name, grad in ref_out[3].items():
        assert_close(fused_out[3][name], grad, "gradient", name)


def test_gradients_are_bit_identical_between_runs(backend, fresh_seed):
    _, fused = twin_models(norm_pix=True, **CONFIGS["rgb-square"])
    imgs = torch.randn(5, 3, 8, 8)
    first = run_step(fused, imgs, 0.75, fresh_seed)
    second = run_step(fused, imgs, 0.75, fresh_seed)
    assert torch.equal(first[0], second[0])
    for name, grad in first[3].items():
        assert torch.equal(grad, second[3][name]), name


def test_mask_ratio_zero_gives_zero_loss_and_finite_grads(backend):
    _, fused = twin_models(**CONFIGS["rgb-square"])
    latent, mask, _ = fused.forward_encoder(torch.randn(2, 3, 8, 8), 0.0)
    assert latent.shape == (2, 17, TINY["embed_dim"]) and torch.all(mask == 0)
    loss, _, _ = fused(torch.randn(2, 3, 8, 8), mask_ratio=0.0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters() if p.grad is not None)


def test_explicit_noise_matches_reference(backend):
    ref, fused = twin_models(**CONFIGS["gray-nonsquare"])
    imgs, noise = torch.randn(2, 1, 6, 10), torch.rand(2, 15)
    ref_loss, ref_pred, ref_mask = ref(imgs, 0.6, noise=noise)
    loss, pred, mask = fused(imgs, 0.6, noise=noise)
    assert torch.equal(mask, ref_mask)
    assert_close(loss, ref_loss)
    assert_close(pred, ref_pred)


def test_official_method_names_match_reference(backend, fresh_seed):
    ref, fused = twin_models(**CONFIGS["4ch-rect-patch"])
    imgs = torch.randn(2, 4, 8, 12)
    assert torch.equal(fused.patchify(imgs), ref.patchify(imgs))
    patches = torch.randn(2, 12, 32)
    assert torch.equal(fused.unpatchify(patches), ref.unpatchify(patches))
    tokens = torch.randn(2, 12, 5)
    torch.manual_seed(fresh_seed)
    expected = ref.random_masking(tokens, 0.75)
    torch.manual_seed(fresh_seed)
    got = fused.random_masking(tokens, 0.75)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_state_dict_loads_both_ways():
    ref, fused = twin_models(**CONFIGS["rgb-square"])
    other = reference.MaskedAutoencoderViT(**CONFIGS["rgb-square"], **TINY)
    assert not other.load_state_dict(fused.state_dict(), strict=True).missing_keys
    for a, b in zip(other.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_no_kept_patch_at_all(backend, fresh_seed):
    # L = 4 with ratio 0.9 keeps int(0.4) = 0 patches: the encoder sees the cls token alone.
    ref, fused = twin_models(**dict(img_size=4, patch_size=2, in_chans=3))
    imgs = torch.randn(3, 3, 4, 4)
    ref_out, fused_out = (
        run_step(ref, imgs, 0.9, fresh_seed),
        run_step(fused, imgs, 0.9, fresh_seed),
    )
    assert torch.equal(fused_out[2], torch.ones(3, 4)) and torch.equal(ref_out[2], fused_out[2])
    assert_close(fused_out[0], ref_out[0])
    for name, grad in ref_out[3].items():
        assert_close(fused_out[3][name], grad, "gradient", name)


def test_forward_checks_the_images_once(monkeypatch, backend):
    """The drop-in validates its inputs at forward and runs the fused ops unchecked."""
    _, fused = twin_models(**CONFIGS["rgb-square"])
    calls = []
    original = _checks.check_images
    monkeypatch.setattr(_checks, "check_images", lambda *a: calls.append(a) or original(*a))
    fused(torch.randn(2, 3, 8, 8))
    assert len(calls) == 1


def test_factories_take_the_model_class_norm_layer():
    """A fused LayerNorm subclass, named once on the model class, reaches every norm through
    the factories and keeps the official state_dict keys and initialisation."""

    class TaggedLayerNorm(torch.nn.LayerNorm):
        pass

    class WithTaggedNorm(fastmae.MaskedAutoencoderViT):
        factory_norm_layer = functools.partial(TaggedLayerNorm, eps=1e-6)

    small = dict(img_size=8, patch_size=2, depth=1, decoder_depth=1, embed_dim=32, num_heads=2)
    torch.manual_seed(0)
    tagged = make_factories(WithTaggedNorm)[0](**small, decoder_embed_dim=16, decoder_num_heads=2)
    torch.manual_seed(0)
    official = fastmae.mae_vit_base_patch16(**small, decoder_embed_dim=16, decoder_num_heads=2)
    norms = [m for m in tagged.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 6 and all(isinstance(m, TaggedLayerNorm) and m.eps == 1e-6 for m in norms)
    assert all(not isinstance(m, TaggedLayerNorm) for m in official.modules())
    for (name, value), (other, expected) in zip(
        tagged.state_dict().items(), official.state_dict().items()
    ):
        assert name == other and torch.equal(value, expected), name
