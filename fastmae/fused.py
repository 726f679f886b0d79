"""What the image and the video drop-in share: a forward and the official methods over a
model's unchecked steps, and the official ``random_masking`` on the fused masking op."""

from __future__ import annotations

import torch

from fastmae import _checks, _unchecked, functional, naive
from fastmae.base import masking_noise


class FusedSteps:
    """A drop-in's ``forward`` and official methods over its unchecked steps ``_encoder``,
    ``_decoder``, ``_loss`` (and its checks); shared by the image and the video drop-in."""

    def forward(self, imgs, mask_ratio=0.75, noise=None, decoder_mask_ratio=None):
        """imgs (``[N, C, H, W]``, or ``[N, C, T, H, W]`` for video) -> ``(loss, pred [N, L, P],
        mask [N, L])``. ``noise [N, L]``, if given, replaces the ``torch.rand`` draw that
        decides the mask. ``decoder_mask_ratio`` overrides the model's own (see
        :func:`fastmae.reference.decoder_masking`)."""
        len_keep = self._check_step(imgs, mask_ratio, noise)
        ratio = self._check_decoder_mask_ratio(decoder_mask_ratio)
        latent, mask, ids_restore = self._encoder(imgs, len_keep, noise)
        if not ratio:
            pred = self._decoder(latent, ids_restore)
            return self._loss(imgs, pred, mask), pred, mask
        return self._decoder_masked_step(imgs, latent, mask, ids_restore, len_keep, ratio)

    def _decoder_masked_step(self, imgs, latent, mask, ids_restore, len_keep: int, ratio: float):
        """The decoder and loss under decoder masking: the decoder input in shuffled order (the
        kept tokens, then the mask tokens of the decoded removed patches, each plus its
        position: attention does not depend on the order), no unshuffle; then
        :func:`decoder_masked_loss`."""
        total = _checks.len_decode(ids_restore.shape[1], len_keep, ratio)
        decoded_ids = _unchecked.shuffle_order(ids_restore)[:, :total]
        rows = self._decoder(latent, decoded_ids, shuffled=True)
        loss, pred = decoder_masked_loss(imgs, rows, decoded_ids, ids_restore, len_keep, self._loss)
        return loss, pred, mask

    # -- the official methods, for callers that use them one at a time: each checks its inputs.

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """imgs -> latent ``[N, S+K, D]`` (image: cls first; video: no cls), mask, ids_restore."""
        return self._encoder(imgs, self._check_step(imgs, mask_ratio, noise), noise)

    def forward_decoder(self, x, ids_restore):
        """latent, ids_restore ``[N, L]`` -> pred ``[N, L, P]``. ids_restore must be a
        permutation in each row, as the masking makes it: the kernels would mask an id out of
        range (the official gather raises) and give a repeated id a wrong gradient. The check
        reads the ids on the host; ``forward`` makes its own ids and skips it."""
        self._check_decoder_inputs(x, ids_restore)
        _checks.check_index_values(
            "forward_decoder", "ids_restore", ids_restore, ids_restore.shape[1], distinct=True
        )
        return self._decoder(x, ids_restore)

    def forward_loss(self, imgs, pred, mask):
        """imgs, pred ``[N, L, P]``, mask ``[N, L]`` (1 = removed) -> the 0-dim loss."""
        self._check_loss_inputs(imgs, pred, mask)
        return self._loss(imgs, pred, mask)


def random_masking_with_ids(x, mask_ratio, noise=None):
    """The official ``random_masking`` on the fused masking op, also returning ``ids_keep``
    (as mae_st's does): x ``[N, L, D]`` -> ``(x_masked, mask, ids_restore, ids_keep)``."""
    _checks.check_tensor(x, "x")
    n, length, width = x.shape
    len_keep = _checks.len_keep(length, mask_ratio)
    noise = masking_noise(noise, n, length, x.device)
    ids_keep, ids_restore, mask = functional.random_masking_indices(noise, len_keep)
    x_masked = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, width))
    return x_masked, mask, ids_restore, ids_keep


def decoder_masked_loss(imgs, rows, decoded_ids, ids_restore, len_keep: int, loss):
    """The loss and pred of a decoder that saw only the patches ``decoded_ids [N, K+M]`` (the K
    kept ones, then the M decoded removed ones, in rank order) and predicted ``rows [N, K+M, P]``
    for them (cls aside): -> ``(loss, pred [N, L, P])``, pred zero at the patches not decoded.

    ``loss(imgs, pred, mask, pred_ids=None)`` is the model's unchecked loss. It reads the M
    decoded rows and their target patches by id, or, where the images need a gradient (which
    flows through the targets), the whole of pred weighted by the decoded removed patches."""
    pred = naive.place_rows(rows, decoded_ids, ids_restore.shape[1])
    if imgs.requires_grad and torch.is_grad_enabled():
        weights = naive.decoded_weights(ids_restore, len_keep, decoded_ids.shape[1])
        return loss(imgs, pred, weights), pred
    removed_ids = decoded_ids[:, len_keep:]
    weights = torch.ones(removed_ids.shape, dtype=torch.get_default_dtype(), device=rows.device)
    return loss(imgs, rows[:, len_keep:], weights, pred_ids=removed_ids), pred
