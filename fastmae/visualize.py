"""Draw what an MAE sees: original | masked | reconstruction | reconstruction with visible patches.

    python -m fastmae.visualize --model mae_vit_large_patch16 \\
        --checkpoint mae_visualize_vit_large.pth --image cat.jpg dog.jpg \\
        --mask-ratio 0.75 --seed 0 --out reconstruction.png

Without ``--image`` it draws the test card that ships with fastmae; without ``--checkpoint`` it
runs random weights and says so. In a notebook, :func:`reconstruct` returns the four images.

``--video`` draws a video MAE (mae_st's, :mod:`fastmae.video`) on a generated test clip (a pan
across the test card) and writes an animated GIF: one animation frame per predicted video
frame, each the same four columns (:func:`reconstruct_video`, :func:`video_frames`).

Models trained with ``norm_pix_loss`` predict each patch normalised by that patch's own mean
and variance, which are unknown for a removed patch. We un-normalise every predicted patch with
the mean and standard deviation of the image's visible pixels (all channels together, one pair
per image): the nearest statistics the model's input offers. Colours of the reconstruction are
therefore approximate for such models, and exact for models trained on raw pixels.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

import fastmae
import fastmae.video
from fastmae import checkpoint
from fastmae.config import MASK_RATIO, NORM_PIX_EPS, VIDEO_CLIP, VIDEO_MASK_RATIO

# Input normalisation: ImageNet's for RGB (as the MAE training script), its grey average for 1.
CHANNEL_STATS = {
    3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    1: ((0.449,), (0.226,)),
}
TEST_CARD = os.path.join(os.path.dirname(__file__), "assets", "test_card.png")


def _pil():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("fastmae.visualize needs pillow: pip install 'fastmae[viz]'") from error
    return Image


def _stats(channels: int, device=None):
    if channels not in CHANNEL_STATS:
        raise ValueError(f"visualize draws 1- or 3-channel images, the model has {channels}")
    mean, std = CHANNEL_STATS[channels]
    return (
        torch.tensor(mean, device=device).view(-1, 1, 1),
        torch.tensor(std, device=device).view(-1, 1, 1),
    )


def load_image(path, img_size, in_chans: int) -> torch.Tensor:
    """An image file -> ``[C, H, W]`` float32, resized (bicubic) and normalised for the model."""
    image = _pil().open(path).convert("RGB" if in_chans == 3 else "L")
    height, width = img_size
    image = image.resize((width, height), resample=_pil().Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels[None]
    mean, std = _stats(in_chans)
    return (pixels - mean) / std


def to_pil(image: torch.Tensor):
    """A normalised ``[C, H, W]`` image (C 1 or 3) -> a PIL image."""
    mean, std = _stats(image.shape[0], image.device)
    pixels = ((image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).cpu().numpy()
    return _pil().fromarray(array[..., 0] if array.shape[2] == 1 else array)


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float = MASK_RATIO, noise=None) -> dict:
    """Run ``model`` on normalised ``imgs [N, C, H, W]``; returns ``original``, ``masked``
    (removed patches at the mean colour), ``reconstruction`` and ``pasted`` (the visible
    patches pasted back), each ``[N, C, H, W]`` in the input's normalisation, plus ``loss``
    and ``mask [N, L]``."""
    model.eval()
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    return _pictures(model, imgs, pred, mask, loss)


@torch.no_grad()
def reconstruct_video(
    model, clips: torch.Tensor, mask_ratio: float = VIDEO_MASK_RATIO, noise=None
) -> dict:
    """Run a video MAE on normalised ``clips [N, C, T, H, W]``; returns what
    :func:`reconstruct` does, each ``[N, C, P, H, W]`` at the ``P = pred_t_dim`` frames the
    model predicts (``frames``, their indices in the clip)."""
    model.eval()
    loss, pred, mask = model(clips, mask_ratio=mask_ratio, noise=noise)
    frames = model.target_frames(clips.shape[2], clips.device)
    result = _pictures(model, clips.index_select(2, frames), pred, mask, loss)
    return dict(result, frames=frames)


def _pictures(model, imgs, pred, mask, loss) -> dict:
    """The four pictures from a prediction of the patches of ``imgs``."""
    pred = pred.float()
    if model.norm_pix_loss:
        visible = (1 - mask)[..., None].expand_as(pred)
        patches = model.patchify(imgs).float()
        count = visible.sum((1, 2)).clamp_min(2)
        mean = (patches * visible).sum((1, 2)) / count
        var = (((patches - mean[:, None, None]) ** 2) * visible).sum((1, 2)) / (count - 1)
        pred = pred * (var + NORM_PIX_EPS).sqrt()[:, None, None] + mean[:, None, None]
    reconstruction = model.unpatchify(pred)
    removed = model.unpatchify(mask[..., None].expand_as(pred).contiguous())
    return dict(
        original=imgs,
        masked=imgs * (1 - removed),
        reconstruction=reconstruction,
        pasted=imgs * (1 - removed) + reconstruction * removed,
        loss=loss,
        mask=mask,
    )


def video_frames(result: dict) -> list:
    """:func:`reconstruct_video`'s result -> one :func:`grid_image` per predicted frame."""
    pictures = ("original", "masked", "reconstruction", "pasted")
    count = result["original"].shape[2]
    return [grid_image({k: result[k][:, :, j] for k in pictures}) for j in range(count)]


