"""The loader end to end on JPEG trees the tests write: each batch equals the oracle applied to
the official loader's decoded images with the sample's own draws; the same epoch gives the
same batches whatever the workers, prefetching or rank; the official training loop runs on it
with only the dataset and loader lines changed."""

import math
import threading

import numpy as np
import pytest
import torch

import fastmae
from fastmae.data import Augmentation, DataLoader, ImageFolder, UndecodableImage, draw
from fastmae.data.reference import augment_image
from tests.configs import TINY
from tests.helpers import assert_close
from tests.images import decoded, encode, photo, photo_tree, write_tree

SIZE = 16  # the tiny models' image size


@pytest.fixture
def dataset(tmp_path, fresh_seed):
    photo_tree(tmp_path, np.random.default_rng(fresh_seed), classes=3, per_class=5)
    return ImageFolder(tmp_path)


def expected_batch(dataset, indices, seed, epoch, augmentation):
    """The oracle's batch: each file decoded as the official loader does, its draws made from
    (seed, epoch, index), torchvision's op sequence applied."""
    rows = []
    for index in indices:
        data, _ = dataset[index]
        image = torch.from_numpy(decoded(data.numpy().tobytes())).permute(2, 0, 1)
        box, flip = draw(image.shape[1], image.shape[2], seed, epoch, index, augmentation)
        rows.append(augment_image(image, box, flip, augmentation))
    targets = torch.tensor([dataset.targets[i] for i in indices])
    return torch.stack(rows), targets


def batches_of(order, batch_size, drop_last):
    cut = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[i : i + batch_size] for i in range(0, cut, batch_size)]


def collect(loader):
    return [(samples.clone(), targets.clone()) for samples, targets in loader]


@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_equal_the_oracle(dataset, fresh_seed, drop_last):
    order = torch.randperm(len(dataset)).tolist()
    loader = DataLoader(
        dataset, batch_size=4, sampler=order, drop_last=drop_last, input_size=SIZE, seed=5
    )
    assert len(loader) == (3 if drop_last else 4)
    got = collect(loader)
    expected = batches_of(order, 4, drop_last)
    assert len(got) == len(expected)
    for (samples, targets), indices in zip(got, expected):
        want_samples, want_targets = expected_batch(dataset, indices, 5, 0, loader.augmentation)
        assert samples.device.type == "cpu" and samples.dtype == torch.float32
        assert torch.equal(samples, want_samples) and torch.equal(targets, want_targets)


def test_workers_and_prefetching_do_not_change_the_batches(dataset):
    """Two epochs with the same order: no workers and no prefetching, then two persistent
    workers with a prefetch thread: the same batches; the second epoch's differ from the
    first's."""
    order = list(range(len(dataset)))
    runs = []
    for workers, prefetch in [(0, False), (2, True)]:
        loader = DataLoader(
            dataset,
            batch_size=5,
            sampler=order,
            num_workers=workers,
            prefetch=prefetch,
            input_size=SIZE,
            seed=1,
            persistent_workers=workers > 0,
        )
        runs.append([collect(loader), collect(loader)])
    for epoch in range(2):
        for (a, ta), (b, tb) in zip(runs[0][epoch], runs[1][epoch]):
            assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])


def test_spawned_workers_give_the_same_batches(dataset):
    """Workers started by "spawn" (macOS's and Windows' default) unpickle the dataset and the
    loader's parts: the same batches as no workers."""
    order = list(range(len(dataset)))
    options = dict(batch_size=4, sampler=order, input_size=SIZE, seed=2)
    spawned = DataLoader(dataset, num_workers=2, multiprocessing_context="spawn", **options)
    for (a, ta), (b, tb) in zip(collect(spawned), collect(DataLoader(dataset, **options))):
        assert torch.equal(a, b) and torch.equal(ta, tb)


def test_epochs_follow_the_distributed_sampler(dataset):
    """Two ranks of DistributedSampler, as the official script makes them: each rank's batches
    are the oracle's for the indices its sampler gives in that epoch, and the ranks together
    cover the dataset. A pass without set_epoch (the official script's non-distributed run)
    draws anew; loader.set_epoch replays an epoch."""
    augmentation = Augmentation(size=SIZE)
    covered = set()
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=2, rank=rank, shuffle=True, seed=3
        )
        loader = DataLoader(
            dataset, sampler=sampler, batch_size=3, drop_last=True, input_size=SIZE, seed=9
        )
        seen = {}
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            order = list(sampler)
            covered.update(order)
            seen[epoch] = collect(loader)
            for (samples, targets), indices in zip(seen[epoch], batches_of(order, 3, True)):
                want_samples, want_targets = expected_batch(
                    dataset, indices, 9, epoch, augmentation
                )
                assert torch.equal(samples, want_samples) and torch.equal(targets, want_targets)
        again = collect(loader)  # the sampler still says epoch 1: this pass is epoch 2
        order = list(sampler)
        want, _ = expected_batch(dataset, order[:3], 9, 2, augmentation)
        assert torch.equal(again[0][0], want)
        loader.set_epoch(0)
        sampler.set_epoch(0)
        replay = collect(loader)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(replay, seen[0]))
    assert covered == set(range(len(dataset)))


