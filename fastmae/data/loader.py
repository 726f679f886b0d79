"""The loader: workers read file bytes; the loading process decodes each batch on the device
and augments it there, yielding ``(samples, targets)`` on the device."""

from __future__ import annotations

import contextlib
import queue
import threading

import torch

from fastmae._checks import describe, to_2tuple
from fastmae.data.augment import Augmentation, augment_batch, draw
from fastmae.data.decode import decode_batch
from fastmae.data.folder import byte_tensor

# Batches made ahead of the one being used, when prefetching.
PREFETCH_DEPTH = 2


class DataLoader:
    """A ``torch.utils.data.DataLoader`` whose batches come decoded and augmented on
    ``device``: float32 ``samples [N, 3, *size]`` and int64 ``targets [N]``.

    The arguments the official ``main_pretrain.py`` passes keep their meaning (``sampler``,
    ``batch_size``, ``num_workers``, ``pin_memory``, ``drop_last``), and so do the rest of
    torch's (``shuffle``, ``persistent_workers``, ``prefetch_factor``, ...), but for
    ``collate_fn`` and ``batch_sampler``, which this class owns. ``dataset[i]`` must give
    ``(encoded bytes, target)``, as :class:`fastmae.data.ImageFolder` does; its workers only
    read files.

    ``input_size`` is the output's side (or ``augmentation`` gives every setting; its defaults
    are the official ones). Each sample's crop and flip are drawn from ``(seed, epoch, index)``
    alone, so they do not depend on the batch, the workers or the rank. ``epoch`` is the
    sampler's ``epoch`` when it changes (``DistributedSampler.set_epoch``, as the official
    script calls it each epoch), else one more than the last pass's (the first pass is the
    sampler's epoch, or 0); :meth:`set_epoch` sets it for the next pass.

    ``prefetch`` (default: on a CUDA device) makes the next batches in a background thread,
    on their own CUDA stream, while the current one trains.
    """

    def __init__(
        self,
        dataset,
        batch_size: int = 1,
        shuffle: bool | None = None,
        sampler=None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        *,
        device: torch.device | str | None = None,
        input_size: int | tuple[int, int] | None = None,
        augmentation: Augmentation | None = None,
        seed: int = 0,
        prefetch: bool | None = None,
        **dataloader_kwargs,
    ):
        for owned in ("collate_fn", "batch_sampler"):
            if owned in dataloader_kwargs:
                raise TypeError(
                    f"fastmae.data.DataLoader makes its own {owned}; pass sampler, batch_size "
                    "and drop_last instead"
                )
        if input_size is not None:
            input_size = to_2tuple(input_size, "input_size")
        if augmentation is None:
            augmentation = Augmentation(size=224 if input_size is None else input_size)
        elif input_size is not None and input_size != augmentation.size:
            raise ValueError(
                f"input_size {input_size!r} disagrees with augmentation.size "
                f"{augmentation.size!r}; give one of them"
            )
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.dataset = dataset
        self.augmentation = augmentation
        self.seed = seed
        self.device = _resolve(device)
        self.prefetch = self.device.type == "cuda" if prefetch is None else bool(prefetch)
        self._loader = torch.utils.data.DataLoader(
            _Indexed(dataset),
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=pin_memory and self.device.type == "cuda",
            drop_last=drop_last,
            **dataloader_kwargs,
        )
        self._epoch: int | None = None  # the last pass's
        self._next_epoch: int | None = None  # set_epoch's
        self._sampler_epoch = None  # the sampler's epoch at the last pass

    # What the official script and engine read off their loader.
    @property
    def sampler(self):
        return self._loader.sampler

    @property
    def batch_size(self):
        return self._loader.batch_size

    @property
    def drop_last(self) -> bool:
        return self._loader.drop_last

    @property
    def num_workers(self) -> int:
        return self._loader.num_workers

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose draws the next pass makes."""
        self._next_epoch = int(epoch)

    def _begin_epoch(self) -> int:
        sampler_epoch = getattr(self.sampler, "epoch", None)
        if self._next_epoch is not None:
            epoch = self._next_epoch
        elif self._epoch is None or sampler_epoch != self._sampler_epoch:
            epoch = sampler_epoch if isinstance(sampler_epoch, int) else 0
        else:
            epoch = self._epoch + 1
        self._epoch, self._next_epoch, self._sampler_epoch = epoch, None, sampler_epoch
        return epoch

    def __iter__(self):
        epoch = self._begin_epoch()
        batches = iter(self._loader)

        def make(batch):
            return self._make(batch, epoch)

        if self.prefetch:
            return _prefetched([batches], make, self.device)
        return map(make, batches)

    def _make(self, batch, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices, encoded, targets = batch
        names = [_name(self.dataset, index) for index in indices]
        images = decode_batch(encoded, names, self.device)
        draws = [
            draw(image.shape[1], image.shape[2], self.seed, epoch, index, self.augmentation)
            for image, index in zip(images, indices)
        ]
        samples = augment_batch(
            images, [box for box, _ in draws], [flip for _, flip in draws], self.augmentation
        )
        return samples, targets.to(self.device, non_blocking=True)

    def __repr__(self) -> str:
        return (
            f"fastmae.data.DataLoader({self.dataset!r}, batch_size={self.batch_size}, "
            f"device={self.device}, {self.augmentation})"
        )


def _resolve(device) -> torch.device:
    """The device with its index: a prefetch thread starts on device 0, not on the caller's."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    return device