def test_clip(img_size, frames: int, in_chans: int) -> torch.Tensor:
    """A generated clip ``[C, T, H, W]``, normalised: the test card panning right, one
    ``W / T`` step a frame."""
    card = load_image(TEST_CARD, img_size, in_chans)
    step = max(1, card.shape[-1] // frames)
    return torch.stack([torch.roll(card, j * step, dims=-1) for j in range(frames)], dim=1)


def grid_image(result: dict):
    """One row per image: original | masked | reconstruction | reconstruction + visible."""
    columns = ("original", "masked", "reconstruction", "pasted")
    tiles = [[to_pil(result[c][i]) for c in columns] for i in range(result["original"].shape[0])]
    width, height = tiles[0][0].size
    canvas = _pil().new(tiles[0][0].mode, (width * len(columns), height * len(tiles)))
    for row, images in enumerate(tiles):
        for col, tile in enumerate(images):
            canvas.paste(tile, (col * width, row * height))
    return canvas


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastmae.visualize", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="mae_vit_base_patch16", help="fastmae factory name")
    parser.add_argument("--checkpoint", help="weights: official .pth, Hugging Face file or folder")
    parser.add_argument("--image", nargs="+", help="image files (default: the bundled test card)")
    parser.add_argument("--mask-ratio", type=float, help="default 0.75 (0.9 with --video)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    parser.add_argument(
        "--out", help="file to write (mae_reconstruction.png, or .gif with --video)"
    )
    parser.add_argument("--in-chans", type=int, default=3, help="1 or 3")
    parser.add_argument("--img-size", type=int, nargs="+", help="H [W] if not the model's 224")
    parser.add_argument(
        "--norm-pix-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the model was trained with norm_pix_loss (default: the checkpoint's saved args, "
        "else no)",
    )
    video_options = parser.add_argument_group("video (mae_st models, fastmae.video)")
    video_options.add_argument("--video", action="store_true", help="a video MAE on a test clip")
    video_options.add_argument("--num-frames", type=int, default=VIDEO_CLIP["num_frames"])
    video_options.add_argument("--t-patch-size", type=int, default=VIDEO_CLIP["t_patch_size"])
    video_options.add_argument("--pred-t-dim", type=int, default=VIDEO_CLIP["pred_t_dim"])
    args = parser.parse_args(argv)

    models = fastmae.video if args.video else fastmae
    factory = getattr(models, args.model, None)
    if not callable(factory) or not args.model.startswith("mae_vit_"):
        parser.error(
            f"--model must be a fastmae factory, e.g. mae_vit_base_patch16; got {args.model}"
        )
    extra = {}
    if args.img_size:
        extra["img_size"] = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    if args.video:
        extra.update(
            num_frames=args.num_frames, t_patch_size=args.t_patch_size, pred_t_dim=args.pred_t_dim
        )
    weights = checkpoint.load_file(args.checkpoint) if args.checkpoint else {}
    norm_pix_loss = args.norm_pix_loss
    if norm_pix_loss is None:  # official training checkpoints save their arguments
        norm_pix_loss = bool(checkpoint.training_args(weights).get("norm_pix_loss", False))
    model = factory(in_chans=args.in_chans, norm_pix_loss=norm_pix_loss, **extra)
    if args.checkpoint:
        fastmae.load_checkpoint(model, weights)
    else:
        print(
            "warning: no --checkpoint given, running random weights: the picture is meaningless",
            file=sys.stderr,
        )
    size = model.patch_embed.img_size
    torch.manual_seed(args.seed)
    if args.video:
        out = args.out or "mae_reconstruction.gif"
        clip = test_clip(size, model.patch_embed.frames, args.in_chans)[None]
        ratio = VIDEO_MASK_RATIO if args.mask_ratio is None else args.mask_ratio
        result = reconstruct_video(model, clip, ratio)
        first, *rest = video_frames(result)
        first.save(out, format="GIF", save_all=True, append_images=rest, duration=250, loop=0)
        count = 1 + len(rest)
        print(f"wrote {out}: {count} frames of a test clip, loss {result['loss'].item():.4f}")
        return 0
    out = args.out or "mae_reconstruction.png"
    imgs = torch.stack([load_image(p, size, args.in_chans) for p in (args.image or [TEST_CARD])])
    result = reconstruct(model, imgs, MASK_RATIO if args.mask_ratio is None else args.mask_ratio)
    grid_image(result).save(out, format="PNG")
    print(f"wrote {out}: {imgs.shape[0]} image(s), loss {result['loss'].item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
