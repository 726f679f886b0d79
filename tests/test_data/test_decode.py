"""Decoding: every file the official loader reads comes out as its ``convert("RGB")`` image;
a file it cannot read raises an error naming the file; nvJPEG gets only the files it decodes
as Pillow does."""

import numpy as np
import pytest
import torch

from fastmae.data import UndecodableImage, decode_batch
from fastmae.data.decode import device_decodable
from tests.images import decoded, encode, jpeg, photo


@pytest.fixture
def files(fresh_seed):
    """name -> encoded bytes: the kinds of file an ImageNet-like folder holds."""
    rng = np.random.default_rng(fresh_seed)
    image = photo(rng, 37, 53)
    return {
        "rgb": jpeg(rng, 41, 67),
        "progressive": encode(image, progressive=True),
        "grey": encode(image, mode="L"),
        "cmyk": encode(image, mode="CMYK"),
        "png": encode(image, format="PNG"),
        "png_grey_alpha": encode(image, mode="LA", format="PNG"),
    }


def test_every_kind_decodes_as_the_official_loader(files):
    names = list(files)
    images = decode_batch(
        [torch.frombuffer(bytearray(files[n]), dtype=torch.uint8) for n in names],
        names,
        torch.device("cpu"),
    )
    for name, image in zip(names, images):
        expected = torch.from_numpy(decoded(files[name])).permute(2, 0, 1)
        assert image.dtype == torch.uint8 and image.shape[0] == 3, name
        assert torch.equal(image, expected), name
    grey = images[names.index("grey")]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_only_plain_three_component_jpegs_go_to_the_device(files):
    decodable = {name for name, data in files.items() if device_decodable(data)}
    assert decodable == {"rgb", "progressive"}
    rgb = files["rgb"]
    assert not device_decodable(rgb[: len(rgb) // 2])  # truncated: Pillow names it
    assert not device_decodable(rgb + b"\x00" * 8)  # bytes after EOI: Pillow's business
    assert not device_decodable(b"")


@pytest.mark.parametrize("damage", ["truncated", "empty", "not an image"])
def test_an_undecodable_file_raises_naming_it(files, damage):
    data = {
        "truncated": files["rgb"][: len(files["rgb"]) // 2],
        "empty": b"",
        "not an image": b"hello, this is text\n" * 10,
    }[damage]
    encoded = [torch.frombuffer(bytearray(files["rgb"]), dtype=torch.uint8)]
    encoded.append(
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )
    with pytest.raises(UndecodableImage, match=r"cannot decode sample 1 \(bad\.JPEG\)"):
        decode_batch(encoded, ["sample 0 (good.JPEG)", "sample 1 (bad.JPEG)"], torch.device("cpu"))
