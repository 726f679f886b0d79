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
# TINY in Hugging Face ViTMAE's names (image and patch sizes are the caller's).
TINY_VITMAE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    decoder_hidden_size=24,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=48,
)
# A tiny clip for the video MAE: 4 frames of 8 x 8, tubelets of 2 x 4 x 4 (8 tokens).
TINY_CLIP = dict(img_size=8, patch_size=4, num_frames=4, t_patch_size=2, pred_t_dim=2)


# Attention key biases: softmax ignores a shift shared by all keys, so their gradient is zero
# in exact arithmetic and rounding noise in any two implementations (names: fastmae video /
# mae_st, transformers 5.x, transformers 4.x).
ZERO_GRADIENT_SUFFIXES = ("attn.k.bias", "k_proj.bias", "attention.key.bias")


def assert_tensors_match(actual: dict, expected: dict, rtol: float = 1e-5) -> None:
    """Same names; each tensor within ``rtol`` relative error, except the attention key biases'
    gradients (and what SGD makes of them), which must both be negligible (< 1e-6)."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if name.endswith(ZERO_GRADIENT_SUFFIXES):
            assert value.norm() < 1e-6 and actual[name].norm() < 1e-6, name
        else:
            assert rel_err(actual[name], value) <= rtol, name


def run_step(model, imgs, ratio, seed):
    """One forward+backward under ``seed`` -> (loss, pred, mask, {name: gradient})."""
    torch.manual_seed(seed)
    model.zero_grad()
    loss, pred, mask = model(imgs, mask_ratio=ratio)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, pred, mask, grads
