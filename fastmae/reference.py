"""Pure-PyTorch MAE, faithful to facebookresearch/mae's models_mae.py: the oracle for every test.

Beyond the official code it takes any ``in_chans``, ``(H, W)`` image and patch sizes, and an
optional ``noise [N, L]`` in ``forward`` (as Hugging Face ViTMAE does). Its deliberate
differences: a loss over a mask that sums to 0 (``mask_ratio=0``) is 0 here, where the official
``sum / mask.sum()`` gives NaN, and ``mask_ratio`` must lie in ``[0, 1)``.

The model is also the base class of the fused drop-in: the two share every module, the
initialisation and the transformer blocks, and differ only in the steps the official code
spells out as tensor shuffling (``_embed_and_mask``, ``_unshuffle``, ``forward_loss``,
``patchify``, ``unpatchify``, ``random_masking``).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from fastmae import _checks
from fastmae.layers import Block, PatchEmbed, sincos_2d, to_2tuple

# ---------------------------------------------------------------------------------------------
# The official op sequence, as functions of tensors.
# ---------------------------------------------------------------------------------------------


def patchify(imgs: torch.Tensor, patch_size) -> torch.Tensor:
    """imgs ``[N, C, H, W]`` -> ``[N, h*w, ph*pw*C]``, pixel index ``(i*pw + j)*C + c``."""
    ph, pw = to_2tuple(patch_size, "patch_size")
    _checks.check_images(imgs, None, None)
    n, c, height, width = imgs.shape
    _checks.check_divisible(height, width, (ph, pw))
    h, w = height // ph, width // pw
    x = imgs.reshape(n, c, h, ph, w, pw)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, ph * pw * c)


def unpatchify(x: torch.Tensor, patch_size, grid_size) -> torch.Tensor:
    """``[N, h*w, ph*pw*C]`` -> imgs ``[N, C, h*ph, w*pw]``; the inverse of :func:`patchify`."""
    ph, pw = to_2tuple(patch_size, "patch_size")
    h, w = to_2tuple(grid_size, "grid_size")
    c = _checks.check_patch_rows(x, (ph, pw), (h, w))
    n = x.shape[0]
    x = x.reshape(n, h, w, ph, pw, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, h * ph, w * pw)


def draw_noise(batch: int, length: int, device) -> torch.Tensor:
    """The official mask draw, ``torch.rand(N, L)`` on the images' device, made right after the
    patch embedding: the same call in the same place, so a seed gives the official mask."""
    return torch.rand(batch, length, device=device)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random masking by argsort of noise, as the official code.

    x ``[N, L, D]`` -> x_masked ``[N, K, D]``, mask ``[N, L]`` (1 = removed, default float dtype),
    ids_restore ``[N, L]`` int64, with ``K = int(L * (1 - mask_ratio))``. Without ``noise`` this
    draws ``torch.rand(N, L)`` on x's device: the same call, so the same mask per seed.
    """
    n, length, width = x.shape
    keep = _checks.len_keep(length, mask_ratio)
    if noise is None:
        noise = draw_noise(n, length, x.device)
    else:
        _checks.check_noise(noise, n, length, x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, width))
    mask = torch.ones([n, length], device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def unshuffle_tokens(x, ids_restore, mask_token, pos_embed):
    """Decoder input: x ``[N, 1+K, Dd]`` -> ``[N, 1+L, Dd]`` with mask tokens, unshuffled, + pos."""
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + pos_embed


def masked_pixel_loss(imgs, pred, mask, patch_size, norm_pix_loss: bool = False):
    """Mean squared error per patch, averaged over the removed patches (mask 1).

    With ``norm_pix_loss`` the target patch is normalised by its mean and unbiased variance
    (+1e-6). A mask that sums to exactly 0 (no removed patch) gives 0 where the official code
    gives NaN; any other real mask, negative weights too, gives the official value.
    """
    target = patchify(imgs, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    mask_sum = mask.sum()
    nonzero_sum = mask_sum != 0
    loss = (loss * mask).sum() / torch.where(nonzero_sum, mask_sum, torch.ones_like(mask_sum))
    return torch.where(nonzero_sum, loss, torch.zeros_like(loss))


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a Vision Transformer backbone (He et al., 2021).

    Same constructor, state_dict and ``(loss, pred, mask)`` as the official
    ``models_mae.MaskedAutoencoderViT``. ``img_size`` and ``patch_size`` take an int or an
    ``(H, W)`` pair.
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
        if isinstance(module, nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
        elif isinstance(module, nn.LayerNorm):
            nn.init.constant_(module.bias, 0)
            nn.init.constant_(module.weight, 1.0)

    # -- the steps that the fused drop-in replaces ---------------------------------------------

    def patchify(self, imgs):
        """imgs ``[N, C, H, W]`` (any size the patch divides) -> ``[N, L, p*p*C]``."""
        self._check_channels(imgs)
        return patchify(imgs, self.patch_embed.patch_size)

    def unpatchify(self, x):
        """``[N, L, p*p*C]`` -> imgs ``[N, C, H, W]``; the grid is the model's, or square."""
        return unpatchify(x, self.patch_embed.patch_size, self._grid_of(x))

    def random_masking(self, x, mask_ratio, noise=None):
        """x ``[N, L, D]`` -> ``(x_masked [N, K, D], mask [N, L], ids_restore [N, L])``."""
        return random_masking(x, mask_ratio, noise)

    def _embed_and_mask(self, imgs, mask_ratio, noise):
        """imgs -> encoder input ``[N, 1+K, D]`` (cls first), mask, ids_restore."""
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x, mask, ids_restore

    def _unshuffle(self, x, ids_restore):
        """Embedded latent ``[N, 1+K, Dd]`` -> decoder input ``[N, 1+L, Dd]``."""
        return unshuffle_tokens(x, ids_restore, self.mask_token, self.decoder_pos_embed)

    def forward_loss(self, imgs, pred, mask):
        """imgs ``[N, C, H, W]``, pred ``[N, L, p*p*C]``, mask ``[N, L]`` (1 = removed) -> 0-dim."""
        self._check_images(imgs)
        return masked_pixel_loss(imgs, pred, mask, self.patch_embed.patch_size, self.norm_pix_loss)

    # -- shared by both models -----------------------------------------------------------------

    def _check_images(self, imgs):
        _checks.check_images(imgs, self.patch_embed.in_chans, self.patch_embed.img_size)

    def _check_channels(self, imgs):
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

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """imgs ``[N, C, H, W]`` -> latent ``[N, 1+K, D]``, mask and ids_restore ``[N, L]``."""
        self._check_images(imgs)
        _checks.len_keep(self.patch_embed.num_patches, mask_ratio)
        if noise is not None:
            _checks.check_noise(noise, imgs.shape[0], self.patch_embed.num_patches, imgs.device)
        x, mask, ids_restore = self._embed_and_mask(imgs, mask_ratio, noise)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """latent ``[N, 1+K, D]``, ids_restore ``[N, L]`` -> pred ``[N, L, p*p*C]``."""
        x = self.decoder_embed(x)
        x = self._unshuffle(x, ids_restore)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """imgs ``[N, C, H, W]`` -> ``(loss, pred [N, L, p*p*C], mask [N, L])``.

        ``noise [N, L]``, if given, replaces the ``torch.rand`` draw that decides the mask.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


# ---------------------------------------------------------------------------------------------
# Factories with the official hyperparameters.
# ---------------------------------------------------------------------------------------------

_LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)
_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4)
VIT_BASE_PATCH16 = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DECODER)
VIT_LARGE_PATCH16 = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DECODER)
VIT_HUGE_PATCH14 = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DECODER)


def make_factories(model_class):
    """The three official factory functions for ``model_class``, as (base, large, huge)."""

    def build(config, name):
        def factory(**kwargs):
            return model_class(**{**config, "norm_layer": _LAYER_NORM, **kwargs})

        factory.__name__ = factory.__qualname__ = name
        factory.__doc__ = f"MAE {name} with the official hyperparameters; kwargs override."
        return factory

    return (
        build(VIT_BASE_PATCH16, "mae_vit_base_patch16_dec512d8b"),
        build(VIT_LARGE_PATCH16, "mae_vit_large_patch16_dec512d8b"),
        build(VIT_HUGE_PATCH14, "mae_vit_huge_patch14_dec512d8b"),
    )


(
    mae_vit_base_patch16_dec512d8b,
    mae_vit_large_patch16_dec512d8b,
    mae_vit_huge_patch14_dec512d8b,
) = make_factories(MaskedAutoencoderViT)
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b
