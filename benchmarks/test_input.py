"""The input pipeline, group ``input``: images per second of one process, on JPEG files the
benchmark writes (ImageNet-like: 500x375 and 375x500, quality 90).

Rows (each times one batch of ``settings.batch`` files, read from the page cache):

- ``official``: what a DataLoader worker of facebookresearch/mae's main_pretrain.py does per
  batch: torchvision's ImageFolder loader (Pillow open, ``convert("RGB")``),
  ``transform_train`` (RandomResizedCrop(224, scale=(0.2, 1.0), bicubic), RandomHorizontalFlip,
  ToTensor, Normalize) and the default collate. Needs torchvision (skipped without it).
- ``fastmae``: :class:`fastmae.data.DataLoader`'s work in the loading process: the batch's
  bytes decoded on the device (nvJPEG on a GPU, Pillow on the CPU) and augmented there.
- ``fastmae workers``: what its workers do: read the files' bytes and collate them.

On a GPU, ``official`` is per CPU core, ``fastmae`` the time to make a batch there (ahead of
the step, in a thread beside it), and ``fastmae workers`` per CPU core. The summary turns these
and the train-step rows into CPU cores per GPU.
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest
import torch

from fastmae.data import DataLoader, ImageFolder
from fastmae.data.loader import _collate, _Indexed

SIZES = ((375, 500), (500, 375))  # ImageNet's most common shapes
# A batch of up to 128 files (a GPU's nvJPEG batch; the CPU's batch is settings.batch).
FILES_PER_CLASS = 64


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """Two classes of photo-like JPEGs (smooth colour with fine noise, about the entropy of a
    photo: about 105 kB each at quality 90, near ImageNet's mean file size)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("input")
    rng = np.random.default_rng(0)
    for c, (height, width) in enumerate(SIZES):
        os.makedirs(root / f"class{c}")
        for k in range(FILES_PER_CLASS):
            coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
            noise = rng.normal(0, 20, (height, width, 3))
            pixels = np.clip(smooth + noise, 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
            (root / f"class{c}" / f"{k}.JPEG").write_bytes(buffer.getvalue())
    return root


def official_pipeline(root):
    """-> ``batch(indices)``: facebookresearch/mae's dataset and transform, as a worker runs
    them."""
    datasets = pytest.importorskip("torchvision.datasets", reason="the official row")
    transforms = pytest.importorskip("torchvision.transforms", reason="the official row")
    transform_train = transforms.Compose(
        [
            transforms.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=3),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    dataset = datasets.ImageFolder(root, transform=transform_train)
    collate = torch.utils.data.default_collate
    return lambda indices: collate([dataset[i] for i in indices])


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("pipeline", ["official", "fastmae", "fastmae workers"])
@pytest.mark.benchmark(group="input")
def test_input(benchmark, settings, run_info, jpeg_folder, pipeline):
    count = 2 * FILES_PER_CLASS
    batch = min(settings.batch, count)
    dataset = ImageFolder(jpeg_folder)
    indexed = _Indexed(dataset)
    if pipeline == "official":
        step = official_pipeline(jpeg_folder)
    elif pipeline == "fastmae workers":

        def step(indices):
            return _collate([indexed[i] for i in indices])

    else:
        loader = DataLoader(dataset, batch_size=batch, device=settings.device, prefetch=False)
        encoded = {i: indexed[i] for i in range(count)}

        def step(indices):
            if settings.device.type == "cpu":  # one process on one core, as the official row
                with one_thread():
                    return loader._make(_collate([encoded[i] for i in indices]), epoch=0)
            out = loader._make(_collate([encoded[i] for i in indices]), epoch=0)
            torch.cuda.synchronize()
            return out

    order = np.random.default_rng(1).permutation(count).tolist()
    batches = [order[i : i + batch] for i in range(0, count - batch + 1, batch)]
    rounds = iter(range(10**9))
    benchmark.extra_info.update(run_info, impl=pipeline, bytes=None, paired=None, images=batch)
    for _ in range(settings.warmup):
        step(batches[next(rounds) % len(batches)])
    benchmark.pedantic(
        lambda index: step(batches[index % len(batches)]),
        setup=lambda: ((next(rounds),), {}),
        rounds=1 if benchmark.disabled else settings.rounds,
    )
