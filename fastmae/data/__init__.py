"""The official MAE pre-training input, decoded and augmented on the model's device.

    dataset_train = fastmae.data.ImageFolder(os.path.join(args.data_path, "train"))
    data_loader_train = fastmae.data.DataLoader(
        dataset_train, sampler=sampler_train, batch_size=args.batch_size,
        num_workers=args.num_workers, pin_memory=args.pin_mem, drop_last=True,
        device=device, input_size=args.input_size, seed=args.seed,
    )

Workers read file bytes only; each batch is decoded on the device (nvJPEG through
torchvision on CUDA, Pillow on the CPU) and goes through RandomResizedCrop(input_size,
scale=(0.2, 1.0), bicubic), RandomHorizontalFlip and ImageNet normalisation there, as
torchvision's tensor transforms compute them. ``samples`` come as float32 ``[N, 3, H, W]`` on
the device, ``targets`` as int64 ``[N]``.
"""

from fastmae.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augmentation,
    augment_batch,
    crop_box,
    draw,
)
from fastmae.data.decode import UndecodableImage, decode_batch
from fastmae.data.folder import IMG_EXTENSIONS, ImageFolder
from fastmae.data.loader import DataLoader

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "Augmentation",
    "DataLoader",
    "ImageFolder",
    "UndecodableImage",
    "augment_batch",
    "crop_box",
    "decode_batch",
    "draw",
]
