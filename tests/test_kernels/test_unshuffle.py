"""Decoder unshuffle against the official cat + gather + add, forward and backward."""

import pytest
import torch

from fastmae import _unchecked, functional, reference
from tests.helpers import assert_close

CASES = [(1, 4, 0.5, 8), (3, 16, 0.75, 24), (7, 49, 0.75, 20), (5, 100, 0.8, 12), (2, 30, 0.9, 130)]


@pytest.mark.parametrize("trainable_pos", [False, True], ids=["frozen-pos", "trainable-pos"])
@pytest.mark.parametrize("n,length,ratio,width", CASES, ids=lambda v: str(v))
def test_unshuffle_matches_official(backend, n, length, ratio, width, trainable_pos):
    keep = int(length * (1 - ratio))
    _, ids_restore, _ = functional.random_masking_indices(torch.rand(n, length), keep)
    leaves = [
        torch.randn(n, keep + 1, width, requires_grad=True),
        torch.randn(1, 1, width, requires_grad=True),
        torch.randn(1, length + 1, width, requires_grad=trainable_pos),
    ]
    twins = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    out = functional.unshuffle_tokens(leaves[0], ids_restore, *leaves[1:])
    ref = reference.unshuffle_tokens(twins[0], ids_restore, *twins[1:])
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(leaves[0].grad, twins[0].grad)
    assert_close(leaves[1].grad, twins[1].grad, "op")
    if trainable_pos:
        assert_close(leaves[2].grad, twins[2].grad, "op")


def test_mask_token_gradient_is_deterministic(backend):
    n, length, keep, width = 6, 49, 12, 20
    _, ids_restore, _ = functional.random_masking_indices(torch.rand(n, length), keep)
    x = torch.randn(n, keep + 1, width)
    token = torch.randn(1, 1, width, requires_grad=True)
    pos = torch.randn(1, length + 1, width)
    grad = torch.randn(n, length + 1, width)
    grads = []
    for _ in range(2):
        token.grad = None
        functional.unshuffle_tokens(x, ids_restore, token, pos).backward(grad)
        grads.append(token.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_shuffled_order_matches_videomae_decoder_input(backend, ratio):
    """Hugging Face VideoMAE's decoder input: the visible tokens then mask tokens, each plus
    the position of its tubelet, ``cat([x + pos[visible], mask_token + pos[masked]])``."""
    n, length, width = 3, 40, 12
    keep = int(length * (1 - ratio))
    ids_shuffle = torch.rand(n, length).argsort(1)
    ids_shuffle = torch.cat([ids_shuffle[:, :keep].sort(1).values, ids_shuffle[:, keep:]], 1)
    leaves = [
        torch.randn(n, keep, width, requires_grad=True),
        torch.randn(1, 1, width, requires_grad=True),
        torch.randn(1, length, width, requires_grad=True),
    ]
    twins = [t.detach().clone().requires_grad_() for t in leaves]
    out = _unchecked.unshuffle_tokens(
        leaves[0], ids_shuffle, *leaves[1:], has_cls=False, shuffled=True
    )
    x, mask_token, pos = twins
    positions = pos.expand(n, -1, -1).gather(1, ids_shuffle[..., None].expand(-1, -1, width))
    ref = torch.cat([x + positions[:, :keep], mask_token + positions[:, keep:]], 1)
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(leaves[0].grad, twins[0].grad)
    for leaf, twin in zip(leaves[1:], twins[1:]):
        assert_close(leaf.grad, twin.grad, "op")
