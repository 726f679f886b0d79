"""The numbers fastmae is built around, each defined here once.

- the official model sizes: the image MAE's and mae_st's factory hyperparameters;
- the training set-up the benchmarks, the static kernel check, the accounting and the
  visualisation run by default: 224 px, mask ratio 0.75, and mae_st's default clip;
- the norm-pix-loss epsilon;
- the torch and Triton versions fastmae is tested with (``pyproject.toml`` states the lower
  bounds again for pip; a test keeps the two in agreement).
"""

from __future__ import annotations

from dataclasses import dataclass

# Added to the unbiased variance of a target patch before the square root (norm_pix_loss).
NORM_PIX_EPS = 1e-6

# Inclusive (major, minor) ranges; benchmarks/compat.sh re-tests the Triton ends.
TESTED_TORCH = ((2, 4), (2, 13))
TESTED_TRITON = ((3, 0), (3, 9))

# -- the official model sizes ---------------------------------------------------------------------

ENCODERS = {
    "base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4),
    "large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4),
    "huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4),
}
DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
# facebookresearch/mae's factories: mae_vit_base_patch16_dec512d8b, ...
IMAGE_FACTORIES = {
    f"mae_vit_{name}_dec512d8b": {**encoder, **DECODER} for name, encoder in ENCODERS.items()
}
# mae_st's factories name the encoder only; the decoder is the class default, DECODER's sizes.
VIDEO_FACTORIES = {f"mae_vit_{name}": dict(encoder) for name, encoder in ENCODERS.items()}

# -- the default training set-up ------------------------------------------------------------------

IMAGE_SIZE = 224
MASK_RATIO = 0.75
# mae_st's pre-training defaults: 16 frames, tubelets of 2 frames, 8 target frames, ratio 0.9.
VIDEO_CLIP = dict(num_frames=16, t_patch_size=2, pred_t_dim=8)
VIDEO_MASK_RATIO = 0.9
# Hugging Face VideoMAE (MCG-NJU's videomae-base): its config's defaults (16 frames of 224 px,
# tubelets of 2, ViT-B) pre-trained with tube masking at ratio 0.9.
VIDEOMAE_TUBE_MASK_RATIO = 0.9


@dataclass(frozen=True)
class StepSizes:
    """The tensor sizes of one training step of a model, for the benchmarks, the static kernel
    check and the accounting. An image model has one frame and tubelets of one frame."""

    img_size: int
    patch_size: int
    width: int
    decoder_width: int
    mask_ratio: float
    in_chans: int = 3
    num_frames: int = 1
    t_patch_size: int = 1
    pred_t_dim: int = 1

    @property
    def length(self) -> int:
        """Tokens (patches or tubelets) per sample, L."""
        return self.num_frames // self.t_patch_size * (self.img_size // self.patch_size) ** 2

    @property
    def keep(self) -> int:
        """Kept tokens per sample, the official ``int(L * (1 - mask_ratio))``."""
        return int(self.length * (1 - self.mask_ratio))

    @property
    def pixels(self) -> int:
        """Target pixels per token: ``u' * p * p * C`` with u' the frames each token predicts."""
        target_frames = self.t_patch_size * self.pred_t_dim // self.num_frames
        return target_frames * self.patch_size**2 * self.in_chans


def _step(config: dict, mask_ratio: float, **clip) -> StepSizes:
    decoder_width = config.get("decoder_embed_dim", DECODER["decoder_embed_dim"])
    return StepSizes(
        IMAGE_SIZE, config["patch_size"], config["embed_dim"], decoder_width, mask_ratio, **clip
    )


def image_step(name: str = "mae_vit_base_patch16_dec512d8b") -> StepSizes:
    """An image factory's step at 224 px and mask ratio 0.75."""
    return _step(IMAGE_FACTORIES[name], MASK_RATIO)


def video_step(name: str = "mae_vit_large_patch16") -> StepSizes:
    """A mae_st factory's step on its default clip of 224 px frames, mask ratio 0.9."""
    return _step(VIDEO_FACTORIES[name], VIDEO_MASK_RATIO, **VIDEO_CLIP)