def _name(dataset, index: int) -> str:
    name = getattr(dataset, "name", None)
    return name(index) if callable(name) else f"sample {index}"


class _Indexed(torch.utils.data.Dataset):
    """``dataset[i]`` as ``(i, encoded bytes as a uint8 tensor, target)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(
                f"dataset[{index}] must be an (encoded bytes, target) pair, as "
                f"fastmae.data.ImageFolder gives, got a {type(item).__name__}"
            )
        data, target = item
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = byte_tensor(data)
        elif not (isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.dim() == 1):
            raise TypeError(
                f"dataset[{index}][0] must be a file's bytes (bytes or a 1-D uint8 tensor), "
                f"got {describe(data)}; give fastmae.data.DataLoader an undecoded dataset such "
                "as fastmae.data.ImageFolder"
            )
        return index, data, target


def _collate(items):
    indices, encoded, targets = zip(*items)
    return list(indices), list(encoded), torch.tensor(targets, dtype=torch.int64)


def _prefetched(handed_over: list, make, device: torch.device):
    """Yields ``make(batch)`` for each batch of the iterator in ``handed_over``, made up to
    PREFETCH_DEPTH ahead in a thread (on a CUDA device, on a stream of its own, which the
    consumer's stream waits for). An error there is raised here, at the batch it belongs to.

    The thread holds the only reference to the iterator and drops it when it ends, so a
    DataLoader's worker processes shut down then, even while the error that ended it is still
    referenced (a later fork would otherwise copy the live iterator)."""
    made: queue.Queue = queue.Queue(maxsize=PREFETCH_DEPTH)
    stop = threading.Event()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(item) -> None:
        while not stop.is_set():
            try:
                made.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def work():
        batches = handed_over.pop()
        try:
            if stream is not None:
                torch.cuda.set_device(device)
            for batch in batches:
                if stop.is_set():
                    return
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    out = make(batch)
                    ready = stream.record_event() if stream is not None else None
                put(("batch", out, ready))
            put(("end", None, None))
        except BaseException as err:  # noqa: B036 - handed to the consumer, raised there
            batches = None
            put(("error", err, None))
        finally:
            batches = None  # noqa: F841 - shuts the workers down here, not at a later gc

    thread = threading.Thread(target=work, name="fastmae.data prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value, ready = made.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            if ready is not None:
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(ready)
                for tensor in value:  # made on the prefetch stream, used on the consumer's
                    tensor.record_stream(consumer)
            yield value
    finally:
        stop.set()
        thread.join()
