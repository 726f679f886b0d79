"""The augmentation: the batched path against the per-image oracle (torchvision's tensor op
sequence) bit for bit, the oracle against torchvision itself and against the official Pillow
pipeline, and the crop and flip draws against RandomResizedCrop's distribution."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.data import Augmentation, augment_batch, crop_box, draw
from fastmae.data.augment import sample_generator
from fastmae.data.reference import augment_image
from tests.images import decoded, jpeg, photo

OFFICIAL = Augmentation()


def random_boxes(rng, sizes, augmentation=OFFICIAL):
    return [
        draw(h, w, int(rng.integers(2**31)), 0, i, augmentation) for i, (h, w) in enumerate(sizes)
    ]


@pytest.mark.parametrize("size", [(224, 224), (32, 48)])
def test_batch_equals_the_oracle_bit_for_bit(fresh_seed, size):
    """Images of varying sizes (contiguous and channels-last, as Pillow's decode comes),
    random boxes and flips: every row equals the oracle's image exactly."""
    rng = np.random.default_rng(fresh_seed)
    augmentation = Augmentation(size=size)
    sizes = [tuple(int(v) for v in rng.integers(8, 300, 2)) for _ in range(6)]
    images = [torch.from_numpy(photo(rng, h, w)).permute(2, 0, 1) for h, w in sizes]
    images[::2] = [image.contiguous() for image in images[::2]]
    draws = random_boxes(rng, sizes, augmentation)
    boxes, flips = [box for box, _ in draws], [flip for _, flip in draws]
    flips[0], flips[1] = True, False  # both kinds, whatever the draws
    out = augment_batch(images, boxes, flips, augmentation)
    assert out.shape == (6, 3, *size) and out.dtype == torch.float32
    for row, image, box, flip in zip(out, images, boxes, flips):
        assert torch.equal(row, augment_image(image, box, flip, augmentation))


def test_a_wrong_box_or_flip_is_seen():
    """The comparisons above can fail: one pixel of box offset or a missing flip changes the
    output far beyond rounding."""
    rng = np.random.default_rng(0)
    image = torch.from_numpy(photo(rng, 120, 160)).permute(2, 0, 1)
    box = (10, 20, 80, 100)
    out = augment_image(image, box, False, OFFICIAL)
    shifted = augment_image(image, (10, 21, 80, 100), False, OFFICIAL)
    flipped = augment_image(image, box, True, OFFICIAL)
    assert (out - shifted).abs().mean() > 0.05 and (out - flipped).abs().mean() > 0.2


def official_pillow(data: bytes, box, flip: bool, augmentation=OFFICIAL) -> torch.Tensor:
    """facebookresearch/mae's transform_train on a Pillow image, as torchvision runs it for
    one: ``img.crop(box).resize(size, BICUBIC)``, ``transpose(FLIP_LEFT_RIGHT)``,
    ``ToTensor`` (/255) and ``Normalize``."""
    top, left, height, width = box
    image = Image.fromarray(decoded(data)).crop((left, top, left + width, top + height))
    image = image.resize(augmentation.size[::-1], Image.BICUBIC)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    mean = torch.tensor(augmentation.mean).view(3, 1, 1)
    return (pixels - mean) / torch.tensor(augmentation.std).view(3, 1, 1)


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in uint8 levels of the unnormalised image."""
    return ((a - b) * torch.tensor(OFFICIAL.std).view(3, 1, 1) * 255).abs()


def test_the_oracle_is_the_official_pillow_pipeline_within_rounding(fresh_seed):
    """Pillow's bicubic resize rounds and clips to uint8 between its horizontal and vertical
    passes and uses fixed-point weights; the tensor path rounds once. Stated tolerance:
    at most 3 levels anywhere (seen at clipped edges), under 0.3 level on average and under 1%
    of values more than 1 level off; a wrong box or flip is tens of levels off."""
    rng = np.random.default_rng(fresh_seed)
    for index in range(6):
        height, width = (int(v) for v in rng.integers(100, 400, 2))
        data = jpeg(rng, height, width)
        box, flip = draw(height, width, fresh_seed, 0, index, OFFICIAL)
        image = torch.from_numpy(decoded(data)).permute(2, 0, 1)
        diff = levels(augment_image(image, box, flip, OFFICIAL), official_pillow(data, box, flip))
        assert diff.max() <= 3 + 1e-3, (box, flip, diff.max())
        assert diff.mean() < 0.3 and (diff > 1 + 1e-3).float().mean() < 0.01


def test_the_oracle_equals_torchvision_resized_crop_hflip_normalize(fresh_seed):
    """Where torchvision is installed: ``resized_crop`` (bicubic, antialias) + ``hflip`` +
    ``convert_image_dtype`` + ``normalize`` of the same decoded image, bit for bit."""
    tf = pytest.importorskip("torchvision.transforms.functional")
    rng = np.random.default_rng(fresh_seed)
    for index in range(6):
        height, width = (int(v) for v in rng.integers(50, 400, 2))
        image = torch.from_numpy(photo(rng, height, width)).permute(2, 0, 1).contiguous()
        box, flip = draw(height, width, fresh_seed, 0, index, OFFICIAL)
        expected = tf.resized_crop(
            image, *box, [224, 224], tf.InterpolationMode.BICUBIC, antialias=True
        )
        expected = tf.hflip(expected) if flip else expected
        expected = tf.convert_image_dtype(expected, torch.float32)
        expected = tf.normalize(expected, list(OFFICIAL.mean), list(OFFICIAL.std))
        assert torch.equal(augment_image(image, box, flip, OFFICIAL), expected)


# -- the draws ------------------------------------------------------------------------------


def draws(height, width, count, seed, augmentation=OFFICIAL):
    return [draw(height, width, seed, 0, index, augmentation) for index in range(count)]


def accepted_moments(scale=OFFICIAL.scale, ratio=OFFICIAL.ratio, steps=2000):
    """For a square image (area 1): an attempt draws s ~ U(scale) and log r ~ U(log ratio) and
    fits iff s r <= 1 and s / r <= 1. -> (P(fit), E[s | fit], E[(log r)^2 | fit]) by the
    midpoint rule over the rectangle."""
    low, high = math.log(ratio[0]), math.log(ratio[1])
    total = mass = first = second = 0.0
    for i in range(steps):
        s = scale[0] + (scale[1] - scale[0]) * (i + 0.5) / steps
        for j in range(steps // 10):
            log_r = low + (high - low) * (j + 0.5) / (steps // 10)
            total += 1
            if s * math.exp(abs(log_r)) <= 1:
                mass += 1
                first += s
                second += log_r**2
    return mass / total, first / mass, second / mass


def test_crop_draws_follow_random_resized_crop(fresh_seed):
    """A 1000x1000 image, 20000 draws: every box inside the image; the area fraction and the
    log aspect ratio have the moments of RandomResizedCrop's accepted attempts (computed by
    integration, within 5 standard errors); the position is uniform over the places the box
    fits; the flips are fair."""
    side, count = 1000, 20000
    results = draws(side, side, count, fresh_seed)
    boxes = np.array([box for box, _ in results], dtype=np.float64)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= side).all() and (left + w <= side).all()
    _, mean_area, mean_log_sq = accepted_moments()
    area = h * w / side**2
    log_aspect = np.log(w / h)
    for values, expected in ((area, mean_area), (log_aspect, 0.0), (log_aspect**2, mean_log_sq)):
        standard_error = values.std() / math.sqrt(count)
        assert abs(values.mean() - expected) < 5 * standard_error + 2e-4, (values.mean(), expected)
    room = side - h
    placed = np.where(room > 0, top / np.maximum(room, 1), 0.5)
    assert abs(placed.mean() - 0.5) < 5 * math.sqrt(1 / 12 / count)
    assert abs((placed < 0.25).mean() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / count)
    flips = np.array([flip for _, flip in results], dtype=np.float64)
    assert abs(flips.mean() - 0.5) < 5 * math.sqrt(0.25 / count)


@pytest.mark.parametrize("height, width", [(100, 1000), (1000, 100)])
def test_an_image_no_crop_fits_gets_the_central_crop(height, width):
    """Aspect 10 (or 1/10): no attempt fits, so every draw is the fallback: the central crop
    clamped to the ratio range, as torchvision computes it."""
    expected_h, expected_w = (100, 133) if width > height else (133, 100)
    expected = ((height - expected_h) // 2, (width - expected_w) // 2, expected_h, expected_w)
    assert {box for box, _ in draws(height, width, 50, 3)} == {expected}


def test_draws_depend_on_seed_epoch_and_index_only():
    first = draw(375, 500, 7, 3, 11, OFFICIAL)
    assert draw(375, 500, 7, 3, 11, OFFICIAL) == first
    others = {draw(375, 500, *key, OFFICIAL) for key in [(8, 3, 11), (7, 4, 11), (7, 3, 12)]}
    assert first not in others
    generator = sample_generator(7, 3, 11)
    assert crop_box(375, 500, OFFICIAL.scale, OFFICIAL.ratio, generator) == first[0]


def test_crop_draws_match_torchvision_in_distribution(fresh_seed):
    """Where torchvision is installed: two-sample Kolmogorov-Smirnov tests of the box height,
    width and top against ``RandomResizedCrop.get_params`` on a 375x500 image (4000 draws
    each, rejected at the 0.1% level)."""
    transforms = pytest.importorskip("torchvision.transforms")
    count, height, width = 4000, 375, 500
    ours = np.array([box for box, _ in draws(height, width, count, fresh_seed)])
    image = torch.zeros(3, height, width)
    theirs = np.array(
        [
            transforms.RandomResizedCrop.get_params(
                image, list(OFFICIAL.scale), list(OFFICIAL.ratio)
            )
            for _ in range(count)
        ]
    )
    critical = math.sqrt(-math.log(0.001 / 2) / 2) * math.sqrt(2 / count)
    for column in range(4):
        a, b = np.sort(ours[:, column]), np.sort(theirs[:, column])
        grid = np.union1d(a, b)
        cdf_a = np.searchsorted(a, grid, side="right") / count
        cdf_b = np.searchsorted(b, grid, side="right") / count
        assert np.abs(cdf_a - cdf_b).max() < critical, column


def test_augmentation_settings_are_checked():
    with pytest.raises(TypeError, match="size must be an int or an"):
        Augmentation(size=(224,))
    with pytest.raises(ValueError, match="scale"):
        Augmentation(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="ratio"):
        Augmentation(ratio=(0, 1))
    with pytest.raises(ValueError, match="hflip"):
        Augmentation(hflip=1.5)
    assert Augmentation(size=96).size == (96, 96)
