"""Pure-PyTorch video MAE, faithful to facebookresearch/mae_st's models_mae.py: the oracle of
the video tests.

mae_st's op sequence, in its method structure (forward -> forward_encoder, forward_decoder,
forward_loss). The semantics it pins, and the drop-in keeps:
- tokens are tubelets of ``t_patch_size x p x p`` pixels, ordered ``(t, h, w)``; the mask
  draw ``torch.rand(N, L)`` comes right after the patch embedding;
- the cls token (``cls_embed``) goes first, then the position embedding is added **after**
  masking, gathered at the kept tokens (separable tables: spatial repeated over time plus
  temporal repeated over space; the class row in front); the encoder drops its cls row;
- the decoder appends mask tokens, unshuffles, prepends its own cls token if any, and adds its
  position embedding; its cls row is dropped from the prediction;
- the target is the ``pred_t_dim`` frames at ``linspace(0, T-1, pred_t_dim).long()``,
  patchified ``(u', p, q, c)`` with ``u' = t_patch_size * pred_t_dim // num_frames``; the loss
  is each token's (normalised: mean, unbiased var + 1e-6) MSE averaged over removed tokens.

Beyond mae_st it takes any ``in_chans`` (mae_st's patchify hard-codes 3), an optional
``noise [N, L]`` in ``forward`` and ``random_masking``, and ``unpatchify`` reads the video shape
from ``x`` (mae_st reads it from the last ``patchify`` call). A mask that removes nothing gives
loss 0 where mae_st gives NaN.
"""

from __future__ import annotations

import torch

from fastmae.base import make_factories
from fastmae.config import VIDEO_FACTORIES
from fastmae.reference import (
    forward_with_decoder_masking,
    masked_pixel_loss,
    patch_rows,
    place_rows,
    random_masking_with_ids,
    select_tokens,
    unpatch_rows,
)
from fastmae.video.base import VideoMaskedAutoencoderBase


class MaskedAutoencoderViT(VideoMaskedAutoencoderBase):
    """mae_st's ``MaskedAutoencoderViT`` in plain torch: same constructor and state_dict."""

    def patchify(self, imgs):
        """imgs ``[N, C, T, H, W]`` -> ``[N, T/u' * h * w, u'*p*p*C]``, pixels ``(u', p, q, c)``."""
        return patch_rows(imgs, (self.t_pred_patch_size, *self.patch_embed.patch_size))

    def unpatchify(self, x):
        """The inverse of :meth:`patchify` for this model's frame size: ``[N, L, u'*p*p*C]`` ->
        ``[N, C, T, H, W]`` with ``T = L / (h*w) * u'``."""
        h, w = self.input_size[1:]
        grid = (x.shape[1] // (h * w), h, w)
        return unpatch_rows(x, (self.t_pred_patch_size, *self.patch_embed.patch_size), grid)

    def random_masking(self, x, mask_ratio, noise=None):
        """x ``[N, L, D]`` -> ``(x_masked [N, K, D], mask [N, L], ids_restore, ids_keep)``."""
        return random_masking_with_ids(x, mask_ratio, noise)

    def forward_encoder(self, x, mask_ratio, noise=None):
        """imgs ``[N, C, T, H, W]`` -> latent ``[N, K, D]`` (no cls), mask, ids_restore."""
        self._check_step(x, mask_ratio, noise)
        x = self.patch_embed(x)
        n, t, spatial, width = x.shape
        x = x.reshape(n, t * spatial, width)
        x, mask, ids_restore, ids_keep = self.random_masking(x, mask_ratio, noise)
        if self.cls_embed:
            x = torch.cat((self.cls_token.expand(n, -1, -1), x), dim=1)
        # The table of every token's position (mae_st sums the separable one the same way),
        # gathered at the kept tokens; the cls row (pos_embed_class, or row 0) in front.
        table = self.position_table()
        start = int(self.cls_embed)
        pos_embed = table[:, start:, :].expand(n, -1, -1)
        index = ids_keep.unsqueeze(-1).repeat(1, 1, pos_embed.shape[2])
        pos_embed = torch.gather(pos_embed, dim=1, index=index)
        if self.cls_embed:
            pos_embed = torch.cat([table[:, :1, :].expand(n, -1, -1), pos_embed], 1)
        x = x + pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, int(self.cls_embed) :, :], mask, ids_restore

    def forward_decoder(self, x, ids_restore, decoded_ids=None):
        """latent ``[N, K, D]``, ids_restore ``[N, L]`` -> pred ``[N, L, u'*p*p*C]``. With
        ``decoded_ids [N, R]`` (decoder masking) the blocks see the cls row, if any, and those
        tubelets only, and pred is 0 at the other positions."""
        self._check_decoder_inputs(x, ids_restore)
        n, length = ids_restore.shape
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(n, length - x.shape[1], 1)
        x_ = torch.cat([x, mask_tokens], dim=1)
        x = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x_.shape[2]))
        if self.cls_embed:
            x = torch.cat((self.decoder_cls_token.expand(n, -1, -1), x), dim=1)
        decoder_pos_embed = self.position_table("decoder_")
        x = x + decoder_pos_embed
        if decoded_ids is not None:
            x = select_tokens(x, decoded_ids, self.cls_embed)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        x = x[:, int(self.cls_embed) :, :]
        return x if decoded_ids is None else place_rows(x, decoded_ids, length)

    def forward_loss(self, imgs, pred, mask):
        """imgs ``[N, C, T, H, W]``, pred ``[N, L, u'*p*p*C]``, mask ``[N, L]`` -> 0-dim loss."""
        self._check_loss_inputs(imgs, pred, mask)
        frames = self.target_frames(imgs.shape[2], imgs.device)
        patch_size = (self.t_pred_patch_size, *self.patch_embed.patch_size)
        return masked_pixel_loss(imgs, pred, mask, patch_size, self.norm_pix_loss, frames)

    def forward(self, imgs, mask_ratio=0.75, noise=None, decoder_mask_ratio=None):
        """imgs ``[N, C, T, H, W]`` -> ``(loss, pred [N, L, u'*p*p*C], mask [N, L])``;
        ``decoder_mask_ratio`` overrides the model's (see
        :func:`fastmae.reference.decoder_masking`)."""
        return forward_with_decoder_masking(self, imgs, mask_ratio, noise, decoder_mask_ratio)


_base, _large, _huge = make_factories(MaskedAutoencoderViT, VIDEO_FACTORIES)
mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14 = _base, _large, _huge
