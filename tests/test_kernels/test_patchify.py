"""patchify / unpatchify kernels against the official reshape-einsum, forward and backward."""

import pytest
import torch

from fastmae import functional, reference
from fastmae.kernels.patchify import gather_patches_op

SHAPES = [
    (2, 3, 8, 8, (4, 4)),
    (3, 1, 6, 10, (2, 2)),
    (5, 4, 12, 8, (4, 2)),
    (1, 3, 14, 21, (7, 7)),
]


@pytest.mark.parametrize("n,c,h,w,patch", SHAPES, ids=lambda v: str(v))
def test_patchify_forward_backward(backend, n, c, h, w, patch):
    imgs = torch.randn(n, c, h, w, requires_grad=True)
    ref_imgs = imgs.detach().clone().requires_grad_()
    out = functional.patchify(imgs, patch)
    ref = reference.patchify(ref_imgs, patch)
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(imgs.grad, ref_imgs.grad)


@pytest.mark.parametrize("n,c,h,w,patch", SHAPES, ids=lambda v: str(v))
def test_unpatchify_forward_backward(backend, n, c, h, w, patch):
    grid = (h // patch[0], w // patch[1])
    x = torch.randn(n, grid[0] * grid[1], patch[0] * patch[1] * c, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    out = functional.unpatchify(x, patch, grid)
    ref = reference.unpatchify(ref_x, patch, grid)
    assert torch.equal(out, ref) and out.shape == (n, c, h, w)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, ref_x.grad)


def test_patchify_noncontiguous_input(backend):
    imgs = torch.randn(2, 8, 8, 3).permute(0, 3, 1, 2)
    assert torch.equal(functional.patchify(imgs, 4), reference.patchify(imgs.contiguous(), 4))


def test_gather_reads_a_permuted_clip_in_place(backend):
    """Hugging Face's clips are [N, T, C, H, W]: the kept-tubelet gather reads the permuted
    view [N, C, T, H, W] as it reads a contiguous clip, forward and backward."""
    clip = torch.randn(2, 4, 3, 8, 12, requires_grad=True)  # [N, T, C, H, W]
    contiguous = clip.detach().permute(0, 2, 1, 3, 4).contiguous().requires_grad_()
    ids = torch.rand(2, 24).argsort(1)[:, :5]
    use_triton = backend == "triton"
    out = gather_patches_op(clip.permute(0, 2, 1, 3, 4), ids, [2, 2, 2], False, use_triton)
    ref = gather_patches_op(contiguous, ids, [2, 2, 2], False, use_triton)
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(clip.grad.permute(0, 2, 1, 3, 4), contiguous.grad)
