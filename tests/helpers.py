"""Shared assertions and tiny model configurations for the tests."""

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, computed in float64; NaN anywhere fails."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    norm = expected.norm().item()
    return (actual - expected).norm().item() / (norm if norm > 0 else 1.0)


TINY = dict(
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=24,
    decoder_depth=1,
    decoder_num_heads=2,
    mlp_ratio=2.0,
)
