"""The official pre-training augmentation: RandomResizedCrop (bicubic, antialiased), a
horizontal flip and ImageNet normalisation, for a batch of decoded images of varying sizes.

The random draws follow torchvision's ``RandomResizedCrop.get_params`` and
``RandomHorizontalFlip`` rule; each sample's draws come from its own generator, seeded by
``(seed, epoch, index)``, so a sample's augmentation does not depend on the batch it lands in,
the number of loader workers or the rank that loads it. The pixels follow torchvision's tensor
path (``resized_crop`` on a uint8 image: crop, bicubic antialiased resize in float32, clamp to
[0, 255], round to uint8; ``hflip``; ``/ 255``; ``normalize``) op for op, so on the same device
and decoded image the output equals torchvision's bit for bit.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastmae._checks import to_2tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# facebookresearch/mae's main_pretrain.py: RandomResizedCrop(input_size, scale=(0.2, 1.0),
# interpolation=3 (bicubic)) with torchvision's default ratio, RandomHorizontalFlip() (p 0.5).
OFFICIAL_SCALE = (0.2, 1.0)
OFFICIAL_RATIO = (3 / 4, 4 / 3)
OFFICIAL_HFLIP = 0.5
# torchvision tries this many (area, aspect) draws before it falls back to a central crop.
CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class Augmentation:
    """The transform's settings; the defaults are the official pre-training ones.

    ``size``: output ``(height, width)``; ``scale``: the crop's area as a fraction of the
    image's, drawn uniformly in this range; ``ratio``: the crop's width/height, drawn
    log-uniformly; ``hflip``: the probability of a horizontal flip; ``mean``/``std``: per
    channel, on pixel values in [0, 1]."""

    size: tuple[int, int] = (224, 224)
    scale: tuple[float, float] = OFFICIAL_SCALE
    ratio: tuple[float, float] = OFFICIAL_RATIO
    hflip: float = OFFICIAL_HFLIP
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        object.__setattr__(self, "size", to_2tuple(self.size, "size"))
        low, high = _pair(self.scale, "scale")
        if not 0 < low <= high:
            raise ValueError(f"scale must satisfy 0 < low <= high, got {self.scale!r}")
        low, high = _pair(self.ratio, "ratio")
        if not 0 < low <= high:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio!r}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {self.hflip!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"mean and std must hold 3 values, std positive; got {self.mean!r}, {self.std!r}"
            )


def _pair(value, name: str) -> tuple[float, float]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    return float(value[0]), float(value[1])


def sample_generator(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one sample's draws: a function of ``(seed, epoch, index)`` only (a
    string seed is hashed with SHA-512, the same in every process)."""
    return random.Random(f"fastmae.data:{seed}:{epoch}:{index}")


def crop_box(
    height: int, width: int, scale, ratio, generator: random.Random
) -> tuple[int, int, int, int]:
    """-> ``(top, left, crop_height, crop_width)`` by torchvision's RandomResizedCrop rule: up
    to 10 draws of an area (uniform in ``scale`` times the image's) and an aspect ratio
    (log-uniform in ``ratio``), the first that fits placed uniformly; else a central crop of
    the image clamped to ``ratio``."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_ATTEMPTS):
        target_area = area * generator.uniform(scale[0], scale[1])
        aspect = math.exp(generator.uniform(log_low, log_high))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = generator.randint(0, height - h)
            left = generator.randint(0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw(
    height: int, width: int, seed: int, epoch: int, index: int, augmentation: Augmentation
) -> tuple[tuple[int, int, int, int], bool]:
    """One sample's crop box ``(top, left, h, w)`` and flip, from its own generator."""
    generator = sample_generator(seed, epoch, index)
    box = crop_box(height, width, augmentation.scale, augmentation.ratio, generator)
    return box, generator.random() < augmentation.hflip


def augment_batch(
    images: list[torch.Tensor],
    boxes: list[tuple[int, int, int, int]],
    flips: list[bool],
    augmentation: Augmentation,
) -> torch.Tensor:
    """Crop, resize, flip and normalise a batch.

    images: uint8 ``[3, H_i, W_i]`` tensors on one device (any strides); boxes and flips: one
    per image. Returns float32 ``[N, 3, *size]`` on that device. Each crop is converted to
    float32 alone (the rest of the image is never read), resized into its row of the output,
    and then the whole batch is clamped and rounded, flipped where drawn and normalised in
    place.
    """
    device = images[0].device if images else torch.device("cpu")
    out = torch.empty((len(images), 3, *augmentation.size), dtype=torch.float32, device=device)
    for row, image, (top, left, h, w) in zip(out, images, boxes):
        crop = image[:, top : top + h, left : left + w]
        # torchvision converts the crop view to a new contiguous float32 tensor; the resize's
        # summation follows the input's layout, so a channels-last decode is made contiguous.
        crop = crop.to(torch.float32, memory_format=torch.contiguous_format)
        row.copy_(resize(crop, augmentation.size))
    out.clamp_(0, 255).round_()
    flipped = [i for i, flip in enumerate(flips) if flip]
    if flipped:
        rows = torch.tensor(flipped, device=device)
        out[rows] = out[rows].flip(-1)
    return normalize_(out.div_(255), augmentation)


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float32 ``[C, h, w]`` -> ``[C, *size]``: bicubic, antialiased, as torchvision resizes a
    tensor (unclamped, unrounded)."""
    return F.interpolate(
        image[None], size=list(size), mode="bicubic", align_corners=False, antialias=True
    )[0]


def normalize_(images: torch.Tensor, augmentation: Augmentation) -> torch.Tensor:
    """``(images - mean) / std`` per channel, in place, as torchvision's ``normalize``."""
    mean = torch.as_tensor(augmentation.mean, dtype=images.dtype, device=images.device)
    std = torch.as_tensor(augmentation.std, dtype=images.dtype, device=images.device)
    return images.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
