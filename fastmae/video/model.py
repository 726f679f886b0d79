"""The video drop-in: mae_st's ``MaskedAutoencoderViT`` with the image MAE's fused ops in 3-D.

One training step, top to bottom (:meth:`MaskedAutoencoderViT.forward`):

1. check the inputs, once (the fused ops below run unchecked);
2. encoder: rank the mask noise (no argsort), gather only the K kept tubelets' pixels from the
   video into the Conv3d GEMM, add their gathered positions (the separable table summed once
   per step, ``[S+L, D]``) and the optional cls token in one pass; blocks; drop the cls row;
3. decoder: embed, prepend the decoder cls if any, unshuffle with mask tokens and positions in
   one pass; blocks, prediction; drop the cls row;
4. loss: the target pixels of the removed tokens read straight from the ``pred_t_dim``
   predicted frames of the video: no ``index_select`` copy, no patchified copy.

A custom ``patch_embed`` class (mae_st's constructor argument) is built as mae_st builds it.
If it is not :class:`fastmae.layers.PatchEmbed3d` (whose Conv3d runs the fused gather + GEMM
in its own forward), the encoder runs the module's own forward on every tubelet and fuses only
the masking and the position add after it.
"""

from __future__ import annotations

import math

import torch

from fastmae import _checks, _unchecked, functional
from fastmae.base import draw_noise, make_factories
from fastmae.config import VIDEO_FACTORIES
from fastmae.fused import FusedSteps, random_masking_with_ids
from fastmae.layers import takes_kept_patches
from fastmae.video.base import VideoMaskedAutoencoderBase


class MaskedAutoencoderViT(FusedSteps, VideoMaskedAutoencoderBase):
    """Drop-in for mae_st's ``models_mae.MaskedAutoencoderViT``: same constructor, state_dict,
    outputs and masks under the same seed; the fused ops underneath. ``forward`` and
    ``forward_encoder/decoder/loss`` are :class:`fastmae.fused.FusedSteps`'s (check once, then
    the steps below); ``forward_encoder`` takes the clip as mae_st names it, ``x``."""

    def _encoder(self, imgs, len_keep: int, noise):
        """-> latent ``[N, K, D]`` (cls dropped), mask ``[N, L]`` (1 = removed), ids_restore."""
        n, length = imgs.shape[0], self.patch_embed.num_patches
        if noise is None:
            noise = draw_noise(n, length, imgs.device)
        ids_keep, ids_restore, mask = _unchecked.random_masking_indices(noise, len_keep)
        cls_token = self.cls_token if self.cls_embed else None
        positions = self.position_table()
        if takes_kept_patches(self.patch_embed):
            x = self.patch_embed(imgs, ids_keep, cls_token, positions)
        else:
            tokens = self.patch_embed(imgs).reshape(n, length, -1)
            kept = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, tokens.shape[2]))
            x = _unchecked.add_positions(kept, ids_keep, cls_token, positions)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, int(self.cls_embed) :, :], mask, ids_restore

    def _decoder(self, latent, ids, shuffled: bool = False):
        """-> pred ``[N, L, u'*p*p*C]``, a view that the loss reads without a copy. With
        ``shuffled``, ids are ``ids_shuffle[:, :R]`` and the rows ``[N, R, u'*p*p*C]`` predict
        those tubelets (decoder masking)."""
        x = self.decoder_embed(latent)
        if self.cls_embed:
            x = torch.cat([self.decoder_cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        positions = self.position_table("decoder_")
        x = _unchecked.unshuffle_tokens(
            x, ids, self.mask_token, positions, has_cls=self.cls_embed, shuffled=shuffled
        )
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, int(self.cls_embed) :, :]

    def _loss(self, imgs, pred, mask, pred_ids=None):
        """-> the 0-dim loss over the removed tokens (rows of pred: every token, or tokens
        ``pred_ids``), targets read in place from imgs."""
        patch_size = (self.t_pred_patch_size, *self.patch_embed.patch_size)
        frames = self.target_frames(imgs.shape[2], imgs.device)
        return _unchecked.masked_pixel_loss(
            imgs, pred, mask, patch_size, self.norm_pix_loss, frames=frames, pred_ids=pred_ids
        )

    # -- mae_st's tensor methods ----------------------------------------------------------------

    def patchify(self, imgs):
        """imgs ``[N, C, T, H, W]`` -> ``[N, T/u' * h * w, u'*p*p*C]``, pixels ``(u', p, q, c)``."""
        if isinstance(imgs, torch.Tensor) and imgs.dim() != 5:
            raise ValueError(f"imgs must be [N, C, T, H, W], got shape {tuple(imgs.shape)}")
        return functional.patchify(imgs, (self.t_pred_patch_size, *self.patch_embed.patch_size))

    def unpatchify(self, x):
        """The inverse of :meth:`patchify` for this model's frame size: ``[N, L, u'*p*p*C]`` ->
        ``[N, C, T, H, W]`` with ``T = L / (h*w) * u'``."""
        _checks.check_floating(x, "x")
        patch_size = (self.t_pred_patch_size, *self.patch_embed.patch_size)
        spatial = self.input_size[1] * self.input_size[2]
        pixels = math.prod(patch_size)
        if x.dim() != 3 or x.shape[1] % spatial or x.shape[2] % pixels or not x.shape[2]:
            raise ValueError(f"x must be [N, t*{spatial}, {pixels}*C], got shape {tuple(x.shape)}")
        grid = (x.shape[1] // spatial, *self.input_size[1:])
        return functional.unpatchify(x, patch_size, grid)

    def random_masking(self, x, mask_ratio, noise=None):
        """x ``[N, L, D]`` -> ``(x_masked [N, K, D], mask [N, L], ids_restore, ids_keep)``."""
        return random_masking_with_ids(x, mask_ratio, noise)


_base, _large, _huge = make_factories(MaskedAutoencoderViT, VIDEO_FACTORIES)
mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14 = _base, _large, _huge
