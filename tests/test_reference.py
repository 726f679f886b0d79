"""The reference MAE against the official semantics of facebookresearch/mae's models_mae.py
(constructor, state_dict, initialisation, masking draw, patch order, loss), point by point."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import fastmae
from fastmae import reference
from tests.configs import TINY

FACTORIES = {
    "base": (reference.mae_vit_base_patch16_dec512d8b, 16, 768, 12),
    "large": (reference.mae_vit_large_patch16_dec512d8b, 16, 1024, 24),
    "huge": (reference.mae_vit_huge_patch14_dec512d8b, 14, 1280, 32),
}
BLOCK_PARAMS = [
    ("norm1.weight", lambda d: [d]),
    ("norm1.bias", lambda d: [d]),
    ("attn.qkv.weight", lambda d: [3 * d, d]),
    ("attn.qkv.bias", lambda d: [3 * d]),
    ("attn.proj.weight", lambda d: [d, d]),
    ("attn.proj.bias", lambda d: [d]),
    ("norm2.weight", lambda d: [d]),
    ("norm2.bias", lambda d: [d]),
    ("mlp.fc1.weight", lambda d: [4 * d, d]),
    ("mlp.fc1.bias", lambda d: [4 * d]),
    ("mlp.fc2.weight", lambda d: [d, 4 * d]),
    ("mlp.fc2.bias", lambda d: [d]),
]


def expected_state_dict(patch, width, depth, img=224, chans=3, dec=512, dec_depth=8):
    tokens = (img // patch) ** 2 + 1
    entries = [
        ("cls_token", [1, 1, width]),
        ("pos_embed", [1, tokens, width]),
        ("mask_token", [1, 1, dec]),
        ("decoder_pos_embed", [1, tokens, dec]),
        ("patch_embed.proj.weight", [width, chans, patch, patch]),
        ("patch_embed.proj.bias", [width]),
    ]
    entries += [(f"blocks.{i}.{n}", s(width)) for i in range(depth) for n, s in BLOCK_PARAMS]
    entries += [("norm.weight", [width]), ("norm.bias", [width])]
    entries += [("decoder_embed.weight", [dec, width]), ("decoder_embed.bias", [dec])]
    entries += [
        (f"decoder_blocks.{i}.{n}", s(dec)) for i in range(dec_depth) for n, s in BLOCK_PARAMS
    ]
    entries += [("decoder_norm.weight", [dec]), ("decoder_norm.bias", [dec])]
    entries += [("decoder_pred.weight", [patch * patch * chans, dec])]
    entries += [("decoder_pred.bias", [patch * patch * chans])]
    return entries


@pytest.mark.parametrize("module", [reference, fastmae], ids=["reference", "fastmae"])
@pytest.mark.parametrize("size", list(FACTORIES))
def test_factory_state_dict_names_shapes_and_order(module, size):
    factory, patch, width, depth = FACTORIES[size]
    factory = getattr(module, factory.__name__)
    with torch.device("meta"):
        model = factory()
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected_state_dict(patch, width, depth)
    if size == "base":
        assert len(got) == 254
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    names = {name for name, _ in model.named_parameters()}
    assert {"pos_embed", "decoder_pos_embed"} <= names


def test_aliases_and_class_default_norm():
    assert reference.mae_vit_base_patch16 is reference.mae_vit_base_patch16_dec512d8b
    assert reference.mae_vit_large_patch16 is reference.mae_vit_large_patch16_dec512d8b
    assert reference.mae_vit_huge_patch14 is reference.mae_vit_huge_patch14_dec512d8b
    assert fastmae.mae_vit_base_patch16 is fastmae.mae_vit_base_patch16_dec512d8b
    model = reference.MaskedAutoencoderViT(img_size=8, patch_size=4, **TINY)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.LayerNorm))
    with torch.device("meta"):
        default = reference.MaskedAutoencoderViT()
    assert default.pos_embed.shape == (1, 197, 1024) and len(default.blocks) == 24


def sincos_by_formula(width, rows, cols):
    """Position table written from the paper's formula, independent of fastmae.layers."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    table = np.zeros((1 + rows * cols, width))
    for r in range(rows):
        for c in range(cols):
            table[1 + r * cols + c] = np.concatenate(
                [np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)]
            )
    return torch.from_numpy(table).float()


