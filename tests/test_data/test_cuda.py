"""The loader on a CUDA GPU (skipped where there is none): nvJPEG against Pillow's decode,
the batched augmentation against the oracle on the same device, and whole batches made on the
prefetch stream while the training stream is busy."""

import numpy as np
import pytest
import torch

from fastmae.data import Augmentation, DataLoader, ImageFolder, augment_batch, decode_batch, draw
from fastmae.data.reference import augment_image
from tests.images import decoded, jpeg, photo, photo_tree

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def test_nvjpeg_decodes_as_pillow_within_rounding(fresh_seed):
    """Different IDCT and chroma upsampling: stated tolerance, under 1.5 levels on average
    (a wrong channel order or offset is tens of levels off)."""
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(fresh_seed)
    files = [jpeg(rng, int(h), int(w)) for h, w in rng.integers(64, 512, (8, 2))]
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
    images = decode_batch(encoded, [f"file {i}" for i in range(8)], CUDA)
    for data, image in zip(files, images):
        expected = torch.from_numpy(decoded(data)).permute(2, 0, 1)
        assert image.device.type == "cuda" and image.shape == expected.shape
        diff = (image.cpu().int() - expected.int()).abs().float()
        print(f"nvJPEG - Pillow: mean {diff.mean():.3f}, max {diff.max():.0f} levels")
        assert diff.mean() < 1.5


def test_batch_on_cuda_equals_the_oracle_on_cuda(fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    sizes = [tuple(int(v) for v in rng.integers(16, 600, 2)) for _ in range(16)]
    images = [torch.from_numpy(photo(rng, h, w)).permute(2, 0, 1).to(CUDA) for h, w in sizes]
    draws = [draw(h, w, fresh_seed, 0, i, Augmentation()) for i, (h, w) in enumerate(sizes)]
    boxes, flips = [box for box, _ in draws], [flip for _, flip in draws]
    out = augment_batch(images, boxes, flips, Augmentation())
    for row, image, box, flip in zip(out, images, boxes, flips):
        assert torch.equal(row, augment_image(image, box, flip, Augmentation()))
        cpu = augment_image(image.cpu(), box, flip, Augmentation())
        levels = ((row.cpu() - cpu) * torch.tensor(Augmentation().std).view(3, 1, 1) * 255).abs()
        assert levels.max() <= 1 + 1e-3  # CUDA's resize sums in another order


def test_prefetched_batches_are_ready_when_the_training_stream_uses_them(tmp_path, fresh_seed):
    """Two workers, pinned memory, the prefetch stream: each batch equals the oracle on the
    same decoded images, though the training stream is kept busy before every read."""
    photo_tree(tmp_path, np.random.default_rng(fresh_seed), classes=4, per_class=16)
    dataset = ImageFolder(tmp_path)
    loader = DataLoader(
        dataset,
        batch_size=16,
        num_workers=2,
        pin_memory=True,
        drop_last=True,
        device="cuda",
        input_size=224,
        seed=4,
        sampler=list(range(len(dataset))),
    )
    assert loader.prefetch and loader.device == torch.device("cuda", torch.cuda.current_device())
    busy = torch.randn(4096, 4096, device=CUDA)
    for step, (samples, targets) in enumerate(loader):
        for _ in range(20):
            busy = busy @ busy / busy.norm()
        indices = list(range(16 * step, 16 * step + 16))
        encoded = [dataset[i][0] for i in indices]
        images = decode_batch(encoded, [str(i) for i in indices], CUDA)
        for row, image, index in zip(samples, images, indices):
            box, flip = draw(image.shape[1], image.shape[2], 4, 0, index, loader.augmentation)
            assert torch.equal(row, augment_image(image, box, flip, loader.augmentation))
        assert targets.device.type == "cuda"
        assert targets.tolist() == [dataset.targets[i] for i in indices]


def test_decoding_does_not_overwrite_memory_that_queued_work_still_reads(fresh_seed):
    """Blocks of the decoded images' size are freed while reductions of them are still queued
    behind a long matrix product, then a batch is decoded on the same stream: the reductions
    must still see the values they were queued with (nvJPEG's hardware engine does not wait
    for the stream; pytorch/vision#9606)."""
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(fresh_seed)
    files = [jpeg(rng, 480, 640) for _ in range(8)]
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
    busy = torch.randn(8192, 8192, device=CUDA)
    for _ in range(10):
        shape = (3, 480, 640)
        blocks = [torch.randint(0, 256, shape, dtype=torch.uint8, device=CUDA) for _ in range(8)]
        expected = [int(b.sum()) for b in blocks]
        for _ in range(5):
            busy = busy @ busy / busy.norm()
        sums = [b.sum() for b in blocks]  # queued behind the products
        del blocks
        decode_batch(encoded, [str(i) for i in range(8)], CUDA)
        assert [int(s) for s in sums] == expected
