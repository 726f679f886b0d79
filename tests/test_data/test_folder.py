"""The ImageFolder of bytes lists what torchvision's ImageFolder lists, in its order."""

import os

import numpy as np
import pytest
import torch

from fastmae.data import ImageFolder
from tests.images import jpeg, write_tree


@pytest.fixture
def tree(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    files = {
        "b_class/z.JPEG": jpeg(rng, 20, 30),
        "b_class/a.jpg": jpeg(rng, 20, 30),
        "b_class/nested/m.PNG": jpeg(rng, 20, 30),
        "b_class/notes.txt": b"not an image",
        "A_class/x.jpeg": jpeg(rng, 20, 30),
        "c_class/only.webp": b"\x00",
    }
    write_tree(tmp_path, files)
    (tmp_path / "stray.jpg").write_bytes(files["b_class/a.jpg"])  # not in a class folder
    os.symlink(tmp_path / "b_class", tmp_path / "d_link")
    return tmp_path, files


def test_classes_samples_and_bytes(tree):
    root, files = tree
    dataset = ImageFolder(root)
    assert dataset.classes == ["A_class", "b_class", "c_class", "d_link"]
    relative = [(os.path.relpath(path, root), target) for path, target in dataset.samples]
    assert relative == [
        ("A_class/x.jpeg", 0),
        ("b_class/a.jpg", 1),
        ("b_class/z.JPEG", 1),
        ("b_class/nested/m.PNG", 1),
        ("c_class/only.webp", 2),
        ("d_link/a.jpg", 3),
        ("d_link/z.JPEG", 3),
        ("d_link/nested/m.PNG", 3),
    ]
    assert dataset.targets == [target for _, target in relative]
    data, target = dataset[3]
    assert target == 1 and data.dtype == torch.uint8 and data.dim() == 1
    assert data.numpy().tobytes() == files["b_class/nested/m.PNG"]
    assert "nested/m.PNG" in dataset.name(3)


def test_the_same_list_as_torchvision(tree):
    datasets = pytest.importorskip("torchvision.datasets")
    root, _ = tree
    theirs = datasets.ImageFolder(root)
    ours = ImageFolder(root)
    assert ours.classes == theirs.classes and ours.class_to_idx == theirs.class_to_idx
    assert ours.samples == theirs.samples


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder of class folders"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="Couldn't find any class folder"):
        ImageFolder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="no valid file for the class empty_class"):
        ImageFolder(tmp_path)
