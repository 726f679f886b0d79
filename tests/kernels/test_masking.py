"""Fused random masking against the official double argsort."""

import pytest
import torch

from fastmae import functional, reference

SHAPES = [(1, 4, 0.5), (3, 16, 0.75), (7, 49, 0.75), (5, 100, 0.8), (2, 196, 0.9), (4, 30, 0.0)]


@pytest.mark.parametrize("n,length,ratio", SHAPES, ids=lambda v: str(v))
def test_masking_matches_double_argsort(backend, n, length, ratio):
    noise = torch.rand(n, length)
    keep = int(length * (1 - ratio))
    ids_keep, ids_restore, mask = functional.random_masking_indices(noise, keep)
    x = torch.arange(n * length, dtype=torch.float32).view(n, length, 1)
    x_masked, ref_mask, ref_restore = reference.random_masking(x, ratio, noise)
    assert torch.equal(ids_restore, ref_restore)
    assert torch.equal(mask, ref_mask) and mask.dtype == ref_mask.dtype
    assert torch.equal(ids_keep, torch.argsort(noise, dim=1)[:, :keep])
    assert ids_keep.dtype == ids_restore.dtype == torch.int64


def test_ties_and_nan_still_give_a_permutation(backend):
    noise = torch.tensor([[0.5, 0.1, 0.5, float("nan"), 0.1, 0.9, float("nan"), 0.0]])
    ids_keep, ids_restore, mask = functional.random_masking_indices(noise, 3)
    # Stable order: 0.0 (7), 0.1 (1, 4), 0.5 (0, 2), 0.9 (5), NaN (3, 6).
    assert ids_restore.tolist() == [[3, 1, 4, 6, 2, 5, 7, 0]]
    assert ids_keep.tolist() == [[7, 1, 4]]
    assert mask.tolist() == [[1, 0, 1, 1, 0, 1, 1, 0]]


def test_noncontiguous_noise(backend):
    base = torch.rand(12, 5)
    noise = base.t()  # [5, 12], strided
    ids_keep, ids_restore, _ = functional.random_masking_indices(noise, 4)
    assert torch.equal(ids_restore, torch.argsort(torch.argsort(noise, 1), 1))
    assert torch.equal(ids_keep, torch.argsort(noise, 1)[:, :4])