def test_awkward_files_load_and_a_truncated_file_stops_with_its_name(tmp_path, fresh_seed):
    """Greyscale and CMYK JPEGs and a PNG named .JPEG come out as the official loader reads
    them; a truncated JPEG raises UndecodableImage naming its path, through two workers and
    the prefetch thread, at its batch."""
    rng = np.random.default_rng(fresh_seed)
    image = photo(rng, 30, 40)
    write_tree(
        tmp_path,
        {
            "a/grey.JPEG": encode(image, mode="L"),
            "a/cmyk.JPEG": encode(image, mode="CMYK"),
            "a/png.JPEG": encode(image, format="PNG"),
            "b/rgb.JPEG": encode(image),
        },
    )
    dataset = ImageFolder(tmp_path)
    loader = DataLoader(dataset, batch_size=2, input_size=SIZE, num_workers=2, prefetch=True)
    for (samples, _), indices in zip(collect(loader), batches_of(list(range(4)), 2, False)):
        assert torch.equal(samples, expected_batch(dataset, indices, 0, 0, loader.augmentation)[0])
    truncated = encode(image)
    (tmp_path / "b" / "truncated.JPEG").write_bytes(truncated[: len(truncated) // 2])
    dataset = ImageFolder(tmp_path)
    loader = DataLoader(dataset, batch_size=2, input_size=SIZE, num_workers=2, prefetch=True)
    batches = iter(loader)
    next(batches), next(batches)
    with pytest.raises(UndecodableImage, match=r"sample 4 \(.*b/truncated\.JPEG\).*(?i:truncated)"):
        next(batches)


def test_an_early_break_ends_the_prefetch_thread(dataset):
    def prefetch_threads():
        return [t for t in threading.enumerate() if t.name == "fastmae.data prefetch"]

    loader = DataLoader(dataset, batch_size=2, input_size=SIZE, num_workers=2, prefetch=True)
    for _ in loader:
        assert len(prefetch_threads()) == 1
        break
    assert prefetch_threads() == []


def test_loader_errors(dataset):
    with pytest.raises(TypeError, match="collate_fn"):
        DataLoader(dataset, collate_fn=lambda x: x)
    with pytest.raises(ValueError, match=r"input_size \(32, 32\) disagrees"):
        DataLoader(dataset, input_size=32, augmentation=Augmentation(size=16))
    with pytest.raises(ValueError, match="input_size must hold positive ints, got 0"):
        DataLoader(dataset, input_size=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        DataLoader(dataset, seed="0")
    with pytest.raises(ValueError, match="CPU or CUDA device"):
        DataLoader(dataset, device="meta")
    decoded_dataset = [(torch.zeros(3, 8, 8), 0)]
    with pytest.raises(TypeError, match=r"dataset\[0\]\[0\] must be a file's bytes.*float32"):
        next(iter(DataLoader(decoded_dataset)))
    with pytest.raises(TypeError, match=r"dataset\[0\] must be an \(encoded bytes, target\)"):
        next(iter(DataLoader([b"\xff\xd8"])))


def test_the_official_training_loop_runs_on_it(dataset, fresh_seed):
    """main_pretrain.py and engine_pretrain.train_one_epoch with only the dataset and loader
    lines changed: DistributedSampler, set_epoch each epoch, len(data_loader) in the lr
    schedule, ``samples.to(device, non_blocking=True)``, ``loss.item()``,
    ``loss /= accum_iter``. The losses equal the same loop's on the oracle's batches. (The
    loader is under test, not the kernels: the model runs on the torch backend.)"""
    accum_iter, epochs, blr = 2, 2, 1e-3
    config = dict(img_size=SIZE, patch_size=4, norm_pix_loss=True, **TINY)

    def run(batches_for):
        torch.manual_seed(fresh_seed)
        model = fastmae.MaskedAutoencoderViT(**config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=blr, betas=(0.9, 0.95))
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, seed=0)
        losses = []
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            batches = batches_for(sampler, epoch)
            for data_iter_step, (samples, _) in enumerate(batches):
                if data_iter_step % accum_iter == 0:  # adjust_learning_rate, per iteration
                    progress = data_iter_step / len(batches) + epoch
                    for group in optimizer.param_groups:
                        group["lr"] = blr * 0.5 * (1 + math.cos(math.pi * progress / epochs))
                samples = samples.to(torch.device("cpu"), non_blocking=True)
                loss, _, _ = model(samples, mask_ratio=0.75)
                losses.append(loss.item())
                loss /= accum_iter
                loss.backward()
                if (data_iter_step + 1) % accum_iter == 0:
                    optimizer.step()
                    optimizer.zero_grad()
        return torch.tensor(losses)

    loaders = {}

    def fastmae_batches(sampler, epoch):
        if "loader" not in loaders:
            loaders["loader"] = DataLoader(
                dataset,
                sampler=sampler,
                batch_size=4,
                num_workers=2,
                drop_last=True,
                input_size=SIZE,
                seed=0,
            )
        return loaders["loader"]

    def oracle_batches(sampler, epoch):
        # Each pass of a torch DataLoader draws one int64 from the global generator (its
        # workers' base seed), before the first batch: the masks depend on it.
        torch.empty((), dtype=torch.int64).random_()
        order = list(sampler)
        augmentation = Augmentation(size=SIZE)
        return [
            expected_batch(dataset, indices, 0, epoch, augmentation)
            for indices in batches_of(order, 4, True)
        ]

    with fastmae.use_backend("torch"):
        fused, oracle = run(fastmae_batches), run(oracle_batches)
    assert len(fused) == epochs * (len(dataset) // 4)
    assert_close(fused, oracle)
