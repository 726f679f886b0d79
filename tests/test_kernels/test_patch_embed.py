"""Encoder input from kept patches only, against conv + pos + gather + cls, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from fastmae import functional
from tests.helpers import assert_close

CASES = [
    # n, c, (h, w), (ph, pw), width, ratio
    (2, 3, (8, 8), (4, 4), 16, 0.75),
    (3, 1, (6, 10), (2, 2), 20, 0.5),
    (5, 4, (12, 8), (4, 2), 12, 0.9),
    (7, 3, (20, 20), (2, 2), 24, 0.8),
]


def official_encoder_input(imgs, ids_restore, keep, weight, bias, cls_token, pos_embed):
    x = F.conv2d(imgs, weight, bias, stride=weight.shape[2:]).flatten(2).transpose(1, 2)
    x = x + pos_embed[:, 1:, :]
    ids_keep = torch.argsort(ids_restore, dim=1)[:, :keep]
    x = torch.gather(x, 1, ids_keep[..., None].repeat(1, 1, x.shape[-1]))
    cls = (cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)


@pytest.mark.parametrize("trainable_pos", [False, True], ids=["frozen-pos", "trainable-pos"])
@pytest.mark.parametrize("n,c,size,patch,width,ratio", CASES, ids=lambda v: str(v))
def test_embed_visible_patches(backend, n, c, size, patch, width, ratio, trainable_pos):
    length = (size[0] // patch[0]) * (size[1] // patch[1])
    keep = int(length * (1 - ratio))
    noise = torch.rand(n, length)
    ids_keep, ids_restore, _ = functional.random_masking_indices(noise, keep)
    leaves = [
        torch.randn(n, c, *size),
        torch.randn(width, c, *patch) * 0.2,
        torch.randn(width),
        torch.randn(1, 1, width),
        torch.randn(1, length + 1, width),
    ]
    for leaf, grad in zip(leaves, [True, True, True, True, trainable_pos]):
        leaf.requires_grad_(grad)
    twins = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    imgs, weight, bias, cls, pos = leaves
    out = functional.embed_visible_patches(imgs, ids_keep, weight, bias, cls, pos)
    ref = official_encoder_input(twins[0], ids_restore, keep, *twins[1:])
    assert out.shape == ref.shape == (n, keep + 1, width)
    assert_close(out, ref, "op")
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for name, leaf, twin in zip(["imgs", "weight", "bias", "cls", "pos"], leaves, twins):
        if twin.requires_grad:
            assert_close(leaf.grad, twin.grad, "op", name)
        else:
            assert leaf.grad is None


def test_output_dtype_follows_promotion(backend):
    imgs = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ids_keep, _, _ = functional.random_masking_indices(torch.rand(2, 4), 2)
    weight, bias = torch.randn(8, 3, 4, 4, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    out = functional.embed_visible_patches(
        imgs, ids_keep, weight, bias, torch.randn(1, 1, 8), torch.randn(1, 5, 8)
    )
    assert out.dtype == torch.float64
