"""The drop-in ``MaskedAutoencoderViT``: the official model with the fused ops plugged in.

It inherits every module, the initialisation and the transformer blocks from the reference,
and replaces only the tensor shuffling around them (masking, patch embedding of the kept
patches, decoder unshuffle, patchify and the loss) with :mod:`fastmae.functional`.
"""

from __future__ import annotations

import torch

from fastmae import _checks, functional, reference


class MaskedAutoencoderViT(reference.MaskedAutoencoderViT):
    """Drop-in for ``models_mae.MaskedAutoencoderViT``: same constructor, state_dict, outputs,
    and masks under the same seed; the fused ops underneath."""

    def patchify(self, imgs):
        """imgs ``[N, C, H, W]`` (any size the patch divides) -> ``[N, L, p*p*C]``."""
        self._check_channels(imgs)
        return functional.patchify(imgs, self.patch_embed.patch_size)

    def unpatchify(self, x):
        """``[N, L, p*p*C]`` -> imgs ``[N, C, H, W]``; the grid is the model's, or square."""
        return functional.unpatchify(x, self.patch_embed.patch_size, self._grid_of(x))

    def _masking(self, batch: int, length: int, mask_ratio, noise, device):
        keep = _checks.len_keep(length, mask_ratio)
        if noise is None:
            noise = reference.draw_noise(batch, length, device)
        return functional.random_masking_indices(noise, keep)

    def random_masking(self, x, mask_ratio, noise=None):
        """x ``[N, L, D]`` -> ``(x_masked [N, K, D], mask [N, L], ids_restore [N, L])``; L is
        x's, as in the official code, so any token sequence can be masked."""
        n, length, width = x.shape
        if noise is not None:
            _checks.check_noise(noise, n, length, x.device)
        ids_keep, ids_restore, mask = self._masking(n, length, mask_ratio, noise, x.device)
        x_masked = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, width))
        return x_masked, mask, ids_restore

    def _embed_and_mask(self, imgs, mask_ratio, noise):
        num_patches = self.patch_embed.num_patches
        ids_keep, ids_restore, mask = self._masking(
            imgs.shape[0], num_patches, mask_ratio, noise, imgs.device
        )
        proj = self.patch_embed.proj
        x = functional.embed_visible_patches(
            imgs,
            ids_keep,
            proj.weight,
            proj.bias,
            self.cls_token,
            self.pos_embed,
            validate_ids=False,  # made by the masking just above: no host sync in a step
        )
        return x, mask, ids_restore

    def _unshuffle(self, x, ids_restore):
        return functional.unshuffle_tokens(
            x, ids_restore, self.mask_token, self.decoder_pos_embed, validate_ids=False
        )

    def forward_loss(self, imgs, pred, mask):
        """imgs ``[N, C, H, W]``, pred ``[N, L, p*p*C]``, mask ``[N, L]`` (1 = removed) -> 0-dim."""
        self._check_images(imgs)
        return functional.masked_pixel_loss(
            imgs, pred, mask, self.patch_embed.patch_size, self.norm_pix_loss
        )


(
    mae_vit_base_patch16_dec512d8b,
    mae_vit_large_patch16_dec512d8b,
    mae_vit_huge_patch14_dec512d8b,
) = reference.make_factories(MaskedAutoencoderViT)
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b
