"""An ImageFolder tree read as encoded bytes: torchvision's ``datasets.ImageFolder`` file
list (same classes, same sample order, so the same sampler indices pick the same files),
with ``dataset[i] -> (bytes as a uint8 tensor, class index)`` and no decoding in the worker."""

from __future__ import annotations

import os

import torch

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder lists.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/**/<file>`` with an image extension, as torchvision's ImageFolder lists
    it: classes are the sorted sub-folder names, files sorted within each class, symlinks
    followed.

    Attributes as torchvision's: ``classes``, ``class_to_idx``, ``samples`` (``(path,
    class_index)`` pairs), ``targets``. ``dataset[i]`` is ``(data, target)``: ``data`` the
    file's bytes, a 1-D uint8 tensor (pinnable, what nvJPEG reads)."""

    def __init__(self, root: str | os.PathLike, extensions: tuple[str, ...] = IMG_EXTENSIONS):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"root must be a folder of class folders, got {self.root!r}")
        self.classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {self.root}.")
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.extensions = tuple(extension.lower() for extension in extensions)
        self.samples = []
        for name in self.classes:
            tree = sorted(os.walk(os.path.join(self.root, name), followlinks=True))
            found = [
                os.path.join(folder, file)
                for folder, _, files in tree
                for file in sorted(files)
                if file.lower().endswith(self.extensions)
            ]
            if not found:
                raise FileNotFoundError(
                    f"Found no valid file for the class {name} in {self.root}. Supported "
                    f"extensions are: {', '.join(self.extensions)}"
                )
            self.samples += [(path, self.class_to_idx[name]) for path in found]
        self.targets = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        with open(path, "rb") as file:
            return byte_tensor(file.read()), target

    def name(self, index: int) -> str:
        """How errors name sample ``index``: its path."""
        return f"sample {index} ({self.samples[index][0]})"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, {len(self)} files, "
            f"{len(self.classes)} classes)"
        )


def byte_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 tensor that owns them (empty for an empty file)."""
    if not len(data):
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
