"""fastmae: Masked Autoencoder pre-training with fused Triton kernels.

``fastmae.MaskedAutoencoderViT`` is a drop-in for facebookresearch/mae's model;
``fastmae.reference`` is the pure-PyTorch oracle; ``fastmae.functional`` holds the fused ops;
``fastmae.hf`` (with transformers installed) puts them into Hugging Face's ViTMAE and VideoMAE;
``fastmae.data`` is the official pre-training input, decoded and augmented on the GPU.
"""

from fastmae import functional, reference
from fastmae.blocks import checkpoint_blocks, compile_blocks
from fastmae.checkpoint import load_checkpoint, save_checkpoint
from fastmae.dispatch import get_backend, set_backend, use_backend
from fastmae.model import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_base_patch16_dec512d8b,
    mae_vit_huge_patch14,
    mae_vit_huge_patch14_dec512d8b,
    mae_vit_large_patch16,
    mae_vit_large_patch16_dec512d8b,
)

__version__ = "0.1.0"

__all__ = [
    "MaskedAutoencoderViT",
    "checkpoint_blocks",
    "compile_blocks",
    "functional",
    "get_backend",
    "load_checkpoint",
    "mae_vit_base_patch16",
    "mae_vit_base_patch16_dec512d8b",
    "mae_vit_huge_patch14",
    "mae_vit_huge_patch14_dec512d8b",
    "mae_vit_large_patch16",
    "mae_vit_large_patch16_dec512d8b",
    "reference",
    "save_checkpoint",
    "set_backend",
    "use_backend",
]