@pytest.mark.parametrize("img_size,grid", [(8, (2, 2)), ((8, 12), (2, 3)), ((16, 4), (4, 1))])
def test_initialisation(img_size, grid):
    # Wide enough (256) that the sample statistics below sit many standard errors from the bounds.
    wide = dict(TINY, embed_dim=256, decoder_embed_dim=256, depth=1)
    model = reference.MaskedAutoencoderViT(img_size=img_size, patch_size=4, in_chans=3, **wide)
    for param in (model.pos_embed, model.decoder_pos_embed):
        expected = sincos_by_formula(param.shape[-1], *grid)
        assert param.dtype == torch.float32
        assert torch.allclose(param[0], expected, atol=1e-6, rtol=0)
        assert torch.all(param[0, 0] == 0)
    weight = model.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (weight[0].numel() + weight.shape[0]))  # xavier on [D, C*p*p]
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    for token in (model.cls_token, model.mask_token):
        assert 0.015 < token.std() < 0.025
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
            assert module.weight.abs().max() <= math.sqrt(6.0 / (fan_in + fan_out))
            assert torch.all(module.bias == 0)
        if isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_same_seed_same_initial_weights():
    torch.manual_seed(3)
    first = reference.MaskedAutoencoderViT(img_size=8, patch_size=4, **TINY)
    torch.manual_seed(3)
    second = fastmae.MaskedAutoencoderViT(img_size=8, patch_size=4, **TINY)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_random_masking_is_the_official_draw(fresh_seed):
    x = torch.randn(5, 16, 8)
    torch.manual_seed(fresh_seed)
    x_masked, mask, ids_restore = reference.random_masking(x, 0.75)
    torch.manual_seed(fresh_seed)
    noise = torch.rand(5, 16)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(ids_restore, torch.argsort(ids_shuffle, dim=1))
    assert torch.equal(x_masked, x[torch.arange(5)[:, None], ids_shuffle[:, :4]])
    expected_mask = torch.ones(5, 16)
    expected_mask.scatter_(1, ids_shuffle[:, :4], 0.0)
    assert torch.equal(mask, expected_mask) and mask.dtype == torch.float32


def test_len_keep_truncates_like_the_official_code():
    # L = 100 with ratio 0.8: 100 * 0.2 = 19.999999999999996 in floats, so 19 are kept.
    model = reference.MaskedAutoencoderViT(img_size=20, patch_size=2, in_chans=1, **TINY)
    latent, mask, ids_restore = model.forward_encoder(torch.randn(2, 1, 20, 20), 0.8)
    assert latent.shape == (2, 20, TINY["embed_dim"])
    assert torch.equal(mask.sum(1), torch.full((2,), 81.0))
    assert sorted(ids_restore[0].tolist()) == list(range(100))


def test_patchify_order_and_round_trip():
    n, c, h, w, p = 2, 3, 8, 12, 4
    imgs = torch.randn(n, c, h, w)
    patches = reference.patchify(imgs, p)
    grid_w = w // p
    for _ in range(20):
        b, gh, gw = (torch.randint(0, k, ()).item() for k in (n, h // p, grid_w))
        i, j, ch = (torch.randint(0, k, ()).item() for k in (p, p, c))
        assert (
            patches[b, gh * grid_w + gw, (i * p + j) * c + ch]
            == imgs[b, ch, gh * p + i, gw * p + j]
        )
    assert torch.equal(reference.unpatchify(patches, p, (h // p, grid_w)), imgs)
    model = reference.MaskedAutoencoderViT(img_size=(h, w), patch_size=p, in_chans=c, **TINY)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


def loss_by_hand(imgs, pred, mask, p, norm_pix):
    """The MAE loss with explicit loops in float64."""
    n, c, h, w = imgs.shape
    grid_w = w // p
    total, weight = 0.0, 0.0
    for b in range(n):
        for token in range(pred.shape[1]):
            gh, gw = divmod(token, grid_w)
            target = [
                float(imgs[b, ch, gh * p + i, gw * p + j])
                for i in range(p)
                for j in range(p)
                for ch in range(c)
            ]
            if norm_pix:
                mean = sum(target) / len(target)
                var = sum((t - mean) ** 2 for t in target) / (len(target) - 1)
                target = [(t - mean) / math.sqrt(var + 1e-6) for t in target]
            err = sum((float(pred[b, token, k]) - t) ** 2 for k, t in enumerate(target))
            total += float(mask[b, token]) * err / len(target)
            weight += float(mask[b, token])
    return total / weight


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_matches_hand_computation(norm_pix):
    imgs = torch.randn(2, 2, 4, 6, dtype=torch.float64)
    pred = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = (torch.rand(2, 6) < 0.5).double()
    mask[0, 0] = 1.0
    got = reference.masked_pixel_loss(imgs, pred, mask, 2, norm_pix)
    assert got.item() == pytest.approx(loss_by_hand(imgs, pred, mask, 2, norm_pix), rel=1e-12)


def test_mask_ratio_zero_keeps_everything_and_loss_is_zero():
    model = reference.MaskedAutoencoderViT(img_size=8, patch_size=4, **TINY)
    imgs = torch.randn(3, 3, 8, 8)
    latent, mask, _ = model.forward_encoder(imgs, 0.0)
    assert latent.shape == (3, 5, TINY["embed_dim"]) and torch.all(mask == 0)
    loss, pred, mask = model(imgs, mask_ratio=0.0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_noise_replaces_the_draw(fresh_seed):
    model = reference.MaskedAutoencoderViT(img_size=8, patch_size=2, **TINY)
    imgs = torch.randn(2, 3, 8, 8)
    torch.manual_seed(fresh_seed)
    drawn = model(imgs)
    torch.manual_seed(fresh_seed)
    given = model(imgs, noise=torch.rand(2, 16))
    assert torch.equal(drawn[2], given[2]) and torch.equal(drawn[0], given[0])
