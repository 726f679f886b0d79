"""The drop-in ``MaskedAutoencoderViT``: the official model with the fused ops underneath.

One training step, top to bottom (:meth:`MaskedAutoencoderViT.forward`):

1. check the inputs, once (the fused ops below run unchecked);
2. encoder: rank the mask noise (no argsort), embed only the K kept patches (gather + GEMM +
   position, cls first), then the transformer blocks;
3. decoder: embed, unshuffle with mask tokens and positions in one pass, blocks, prediction;
4. loss: read the target pixels of the removed patches straight from the images.

``forward`` and the official methods (``forward_encoder``, ``forward_decoder``,
``forward_loss``) run the same unchecked steps ``_encoder``, ``_decoder`` and ``_loss``: a
subclass that changes a step overrides those, and both routes see the change.

The modules, their names and initialisation are :class:`fastmae.base.MaskedAutoencoderBase`'s,
shared with :mod:`fastmae.reference`, so state_dicts load both ways and a seed gives the same
initial weights and the same masks.
"""

from __future__ import annotations

from fastmae import _unchecked, functional
from fastmae.base import MaskedAutoencoderBase, draw_noise, make_factories
from fastmae.fused import FusedSteps, random_masking_with_ids


class MaskedAutoencoderViT(FusedSteps, MaskedAutoencoderBase):
    """Drop-in for ``models_mae.MaskedAutoencoderViT``: same constructor, state_dict, outputs,
    and masks under the same seed; the fused ops underneath."""

    def _encoder(self, imgs, len_keep: int, noise):
        """-> latent ``[N, 1+K, D]``, mask ``[N, L]`` (1 = removed), ids_restore ``[N, L]``."""
        n, num_patches = imgs.shape[0], self.patch_embed.num_patches
        if noise is None:
            noise = draw_noise(n, num_patches, imgs.device)
        ids_keep, ids_restore, mask = _unchecked.random_masking_indices(noise, len_keep)
        # Through the modules' own forwards, where FSDP2 gathers their weights.
        x = self.patch_embed(imgs, ids_keep, self.cls_token, self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def _decoder(self, latent, ids, shuffled: bool = False):
        """-> pred ``[N, L, p*p*C]``, a strided view that the loss reads without a copy. With
        ``shuffled``, ids are ``ids_shuffle[:, :R]`` and the rows ``[N, R, p*p*C]`` predict
        those patches (decoder masking)."""
        x = self.decoder_embed(latent)
        x = _unchecked.unshuffle_tokens(
            x, ids, self.mask_token, self.decoder_pos_embed, shuffled=shuffled
        )
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def _loss(self, imgs, pred, mask, pred_ids=None):
        """-> the 0-dim loss, averaged over the removed patches (rows of pred: every patch, or
        patches ``pred_ids``)."""
        patch_size = self.patch_embed.patch_size
        return _unchecked.masked_pixel_loss(
            imgs, pred, mask, patch_size, self.norm_pix_loss, pred_ids=pred_ids
        )

    # -- the official tensor methods ---------------------------------------------------------

    def patchify(self, imgs):
        """imgs ``[N, C, H, W]`` (any size the patch divides) -> ``[N, L, p*p*C]``."""
        self._check_channels(imgs)
        return functional.patchify(imgs, self.patch_embed.patch_size)

    def unpatchify(self, x):
        """``[N, L, p*p*C]`` -> imgs ``[N, C, H, W]``; the grid is the model's, or square."""
        return functional.unpatchify(x, self.patch_embed.patch_size, self._grid_of(x))

    def random_masking(self, x, mask_ratio, noise=None):
        """x ``[N, L, D]`` -> ``(x_masked [N, K, D], mask [N, L], ids_restore [N, L])``; L is
        x's, as in the official code, so any token sequence can be masked."""
        return random_masking_with_ids(x, mask_ratio, noise)[:3]


_base, _large, _huge = make_factories(MaskedAutoencoderViT)
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b = _base
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b = _large
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b = _huge
