"""Pure-PyTorch MAE, faithful to facebookresearch/mae's models_mae.py: the oracle for every test.

The official op sequence in plain torch, as functions of tensors and as the model's methods,
in the official method structure (forward -> forward_encoder, forward_decoder, forward_loss);
the tests hold the fused ops and the drop-in against it. The modules, their names and their
initialisation are :class:`fastmae.base.MaskedAutoencoderBase`'s, shared with the drop-in.

The official semantics it pins (and the drop-in keeps):
- the mask is drawn as ``torch.rand(N, L)`` right after the patch embedding; patches are
  ranked by ``argsort`` of that noise, the first ``int(L * (1 - mask_ratio))`` kept;
- the position embedding is added to every patch before masking; the cls token gets
  ``pos_embed[:, :1]`` and goes first; ``mask`` is 1 at removed patches;
- patchify orders a patch's pixels ``(i, j, c)``, channel fastest;
- the loss is each patch's mean squared error, averaged over removed patches; with
  ``norm_pix_loss`` the target patch is normalised by its mean and unbiased variance + 1e-6.

Beyond the official code it takes any ``in_chans``, ``(H, W)`` image and patch sizes, and an
optional ``noise [N, L]`` in ``forward`` (as Hugging Face ViTMAE does). Its deliberate
differences: a loss over a mask that sums to 0 (``mask_ratio=0``) is 0 here, where the official
``sum / mask.sum()`` gives NaN, and ``mask_ratio`` must lie in ``[0, 1)``.
"""

from __future__ import annotations

import torch

from fastmae import _checks
from fastmae._checks import to_2tuple
from fastmae.base import MaskedAutoencoderBase, make_factories, masking_noise
from fastmae.naive import (  # noqa: F401  (the oracle's op sequence; re-exported for the tests)
    add_positions,
    decoded_weights,
    embed_visible_patches,
    masked_pixel_loss,
    masking_indices,
    patch_rows,
    place_rows,
    select_tokens,
    shuffled_tokens,
    unpatch_rows,
    unshuffle_tokens,
)

# ---------------------------------------------------------------------------------------------
# The official op sequence, as functions of tensors.
# ---------------------------------------------------------------------------------------------


def patchify(imgs: torch.Tensor, patch_size) -> torch.Tensor:
    """imgs ``[N, C, H, W]`` -> ``[N, h*w, ph*pw*C]``, pixel index ``(i*pw + j)*C + c``."""
    _checks.check_images(imgs, None, None)
    patch_size, _ = _checks.check_patch_grid(imgs, patch_size)
    return patch_rows(imgs, patch_size)


def unpatchify(x: torch.Tensor, patch_size, grid_size) -> torch.Tensor:
    """``[N, h*w, ph*pw*C]`` -> imgs ``[N, C, h*ph, w*pw]``; the inverse of :func:`patchify`."""
    patch_size = to_2tuple(patch_size, "patch_size")
    grid_size = to_2tuple(grid_size, "grid_size")
    _checks.check_patch_rows(x, patch_size, grid_size)
    return unpatch_rows(x, patch_size, grid_size)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random masking by argsort of noise, as the official code.

    x ``[N, L, D]`` -> x_masked ``[N, K, D]``, mask ``[N, L]`` (1 = removed, default float dtype),
    ids_restore ``[N, L]`` int64, with ``K = int(L * (1 - mask_ratio))``. Without ``noise`` this
    draws ``torch.rand(N, L)`` on x's device: the same call, so the same mask per seed.
    """
    return random_masking_with_ids(x, mask_ratio, noise)[:3]


def random_masking_with_ids(x: torch.Tensor, mask_ratio, noise=None):
    """:func:`random_masking`, also returning ``ids_keep [N, K]`` (as mae_st's does)."""
    n, length, width = x.shape
    keep = _checks.len_keep(length, mask_ratio)
    noise = masking_noise(noise, n, length, x.device)
    ids_keep, ids_restore, mask = masking_indices(noise, keep)
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, width))
    return x_masked, mask, ids_restore, ids_keep


