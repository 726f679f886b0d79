"""What the reference MAE and the fused drop-in share, defined once.

- :class:`MaskedAutoencoderBase`: the modules and parameters, their names, their creation order
  and initialisation (so that both models have the official state_dict keys and, under the
  same seed, the official initial weights), and the input checks of their public methods.
- :func:`draw_noise`: the official mask draw.
- :func:`make_factories`: the official factory functions for a model class.

Each model class holds its own forward: :mod:`fastmae.reference` the official op sequence in
plain torch, :mod:`fastmae.model` the fused one.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from fastmae import _checks
from fastmae.config import IMAGE_FACTORIES
from fastmae.layers import Block, PatchEmbed, sincos_2d


def init_linear_and_norm(module, trunc_init: bool = False) -> None:
    """The official init of one module: a Linear xavier-uniform (mae_st's ``trunc_init``:
    truncated normal, std 0.02) with a zero bias; a LayerNorm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        if trunc_init:
            nn.init.trunc_normal_(module.weight, std=0.02)
        else:
            nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.LayerNorm):
        nn.init.constant_(module.bias, 0)
        nn.init.constant_(module.weight, 1.0)


def draw_noise(batch: int, length: int, device) -> torch.Tensor:
    """The official mask draw, ``torch.rand(N, L)`` on the images' device. No other random
    number is drawn between the patch embedding and it, so a seed gives the official mask."""
    return torch.rand(batch, length, device=device)


def masking_noise(noise, batch: int, length: int, device) -> torch.Tensor:
    """The noise that decides a mask: ``noise`` if given (checked: floating ``[N, L]`` on
    ``device``), else the official draw."""
    if noise is None:
        return draw_noise(batch, length, device)
    _checks.check_noise(noise, batch, length, device)
    return noise


class StepChecks:
    """The input checks of an MAE's public methods, run once where a method is entered. A model
    gives its own ``_check_inputs(imgs)`` and says whether its latent has a cls row."""

    latent_has_cls = True

    def _check_step(self, imgs, mask_ratio, noise) -> int:
        """Checks a training step's inputs; returns the number of kept tokens, computed as the
        official ``int(L * (1 - mask_ratio))``."""
        self._check_inputs(imgs)
        weight = getattr(getattr(self.patch_embed, "proj", None), "weight", None)
        if isinstance(weight, torch.Tensor):  # a custom patch_embed may have none
            _checks.check_dtype_matches(imgs, weight)
        return _checks.masking_step(imgs, self.patch_embed.num_patches, mask_ratio, noise)

    def _check_decoder_mask_ratio(self, decoder_mask_ratio) -> float:
        """A forward's ``decoder_mask_ratio`` (checked, in [0, 1)), or the model's own."""
        if decoder_mask_ratio is None:
            # Models pickled before the option existed have no attribute: the official decoder.
            return getattr(self, "decoder_mask_ratio", 0.0)
        return _checks.ratio_value(decoder_mask_ratio, "decoder_mask_ratio")

    def _check_decoder_inputs(self, x, ids_restore):
        """x: the latent ``[N, S+K, D]`` (S = 1 with a cls row); ids_restore ``[N, L]`` integer
        ids on x's device."""
        width, length = self.decoder_embed.in_features, self.patch_embed.num_patches
        _checks.check_decoder_inputs(x, ids_restore, width, length, self.latent_has_cls)

    def _check_loss_inputs(self, imgs, pred, mask):
        """imgs as the model takes them; pred ``[N, L, P]`` and mask ``[N, L]`` to match."""
        self._check_inputs(imgs)
        length, pixels = self.patch_embed.num_patches, self.decoder_pred.out_features
        _checks.check_pred_and_mask(pred, mask, imgs, length, pixels)


class MaskedAutoencoderBase(StepChecks, nn.Module):
    """The modules of ``models_mae.MaskedAutoencoderViT``, with its constructor.

    ``img_size`` and ``patch_size`` take an int or an ``(H, W)`` pair. ``norm_layer`` makes
    every LayerNorm (the blocks' and the two final ones): a fused normalisation module that
    subclasses ``nn.LayerNorm`` keeps the state_dict keys. ``decoder_mask_ratio`` (beyond the
    official constructor; default 0, the official model) is the share of the removed patches
    the decoder leaves out (see :func:`fastmae.reference.decoder_masking`).
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=4.0,
        norm_layer=nn.LayerNorm,
        norm_pix_loss=False,
        decoder_mask_ratio=0.0,
    ):
        super().__init__()
        # Creation order follows the official model, so a seed gives the same initial weights.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False
        )
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        patch_pixels = self.patch_embed.patch_size[0] * self.patch_embed.patch_size[1] * in_chans
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_pixels, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.decoder_mask_ratio = _checks.ratio_value(decoder_mask_ratio, "decoder_mask_ratio")
        self.initialize_weights()

    # -- initialisation ------------------------------------------------------------------------

    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        for param in (self.pos_embed, self.decoder_pos_embed):
            if param.is_meta:
                continue
            table = sincos_2d(param.shape[-1], grid, cls_token=True)
            param.data.copy_(torch.from_numpy(table).float().unsqueeze(0))

        # The patch embedding is initialised like a Linear on its [D, C*p*p] view.
        weight = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(weight.view([weight.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        init_linear_and_norm(module)

    # -- input checks, each run once where a public method is entered ---------------------------

    def _check_inputs(self, imgs):
        """imgs: floating ``[N, C, H, W]`` with the model's channels and image size."""
        _checks.check_images(imgs, self.patch_embed.in_chans, self.patch_embed.img_size)

    def _check_channels(self, imgs):
        """imgs: floating ``[N, C, H, W]`` with the model's channels, any size."""
        _checks.check_images(imgs, self.patch_embed.in_chans, None)

    def _grid_of(self, x) -> tuple[int, int]:
        """The patch grid of patch rows ``x [N, L, P]``: the model's for its own L, else square
        (the official ``h = w = int(L**.5)``, used on images of other sizes)."""
        _checks.check_floating(x, "x")
        length = x.shape[1] if x.dim() == 3 else -1
        if length == self.patch_embed.num_patches:
            return self.patch_embed.grid_size
        side = math.isqrt(max(length, 0))
        if side * side != length:
            raise ValueError(
                f"x must be [N, L, P] with L = {self.patch_embed.num_patches} (the model's "
                f"{self.patch_embed.grid_size[0]}x{self.patch_embed.grid_size[1]} grid) or a "
                f"square number, got shape {tuple(x.shape)}"
            )
        return side, side


# ---------------------------------------------------------------------------------------------
# Factories with the official hyperparameters.
# ---------------------------------------------------------------------------------------------

# The official factories' normalisation. A model class may name another in its own
# ``factory_norm_layer`` (a fused LayerNorm, say); a ``norm_layer`` keyword overrides both.
OFFICIAL_NORM_LAYER = partial(nn.LayerNorm, eps=1e-6)


def make_factories(model_class, configs=None):
    """The official factory functions for ``model_class``, one per ``name: config`` of
    ``configs`` (default: the image MAE's base, large, huge), in that order."""
    norm_layer = getattr(model_class, "factory_norm_layer", OFFICIAL_NORM_LAYER)

    def build(config, name):
        def factory(**kwargs):
            return model_class(**{**config, "norm_layer": norm_layer, **kwargs})

        factory.__name__ = factory.__qualname__ = name
        factory.__doc__ = f"MAE {name} with the official hyperparameters; kwargs override."
        return factory

    return tuple(build(config, name) for name, config in (configs or IMAGE_FACTORIES).items())
