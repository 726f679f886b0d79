"""What the image and the video drop-in share: a forward and the official methods over a
model's unchecked steps, and the official ``random_masking`` on the fused masking op."""

from __future__ import annotations

import torch

from fastmae import _checks, functional
from fastmae.base import masking_noise


class FusedSteps:
    """A drop-in's ``forward`` and official methods over its unchecked steps ``_encoder``,
    ``_decoder``, ``_loss`` (and its checks); shared by the image and the video drop-in."""

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """imgs (``[N, C, H, W]``, or ``[N, C, T, H, W]`` for video) -> ``(loss, pred [N, L, P],
        mask [N, L])``. ``noise [N, L]``, if given, replaces the ``torch.rand`` draw that
        decides the mask."""
        len_keep = self._check_step(imgs, mask_ratio, noise)
        latent, mask, ids_restore = self._encoder(imgs, len_keep, noise)
        pred = self._decoder(latent, ids_restore)
        loss = self._loss(imgs, pred, mask)
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