def decoder_masking(ids_restore, len_keep: int, decoder_mask_ratio: float):
    """Decoder masking (VideoMAE V2's dual masking, CrossMAE's partial reconstruction) on top of
    MAE's mask, with no new random draw: the decoder sees the K kept patches and the
    ``M = int((L - K) * (1 - decoder_mask_ratio))`` removed patches of lowest noise, the loss
    averages over those M.

    ids_restore ``[N, L]`` -> (ids ``[N, K+M]``: the patches the decoder sees, in rank order, so
    ``ids_shuffle[:, :K+M]``; weights ``[N, L]``: 1 at the M decoded removed patches, else 0,
    in the default float dtype, the mask of the loss)."""
    length = ids_restore.shape[1]
    total = _checks.len_decode(length, len_keep, decoder_mask_ratio)
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    return ids_shuffle[:, :total], decoded_weights(ids_restore, len_keep, total)


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------


class MaskedAutoencoderViT(MaskedAutoencoderBase):
    """Masked Autoencoder with a Vision Transformer backbone (He et al., 2021), in plain torch.

    Same constructor, state_dict and ``(loss, pred, mask)`` as the official
    ``models_mae.MaskedAutoencoderViT``. ``img_size`` and ``patch_size`` take an int or an
    ``(H, W)`` pair.
    """

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

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """imgs ``[N, C, H, W]`` -> latent ``[N, 1+K, D]``, mask and ids_restore ``[N, L]``."""
        self._check_step(imgs, mask_ratio, noise)
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore, decoded_ids=None):
        """latent ``[N, 1+K, D]``, ids_restore ``[N, L]`` -> pred ``[N, L, p*p*C]``. With
        ``decoded_ids [N, R]`` (decoder masking) the blocks see the cls row and those patches
        only, and pred is 0 at the other positions."""
        self._check_decoder_inputs(x, ids_restore)
        x = self.decoder_embed(x)
        x = unshuffle_tokens(x, ids_restore, self.mask_token, self.decoder_pos_embed)
        if decoded_ids is not None:
            x = select_tokens(x, decoded_ids)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        if decoded_ids is not None:
            return place_rows(x[:, 1:, :], decoded_ids, ids_restore.shape[1])
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """imgs ``[N, C, H, W]``, pred ``[N, L, p*p*C]``, mask ``[N, L]`` (1 = removed) -> 0-dim."""
        self._check_loss_inputs(imgs, pred, mask)
        return masked_pixel_loss(imgs, pred, mask, self.patch_embed.patch_size, self.norm_pix_loss)

    def forward(self, imgs, mask_ratio=0.75, noise=None, decoder_mask_ratio=None):
        """imgs ``[N, C, H, W]`` -> ``(loss, pred [N, L, p*p*C], mask [N, L])``.

        ``noise [N, L]``, if given, replaces the ``torch.rand`` draw that decides the mask.
        ``decoder_mask_ratio`` overrides the model's (see :func:`decoder_masking`).
        """
        return forward_with_decoder_masking(self, imgs, mask_ratio, noise, decoder_mask_ratio)


def forward_with_decoder_masking(model, imgs, mask_ratio, noise, decoder_mask_ratio):
    """The official forward of an MAE (image or video) through its official methods, with
    decoder masking when the ratio (the model's, or the given one) is not 0."""
    ratio = model._check_decoder_mask_ratio(decoder_mask_ratio)
    latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio, noise)
    if not ratio:
        pred = model.forward_decoder(latent, ids_restore)
        return model.forward_loss(imgs, pred, mask), pred, mask
    len_keep = _checks.len_keep(ids_restore.shape[1], mask_ratio)
    decoded_ids, weights = decoder_masking(ids_restore, len_keep, ratio)
    pred = model.forward_decoder(latent, ids_restore, decoded_ids)
    return model.forward_loss(imgs, pred, weights), pred, mask


_base, _large, _huge = make_factories(MaskedAutoencoderViT)
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b = _base
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b = _large
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b = _huge
