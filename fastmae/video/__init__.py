"""fastmae for video: a drop-in for facebookresearch/mae_st's spatio-temporal MAE.

``fastmae.video.MaskedAutoencoderViT`` and the factories ``mae_vit_base_patch16``,
``mae_vit_large_patch16``, ``mae_vit_huge_patch14`` take mae_st's constructor and give its
``(loss, pred, mask)``, state_dict and masks under the same seed, on the image MAE's fused ops
in 3-D. ``fastmae.video.reference`` is the pure-PyTorch oracle.
"""

from fastmae.video import reference
from fastmae.video.model import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
)

__all__ = [
    "MaskedAutoencoderViT",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "reference",
]
