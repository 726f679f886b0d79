"""Fused masked pixel loss against the official loss, forward and backward."""

import pytest
import torch

from fastmae import _unchecked, functional, naive, reference
from tests.helpers import assert_close

CASES = [
    (2, 3, (8, 8), (4, 4)),
    (3, 1, (6, 10), (2, 2)),
    (5, 4, (12, 8), (4, 2)),
    (7, 3, (10, 6), (2, 2)),  # prime batch, odd 5 x 3 grid: one program per patch row
]


@pytest.mark.parametrize("imgs_grad", [False, True], ids=["", "imgs-grad"])
@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("n,c,size,patch", CASES, ids=lambda v: str(v))
def test_loss_matches_official(backend, n, c, size, patch, ratio, norm_pix, imgs_grad):
    length = (size[0] // patch[0]) * (size[1] // patch[1])
    keep = int(length * (1 - ratio))
    _, _, mask = functional.random_masking_indices(torch.rand(n, length), keep)
    imgs = torch.randn(n, c, *size, requires_grad=imgs_grad)
    pred = torch.randn(n, length, patch[0] * patch[1] * c, requires_grad=True)
    ref_imgs = imgs.detach().clone().requires_grad_(imgs_grad)
    ref_pred = pred.detach().clone().requires_grad_()
    loss = functional.masked_pixel_loss(imgs, pred, mask, patch, norm_pix)
    ref = reference.masked_pixel_loss(ref_imgs, ref_pred, mask, patch, norm_pix)
    assert loss.shape == ()
    assert_close(loss, ref, "op")
    (loss * 3.0).backward()
    (ref * 3.0).backward()
    assert_close(pred.grad, ref_pred.grad, "op")
    assert torch.all(pred.grad[mask == 0] == 0)
    if imgs_grad:
        assert_close(imgs.grad, ref_imgs.grad)


def test_weighted_mask(backend):
    imgs, pred = torch.randn(3, 2, 4, 6), torch.randn(3, 6, 8, requires_grad=True)
    mask = torch.rand(3, 6) * (torch.rand(3, 6) < 0.7)
    ref_pred = pred.detach().clone().requires_grad_()
    loss = functional.masked_pixel_loss(imgs, pred, mask, 2, True)
    ref = reference.masked_pixel_loss(imgs, ref_pred, mask, 2, True)
    assert_close(loss, ref, "op")
    loss.backward()
    ref.backward()
    assert_close(pred.grad, ref_pred.grad, "op")


def test_all_kept_mask_gives_zero_not_nan(backend):
    imgs, pred = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 48, requires_grad=True)
    loss = functional.masked_pixel_loss(imgs, pred, torch.zeros(2, 4), 4, True)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_pred_has_fp32_statistics(dtype):
    # 300^2 overflows fp16; the loss must still be the fp32 value.
    imgs = torch.randn(2, 3, 8, 8)
    pred = (torch.randn(2, 4, 48) * 300).to(dtype).requires_grad_()
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])
    loss = functional.masked_pixel_loss(imgs, pred, mask, 4, True)
    ref = reference.masked_pixel_loss(imgs, pred.detach().float(), mask, 4, True)
    assert torch.isfinite(loss)
    assert_close(loss, ref, "op")
    loss.backward()
    assert pred.grad.dtype == dtype and torch.isfinite(pred.grad).all()


def test_patch_too_large_for_one_block_is_refused():
    from fastmae.kernels import loss

    with pytest.raises(ValueError, match=r"at most 65536 pixels; got 65537"):
        loss.launch_config(65537)
    assert loss.launch_config(768)["BLOCK"] == 1024


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
def test_strided_pred_is_read_without_a_copy(backend, norm_pix):
    """The model's pred is the slice [:, 1:] of the decoder output: read with its strides."""
    n, length, pixels = 3, 4, 48
    decoder_out = torch.randn(n, length + 1, pixels, requires_grad=True)
    imgs = torch.randn(n, 3, 8, 8)
    mask = (torch.rand(n, length) < 0.6).float()
    mask[0, 0] = 1.0
    twin = decoder_out.detach().clone().requires_grad_()
    copies = []
    original = torch.Tensor.contiguous

    def record(self, *args, **kwargs):
        if not self.is_contiguous():
            copies.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    torch.Tensor.contiguous = record
    try:
        loss = functional.masked_pixel_loss(imgs, decoder_out[:, 1:], mask, 4, norm_pix)
        loss.backward()
    finally:
        torch.Tensor.contiguous = original
    assert copies == []
    expected = reference.masked_pixel_loss(imgs, twin[:, 1:].contiguous(), mask, 4, norm_pix)
    expected.backward()
    assert_close(loss, expected, "op")
    assert_close(decoder_out.grad, twin.grad, "op")


# -- Hugging Face VideoMAE's form: pred rows by ids, per-channel normalisation, un-normalised
# pixels, a [N, T, C, H, W] clip read as a permuted view --------------------------------------


@pytest.mark.parametrize("unnormalised", [False, True], ids=["", "unnormalised"])
@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("tubelet,channels", [(2, 3), (1, 3), (2, 1)], ids=lambda v: str(v))
def test_loss_by_ids_matches_its_plain_torch_form(
    backend, tubelet, channels, norm_pix, unnormalised
):
    """HF VideoMAE's loss against :func:`fastmae.naive.masked_pixel_loss_by_ids` (which
    ``tests/test_hf_decoder_masking.py`` holds against HF's own labels)."""
    n, frames, size, patch = 3, 4, 8, 4
    clip = torch.randn(n, frames, channels, size, size)
    length = frames // tubelet * (size // patch) ** 2
    masked = length * 3 // 4
    ids = torch.rand(n, length).argsort(1)[:, :masked].sort(1).values
    pixels = tubelet * patch * patch * channels
    pred = torch.randn(n, masked, pixels, requires_grad=True)
    ref_pred = pred.detach().clone().requires_grad_()
    unnormalise = torch.rand(2, channels) + 0.5 if unnormalised else None
    norm = "channel" if norm_pix else "none"
    loss = _unchecked.masked_pixel_loss_by_ids(
        clip.permute(0, 2, 1, 3, 4), pred, ids, (tubelet, patch, patch), norm, unnormalise
    )
    ref = naive.masked_pixel_loss_by_ids(
        clip.permute(0, 2, 1, 3, 4), ref_pred, ids, (tubelet, patch, patch), norm, unnormalise
    )
    assert_close(loss, ref, "op")
    (loss * 3.0).backward()
    (ref * 3.0).backward()
    assert_close(pred.grad, ref_pred.grad, "op")


def test_videomae_targets_refuse_an_images_gradient():
    from fastmae.kernels import loss as loss_kernels

    clip = torch.randn(2, 3, 4, 8, 8, requires_grad=True)  # [N, C, T, H, W]
    pred = torch.randn(2, 6, 96, requires_grad=True)
    ids = torch.arange(6).expand(2, -1)
    with pytest.raises(NotImplementedError, match=r"imgs needs a gradient.*pass imgs.detach\(\)"):
        loss_kernels.masked_pixel_loss_op(
            clip, pred, torch.ones(2, 6), ids, None, None, [2, 4, 4], "channel", False, False
        )
    with pytest.raises(ValueError, match=r"norm must be one of \('none', 'patch', 'channel'\)"):
        loss_kernels.masked_pixel_loss_op(
            clip.detach(),
            pred,
            torch.ones(2, 6),
            ids,
            None,
            None,
            [2, 4, 4],
            "tubelet",
            False,
            False,
        )
