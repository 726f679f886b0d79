"""The oracle of :func:`fastmae.data.augment_batch`: one image through torchvision's tensor
transforms op for op, in plain torch (``resized_crop`` on uint8: crop, float32, bicubic
antialiased resize, clamp, round, uint8; ``hflip``; ``convert_image_dtype``; ``normalize``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmae.data.augment import Augmentation


def augment_image(
    image: torch.Tensor, box: tuple[int, int, int, int], flip: bool, augmentation: Augmentation
) -> torch.Tensor:
    """image: uint8 ``[3, H, W]``; box: ``(top, left, height, width)``. -> float32
    ``[3, *augmentation.size]``."""
    top, left, height, width = box
    crop = image[..., top : top + height, left : left + width].contiguous()
    resized = F.interpolate(
        crop[None].to(torch.float32),
        size=list(augmentation.size),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )
    resized = torch.round(resized.clamp(min=0, max=255)).to(torch.uint8)[0]
    if flip:
        resized = resized.flip(-1)
    pixels = resized.to(torch.float32) / 255
    mean = torch.as_tensor(augmentation.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(augmentation.std, dtype=torch.float32).view(-1, 1, 1)
    return (pixels - mean.to(pixels.device)) / std.to(pixels.device)
