"""Decoding a batch of encoded images to uint8 ``[3, H, W]`` RGB tensors on a device.

On a CUDA device, plain JPEGs (baseline or progressive, three components, ending in an EOI
marker) go to nvJPEG in one batched call (``torchvision.io.decode_jpeg(..., device=...)``).
Every other file (greyscale, CMYK or Adobe-transformed JPEGs, PNGs and the like, files that
do not end where a JPEG ends), and every file on a CPU device, is decoded by Pillow and
converted to RGB exactly as torchvision's ``ImageFolder`` loader does
(``Image.open(f).convert("RGB")``). A file that cannot be decoded raises
:class:`UndecodableImage` naming it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

# Start-of-frame markers (JPEG's SOFn, n != 4, 8, 12): which coding process a file uses.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Baseline, extended sequential and progressive Huffman coding: what nvJPEG decodes.
_DEVICE_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2})
_APP14 = 0xEE  # Adobe's segment: colour transform flags, which Pillow honours


class UndecodableImage(ValueError):
    """An encoded file that Pillow cannot decode (truncated, empty, not an image)."""


def device_decodable(data: bytes) -> bool:
    """Whether nvJPEG can decode ``data`` as Pillow's ``convert("RGB")`` would: a JPEG with
    a baseline or progressive frame of three components, no Adobe segment, and an EOI marker
    at its end (a truncated file goes to Pillow, which names it)."""
    if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return False
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker == _APP14 and data[pos + 4 : pos + 9] == b"Adobe":
            return False
        if marker in _SOF_MARKERS:
            return marker in _DEVICE_SOF_MARKERS and pos + 9 < end and data[pos + 9] == 3
        if marker in (0xDA, 0xD9):  # a scan or the end before any frame
            return False
        pos += 2 + length
    return False


def decode_with_pillow(data: bytes, name: str) -> torch.Tensor:
    """-> uint8 ``[3, H, W]`` (a channels-last view) on the CPU; ``name`` goes into the
    error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UndecodableImage(
            f"fastmae.data: cannot decode {name} ({len(data)} bytes): {err}. A truncated or "
            "corrupt file stops the epoch, as it does in torchvision's ImageFolder; remove or "
            "replace it."
        ) from err
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def decode_batch(
    encoded: list[torch.Tensor], names: list[str], device: torch.device
) -> list[torch.Tensor]:
    """encoded: 1-D uint8 CPU tensors (pinned or not), one file each; names: for errors.
    Returns uint8 ``[3, H_i, W_i]`` RGB tensors on ``device``, in order."""
    payloads = [data.numpy().tobytes() for data in encoded]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    if device.type == "cuda":
        on_device = [i for i, data in enumerate(payloads) if device_decodable(data)]
        decoded = (
            _decode_jpeg_on_device([encoded[i] for i in on_device], device) if on_device else None
        )
        for i, image in zip(on_device, decoded or []):
            images[i] = image  # None where nvJPEG refused the file
    for i, image in enumerate(images):
        if image is None:
            images[i] = decode_with_pillow(payloads[i], names[i]).to(device)
    return images


def _decode_jpeg_on_device(encoded: list[torch.Tensor], device: torch.device):
    """nvJPEG through torchvision, the batch in one call; None without torchvision (warned
    once), when Pillow then decodes on the CPU."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        warnings.warn(
            "fastmae.data: torchvision is not installed, so JPEGs are decoded by Pillow on the "
            "CPU in the loading process; install the torchvision build that matches your torch "
            "for nvJPEG decoding on the GPU",
            stacklevel=3,
        )
        return None
    # nvJPEG's hardware engine writes its outputs without waiting for the work already queued
    # on the stream it is given, and the caching allocator hands that stream blocks freed
    # while queued kernels still read them: wait for the stream first (pytorch/vision#9606).
    # The decode synchronises the host with that stream before it returns anyway.
    torch.cuda.current_stream(device).synchronize()
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        # One file nvJPEG refuses fails the batched call; decode one by one so that only that
        # file goes to Pillow.
        images = []
        for data in encoded:
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
        return images
