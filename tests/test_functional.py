"""The public fused ops in their video forms (mae_st's tubelets), against the reference:
forward and backward on both backends, and a clear error for each wrong argument."""

import pytest
import torch

from fastmae import functional, reference
from tests.helpers import assert_close

TUBELET = (2, 4, 4)


def leaves(*tensors):
    """Two independent copies of each tensor, requiring grad."""
    first = [t.detach().clone().requires_grad_() for t in tensors]
    second = [t.detach().clone().requires_grad_() for t in tensors]
    return first, second


def assert_same_backward(out, ref, got_leaves, ref_leaves):
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for index, (got, want) in enumerate(zip(got_leaves, ref_leaves)):
        assert_close(got.grad, want.grad, "op", f"gradient of input {index}")


def test_video_patchify_and_unpatchify(backend):
    (clip,), (ref_clip,) = leaves(torch.randn(2, 3, 4, 8, 12))
    rows = functional.patchify(clip, TUBELET)
    expected = reference.patch_rows(ref_clip, TUBELET)
    assert rows.shape == (2, 2 * 2 * 3, 2 * 4 * 4 * 3) and torch.equal(rows, expected)
    assert_same_backward(rows, expected, [clip], [ref_clip])
    back = functional.unpatchify(rows.detach(), TUBELET, (2, 2, 3))
    assert torch.equal(back, clip.detach())


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
def test_video_loss_reads_the_target_frames(backend, norm_pix):
    clip = torch.randn(3, 1, 8, 8, 12)
    frames = torch.linspace(0, 7, 4).long()  # mae_st's pred_t_dim = 4 of 8 frames
    length, pixels = 2 * 2 * 3, 2 * 4 * 4 * 1
    _, _, mask = functional.random_masking_indices(torch.rand(3, length), 4)
    (pred, imgs), (ref_pred, ref_imgs) = leaves(torch.randn(3, length, pixels), clip)
    loss = functional.masked_pixel_loss(imgs, pred, mask, TUBELET, norm_pix, frames)
    ref = reference.masked_pixel_loss(ref_imgs, ref_pred, mask, TUBELET, norm_pix, frames)
    assert_close(loss, ref, "op")
    assert_same_backward(loss, ref, [pred, imgs], [ref_pred, ref_imgs])


@pytest.mark.parametrize("with_cls", [False, True], ids=["no-cls", "cls"])
def test_video_embedding_of_the_kept_tubelets(backend, with_cls):
    length, width = 8, 6
    ids_keep, _, _ = functional.random_masking_indices(torch.rand(2, length), 3)
    inputs = [torch.randn(2, 3, 4, 8, 8), torch.randn(width, 3, *TUBELET), torch.randn(width)]
    inputs.append(torch.randn(1, int(with_cls) + length, width))
    if with_cls:
        inputs.append(torch.randn(1, 1, width))
    got, want = leaves(*inputs)

    def run(embed, imgs, weight, bias, pos_embed, cls_token=None):
        return embed(imgs, ids_keep, weight, bias, cls_token, pos_embed)

    out = run(functional.embed_visible_patches, *got)
    ref = run(reference.embed_visible_patches, *want)
    assert out.shape == (2, int(with_cls) + 3, width)
    assert_close(out, ref, "op")
    assert_same_backward(out, ref, got, want)


@pytest.mark.parametrize("with_cls", [False, True], ids=["no-cls", "cls"])
def test_add_positions(backend, with_cls):
    ids_keep, _, _ = functional.random_masking_indices(torch.rand(3, 10), 4)
    inputs = [torch.randn(3, 4, 5), torch.randn(1, int(with_cls) + 10, 5)]
    if with_cls:
        inputs.append(torch.randn(1, 1, 5))
    got, want = leaves(*inputs)
    cls = (got[2], want[2]) if with_cls else (None, None)
    out = functional.add_positions(got[0], ids_keep, cls[0], got[1])
    ref = reference.add_positions(want[0], ids_keep, cls[1], want[1])
    assert_close(out, ref, "op")
    assert_same_backward(out, ref, got, want)


def test_unshuffle_without_a_cls_row(backend):
    _, ids_restore, _ = functional.random_masking_indices(torch.rand(2, 8), 3)
    got, want = leaves(torch.randn(2, 3, 6), torch.randn(1, 1, 6), torch.randn(1, 8, 6))
    out = functional.unshuffle_tokens(got[0], ids_restore, got[1], got[2], has_cls=False)
    ref = reference.unshuffle_tokens(want[0], ids_restore, want[1], want[2], has_cls=False)
    assert out.shape == (2, 8, 6)
    assert_close(out, ref, "op")
    assert_same_backward(out, ref, got, want)


CLIP = torch.zeros(2, 3, 4, 8, 8)
PRED, MASK = torch.zeros(2, 8, 96), torch.ones(2, 8)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: functional.patchify(CLIP, (4, 4)), TypeError, r"a \(T, H, W\) triple"),
        (lambda: functional.patchify(CLIP, (3, 4, 4)), ValueError, r"\(4, 8, 8\) is not divis"),
        (lambda: functional.patchify(CLIP[None], 4), ValueError, r"images \[N, C, H, W\] or vid"),
        (
            lambda: functional.masked_pixel_loss(
                CLIP, PRED, MASK, TUBELET, frames=torch.tensor([0, 4])
            ),
            ValueError,
            r"frames must lie in \[0, T=4\), got \[0, 4\]",
        ),
        (
            lambda: functional.masked_pixel_loss(
                CLIP[:, :, 0], PRED, MASK, 4, frames=torch.tensor([0])
            ),
            ValueError,
            r"frames is for videos",
        ),
        (
            lambda: functional.masked_pixel_loss(CLIP, PRED[:, :4], MASK, TUBELET),
            ValueError,
            r"pred must have shape \[2, 8, 96\], got \[2, 4, 96\]",
        ),
        (
            lambda: functional.embed_visible_patches(
                CLIP,
                torch.zeros(2, 3, dtype=torch.long),
                torch.zeros(6, 3, 4, 4),
                torch.zeros(6),
                None,
                torch.zeros(1, 8, 6),
            ),
            ValueError,
            r"weight must be \[D, C, u, ph, pw\] with C=3",
        ),
        (
            lambda: functional.unshuffle_tokens(
                torch.zeros(2, 3, 6),
                torch.zeros(2, 8, dtype=torch.long),
                torch.zeros(1, 1, 6),
                torch.zeros(1, 9, 6),
                has_cls=False,
                validate_ids=False,
            ),
            ValueError,
            r"pos_embed must have shape \[1, 8, 6\], got \[1, 9, 6\]",
        ),
        (
            lambda: functional.unpatchify(PRED, TUBELET, (2, 2)),
            TypeError,
            r"grid_size must be an int or a \(T, H, W\) triple",
        ),
    ],
    ids=[
        "pair-patch-on-video",
        "indivisible-clip",
        "6d-input",
        "frame-out-of-range",
        "frames-on-images",
        "pred-rows",
        "conv2d-weight-on-video",
        "unshuffle-positions",
        "grid-of-two",
    ],
)
def test_video_forms_refuse_bad_arguments_clearly(call, error, message):
    with pytest.raises(error, match=message):
        call()
