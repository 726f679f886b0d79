"""Small encoded image files that the data tests write themselves: photo-like RGB JPEGs of
varying sizes, and the awkward files an ImageNet-like folder holds (greyscale and CMYK JPEGs,
a PNG named .JPEG, truncated and empty files)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 ``[H, W, 3]``: smooth colour regions with noise, as a photo has (pure noise would
    make every resize difference an edge case)."""
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    noise = rng.integers(-12, 13, (height, width, 3))
    return np.clip(smooth.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, mode: str = "RGB", format: str = "JPEG", **options) -> bytes:
    """``array`` [H, W, 3] uint8 saved in ``mode`` (RGB, L, CMYK) and ``format``."""
    image = Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format, **({"quality": 90} if format == "JPEG" else {}) | options)
    return buffer.getvalue()


def jpeg(rng: np.random.Generator, height: int, width: int, **options) -> bytes:
    return encode(photo(rng, height, width), **options)


def write_tree(root, files: dict[str, bytes]) -> None:
    """files: relative path -> contents."""
    for relative, data in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(data)


def photo_tree(root, rng: np.random.Generator, classes: int = 3, per_class: int = 5) -> None:
    """An ImageFolder tree of RGB JPEGs, 24-80 px a side."""
    files = {}
    for c in range(classes):
        for k in range(per_class):
            height, width = (int(v) for v in rng.integers(24, 80, 2))
            files[f"class{c}/img{k}.JPEG"] = jpeg(rng, height, width)
    write_tree(root, files)


def decoded(data: bytes) -> np.ndarray:
    """The official loader's image: ``Image.open(f).convert("RGB")`` as uint8 [H, W, 3]."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))
