"""Bad input gets a ValueError or TypeError that names what was expected and what came."""

import pytest
import torch

import fastmae
from fastmae import functional, reference
from tests.configs import TINY

MODELS = [reference.MaskedAutoencoderViT, fastmae.MaskedAutoencoderViT]


@pytest.fixture(params=MODELS, ids=["reference", "fastmae"])
def model(request):
    return request.param(img_size=8, patch_size=4, in_chans=3, **TINY)


@pytest.mark.parametrize(
    "imgs,error,message",
    [
        (torch.randn(2, 3, 8, 12), ValueError, r"imgs is 8x12 .* expects 8x8"),
        (torch.randn(2, 1, 8, 8), ValueError, r"1 channels, the model expects in_chans=3"),
        (torch.randn(3, 8, 8), ValueError, r"must be \[N, C, H, W\], got shape \(3, 8, 8\)"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError, r"floating-point .* torch.uint8"),
        ([[1.0]], TypeError, r"must be a torch.Tensor, got list"),
    ],
    ids=["size", "channels", "rank", "dtype", "not-a-tensor"],
)
def test_bad_images(model, imgs, error, message):
    with pytest.raises(error, match=message):
        model(imgs)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_mask_ratio_outside_unit_interval(model, ratio):
    with pytest.raises(ValueError, match=rf"mask_ratio must be in \[0, 1\), got {ratio}"):
        model(torch.randn(1, 3, 8, 8), mask_ratio=ratio)


def test_mask_ratio_not_a_number(model):
    with pytest.raises(TypeError, match=r"mask_ratio must be a real number .* got '0.5'"):
        model(torch.randn(1, 3, 8, 8), mask_ratio="0.5")


def test_noise_wrong_shape(model):
    with pytest.raises(
        ValueError, match=r"noise must have shape \[N, L\] = \[2, 4\], got \(2, 5\)"
    ):
        model(torch.randn(2, 3, 8, 8), noise=torch.rand(2, 5))


def test_noise_wrong_device(model):
    with pytest.raises(ValueError, match=r"noise is on meta, the images are on cpu"):
        model(torch.randn(2, 3, 8, 8), noise=torch.rand(2, 4, device="meta"))


def test_noise_wrong_dtype(model):
    with pytest.raises(
        TypeError, match=r"noise must be a floating-point tensor, got dtype torch.int64"
    ):
        model(torch.randn(2, 3, 8, 8), noise=torch.ones(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("cls", MODELS, ids=["reference", "fastmae"])
def test_constructor_rejects_indivisible_sizes(cls):
    with pytest.raises(ValueError, match=r"image width 10 is not divisible by the patch width 4"):
        cls(img_size=(8, 10), patch_size=4, **TINY)
    with pytest.raises(TypeError, match=r"img_size must be an int or an \(H, W\) pair"):
        cls(img_size=(8, 8, 8), patch_size=4, **TINY)


@pytest.mark.parametrize("patchify", [reference.patchify, functional.patchify])
def test_patchify_rejects_indivisible_images(patchify):
    with pytest.raises(ValueError, match=r"image size 8x10 \(H x W\) is not divisible by .* 4x4"):
        patchify(torch.randn(1, 3, 8, 10), 4)


def test_functional_loss_rejects_mismatched_pred():
    imgs = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"pred must have shape \[2, 4, 48\], got \[2, 4, 47\]"):
        functional.masked_pixel_loss(imgs, torch.randn(2, 4, 47), torch.ones(2, 4), 4)
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 4\], got \[2, 5\]"):
        functional.masked_pixel_loss(imgs, torch.randn(2, 4, 48), torch.ones(2, 5), 4)


def test_functional_masking_rejects_bad_len_keep():
    with pytest.raises(ValueError, match=r"len_keep must be in \[0, L=6\], got 7"):
        functional.random_masking_indices(torch.rand(2, 6), 7)


