"""What the video reference and the video drop-in share, defined once: mae_st's modules, their
names, creation order and initialisation (so the state_dict keys and, under the same seed,
the initial weights are mae_st's), the input checks, and the position tables."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastmae import _checks
from fastmae.base import StepChecks, init_linear_and_norm
from fastmae.layers import Block, PatchEmbed3d


class VideoMaskedAutoencoderBase(StepChecks, nn.Module):
    """The modules of mae_st's ``models_mae.MaskedAutoencoderViT``, with its constructor.

    ``patch_embed`` is the class that embeds the video, built as mae_st builds it; the default
    is :class:`fastmae.layers.PatchEmbed3d`. ``norm_layer`` makes every LayerNorm. Extra keyword
    arguments are accepted and ignored, as mae_st does. ``decoder_mask_ratio`` (beyond mae_st;
    default 0) is the share of the removed tubelets the decoder leaves out.
    """

    latent_has_cls = False  # mae_st's forward_encoder drops the cls row

    # fmt: off
    def __init__(
        self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
        norm_layer=nn.LayerNorm, norm_pix_loss=False,
        # mae_st's own arguments, in its order:
        num_frames=16, t_patch_size=4, patch_embed=PatchEmbed3d, no_qkv_bias=False,
        sep_pos_embed=False, trunc_init=False, cls_embed=False, pred_t_dim=8,
        decoder_mask_ratio=0.0, **kwargs,
    ):
        # fmt: on
        super().__init__()
        self.trunc_init = trunc_init
        self.sep_pos_embed = sep_pos_embed
        self.cls_embed = cls_embed
        self.pred_t_dim = pred_t_dim
        self.norm_pix_loss = norm_pix_loss
        self.decoder_mask_ratio = _checks.ratio_value(decoder_mask_ratio, "decoder_mask_ratio")
        # Creation order is mae_st's, so a seed gives the same initial weights (the patch
        # embedding is built, and checks its sizes, before pred_t_dim is checked against them).
        self.patch_embed = patch_embed(
            img_size, patch_size, in_chans, embed_dim, num_frames, t_patch_size
        )
        _check_pred_t_dim(num_frames, t_patch_size, pred_t_dim)
        self.t_pred_patch_size = t_patch_size * pred_t_dim // num_frames
        num_patches = self.patch_embed.num_patches
        self.input_size = input_size = tuple(self.patch_embed.input_size)
        spatial = input_size[1] * input_size[2]
        if cls_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self._position_parameters("", embed_dim, spatial, num_patches)
        block = dict(mlp_ratio=mlp_ratio, norm_layer=norm_layer, qkv_bias=not no_qkv_bias)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, **block, separate_qkv=True) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self._position_parameters("decoder_", decoder_embed_dim, spatial, num_patches)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, **block, separate_qkv=True)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        patch_pixels = self.t_pred_patch_size * math.prod(self.patch_embed.patch_size) * in_chans
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_pixels, bias=True)
        self.in_chans = in_chans
        self.initialize_weights()

    def _position_parameters(self, prefix: str, width: int, spatial: int, num_patches: int):
        """``{prefix}pos_embed_spatial/temporal(/class)`` (separable) or ``{prefix}pos_embed``
        ``[1, S+L, D]`` (joint, S = 1 with cls), in mae_st's order and shapes."""
        if self.sep_pos_embed:
            setattr(
                self, f"{prefix}pos_embed_spatial", nn.Parameter(torch.zeros(1, spatial, width))
            )
            temporal = torch.zeros(1, self.input_size[0], width)
            setattr(self, f"{prefix}pos_embed_temporal", nn.Parameter(temporal))
            if self.cls_embed:
                setattr(self, f"{prefix}pos_embed_class", nn.Parameter(torch.zeros(1, 1, width)))
        else:
            rows = num_patches + int(self.cls_embed)
            setattr(self, f"{prefix}pos_embed", nn.Parameter(torch.zeros(1, rows, width)))

    # -- initialisation: mae_st's, trunc_init included ------------------------------------------

    def initialize_weights(self):
        trunc = torch.nn.init.trunc_normal_
        if self.cls_embed:
            trunc(self.cls_token, std=0.02)
        if self.sep_pos_embed:
            for name in ("", "decoder_"):
                trunc(getattr(self, f"{name}pos_embed_spatial"), std=0.02)
                trunc(getattr(self, f"{name}pos_embed_temporal"), std=0.02)
            if self.cls_embed:
                trunc(self.pos_embed_class, std=0.02)
                trunc(self.decoder_pos_embed_class, std=0.02)
        else:
            trunc(self.pos_embed, std=0.02)
            trunc(self.decoder_pos_embed, std=0.02)
        weight = self.patch_embed.proj.weight.data
        if self.trunc_init:
            trunc(weight)
            trunc(self.mask_token, std=0.02)
        else:
            torch.nn.init.xavier_uniform_(weight.view([weight.shape[0], -1]))
            torch.nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        init_linear_and_norm(module, self.trunc_init)

    # -- position tables ---------------------------------------------------------------------------

    def position_table(self, prefix: str = "") -> torch.Tensor:
        """The encoder's (``prefix=""``) or decoder's (``"decoder_"``) position embedding of
        every token, ``[1, S+L, D]`` with the cls row first where there is one: separable
        tables sum spatial (repeated over time) and temporal (repeated over space)."""
        if not self.sep_pos_embed:
            return getattr(self, f"{prefix}pos_embed")
        spatial = getattr(self, f"{prefix}pos_embed_spatial")
        temporal = getattr(self, f"{prefix}pos_embed_temporal")
        table = spatial.repeat(1, self.input_size[0], 1) + torch.repeat_interleave(
            temporal, spatial.shape[1], dim=1
        )
        if self.cls_embed:
            table = torch.cat([getattr(self, f"{prefix}pos_embed_class"), table], dim=1)
        return table

    def target_frames(self, num_frames: int, device) -> torch.Tensor:
        """The frames the loss predicts: ``linspace(0, T-1, pred_t_dim).long()``, as mae_st."""
        return torch.linspace(0, num_frames - 1, self.pred_t_dim, device=device).long()

    # -- input checks, each run once where a public method is entered ---------------------------

    def _check_inputs(self, imgs):
        """imgs: floating ``[N, C, T, H, W]`` with the model's channels, frames and size."""
        _checks.check_floating(imgs, "imgs")
        expected = (self.in_chans, self.patch_embed.frames, *self.patch_embed.img_size)
        if imgs.dim() != 5 or tuple(imgs.shape[1:]) != expected:
            channels, frames, height, width = expected
            raise ValueError(
                f"imgs must be [N, C={channels}, T={frames}, H={height}, W={width}], "
                f"got shape {tuple(imgs.shape)}"
            )


def _check_pred_t_dim(num_frames, t_patch_size, pred_t_dim) -> None:
    if isinstance(pred_t_dim, bool) or not isinstance(pred_t_dim, int) or pred_t_dim < 1:
        raise ValueError(f"pred_t_dim must be a positive int, got {pred_t_dim!r}")
    if (t_patch_size * pred_t_dim) % num_frames:
        raise ValueError(
            f"pred_t_dim {pred_t_dim} does not fit num_frames {num_frames} and t_patch_size "
            f"{t_patch_size}: the target needs t_patch_size * pred_t_dim divisible by "
            "num_frames (whole target frames per tubelet; a larger pred_t_dim than num_frames "
            "repeats frames, as mae_st's linspace does)"
        )