def test_functional_unshuffle_rejects_bad_ids():
    x = torch.randn(2, 3, 8)
    token, pos = torch.zeros(1, 1, 8), torch.zeros(1, 7, 8)
    with pytest.raises(
        TypeError, match=r"ids_restore must be an int64 or int32 tensor, got torch.float32"
    ):
        functional.unshuffle_tokens(x, torch.zeros(2, 6), token, pos)
    with pytest.raises(ValueError, match=r"pos_embed must have shape \[1, 7, 8\], got \[1, 6, 8\]"):
        functional.unshuffle_tokens(x, torch.zeros(2, 6, dtype=torch.long), token, pos[:, :6])


def test_backend_switch_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        fastmae.set_backend("cuda")


def test_functional_embed_rejects_bad_ids():
    imgs, weight = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4)
    args = (weight, torch.zeros(6), torch.zeros(1, 1, 6), torch.zeros(1, 5, 6))
    with pytest.raises(TypeError, match=r"ids_keep must be a torch.Tensor, got list"):
        functional.embed_visible_patches(imgs, [[0, 1]], *args)
    with pytest.raises(
        ValueError, match=r"ids_keep must have shape \[2, T\] with T <= 4, got \(2, 5\)"
    ):
        functional.embed_visible_patches(imgs, torch.zeros(2, 5, dtype=torch.long), *args)


def test_forward_decoder_checks_its_inputs(model):
    latent = torch.randn(2, 2, TINY["embed_dim"])
    with pytest.raises(ValueError, match=r"ids_restore must have shape \[2, 4\], got \(2, 5\)"):
        model.forward_decoder(latent, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be the latent \[N, 1\+K, 32\] with K <= 4"):
        model.forward_decoder(torch.randn(2, 6, TINY["embed_dim"]), torch.zeros(2, 4).long())


def test_forward_loss_checks_pred_and_mask(model):
    imgs = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"pred must have shape \[2, 4, 48\], got \[2, 4, 47\]"):
        model.forward_loss(imgs, torch.randn(2, 4, 47), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 4\], got \[2, 3\]"):
        model.forward_loss(imgs, torch.randn(2, 4, 48), torch.ones(2, 3))


@pytest.mark.parametrize("bad", [16, -1, 10**6], ids=["one-past", "negative", "huge"])
def test_forward_decoder_refuses_ids_out_of_range(bad):
    """As the official gather refuses them; fastmae's kernels would silently mask them."""
    model = fastmae.MaskedAutoencoderViT(img_size=8, patch_size=4, in_chans=3, **TINY)
    imgs = torch.randn(2, 3, 8, 8)
    latent, _, ids_restore = model.forward_encoder(imgs, 0.5)
    ids = ids_restore.clone()
    ids[1, 2] = bad
    with pytest.raises(
        ValueError, match=rf"forward_decoder: ids_restore\[1, 2\] = {bad} is outside"
    ):
        model.forward_decoder(latent, ids)


def test_forward_decoder_refuses_a_repeated_id():
    model = fastmae.MaskedAutoencoderViT(img_size=8, patch_size=4, in_chans=3, **TINY)
    imgs = torch.randn(2, 3, 8, 8)
    latent, _, ids_restore = model.forward_encoder(imgs, 0.5)
    ids = ids_restore.clone()
    ids[0, 1] = ids[0, 0]
    with pytest.raises(ValueError, match=r"forward_decoder: ids_restore\[0\] holds .* twice"):
        model.forward_decoder(latent, ids)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_images_of_another_dtype_name_both_dtypes(model, dtype):
    imgs = torch.randn(2, 3, 8, 8, dtype=dtype)
    with pytest.raises(TypeError, match=rf"imgs has dtype {dtype}, the model's parameters "):
        model(imgs)


def test_images_of_another_dtype_run_under_autocast(model):
    """Under autocast the official conv casts, and so does the fused path."""
    imgs = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = model(imgs)
    assert torch.isfinite(loss)
