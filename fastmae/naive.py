"""The plain-torch form of every fused op: the official op sequence (and, for decoder masking,
its stated rule) as functions of tensors, without input checks.

Three users, one implementation: :mod:`fastmae.reference`'s oracle models are built from these,
:mod:`fastmae._unchecked` runs them under ``torch.func`` transforms (which custom ops do not
support), and the tests hold the kernels against them. Nothing here imports a model module, so
the dispatch layer can import it without a cycle (flash-linear-attention keeps a ``naive.py``
beside each op for the same reasons).
"""

from __future__ import annotations

import torch

from fastmae._checks import to_2tuple
from fastmae.config import NORM_PIX_EPS


def patch_rows(imgs: torch.Tensor, patch_size) -> torch.Tensor:
    """Unchecked patchify of images ``[N, C, H, W]`` (patch ``(ph, pw)``) or videos ``[N, C, T,
    H, W]`` (tubelet ``(u, ph, pw)``) -> ``[N, t*h*w, u*ph*pw*C]``, pixels ``(u, i, j, c)``."""
    video = imgs.unsqueeze(2) if imgs.dim() == 4 else imgs
    u, ph, pw = (1, *patch_size) if imgs.dim() == 4 else patch_size
    n, c, frames, height, width = video.shape
    t, h, w = frames // u, height // ph, width // pw
    x = video.reshape(n, c, t, u, h, ph, w, pw)
    x = torch.einsum("nctuhpwq->nthwupqc", x)
    return x.reshape(n, t * h * w, u * ph * pw * c)


def unpatch_rows(x: torch.Tensor, patch_size, grid_size) -> torch.Tensor:
    """Unchecked inverse of :func:`patch_rows`: patch ``(ph, pw)`` and grid ``(h, w)`` give
    images, tubelet ``(u, ph, pw)`` and grid ``(t, h, w)`` videos."""
    u, ph, pw = (1, *patch_size) if len(patch_size) == 2 else patch_size
    t, h, w = (1, *grid_size) if len(grid_size) == 2 else grid_size
    n, c = x.shape[0], x.shape[2] // (u * ph * pw)
    x = x.reshape(n, t, h, w, u, ph, pw, c)
    x = torch.einsum("nthwupqc->nctuhpwq", x)
    video = x.reshape(n, c, t * u, h * ph, w * pw)
    return video[:, :, 0] if len(patch_size) == 2 else video


def masking_indices(noise: torch.Tensor, len_keep: int):
    """noise ``[N, L]`` -> ``(ids_keep [N, K], ids_restore [N, L], mask [N, L])`` by the
    official double argsort; the mask (1 = removed) has the default float dtype."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(noise.shape, device=noise.device)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], ids_restore, torch.gather(mask, dim=1, index=ids_restore)


def add_positions(tokens, ids_keep, cls_token, pos_embed):
    """Kept tokens ``[N, K, D]`` -> ``[N, S+K, D]``: each + ``pos_embed[:, S + id]``, after the
    cls token (if not None, S = 1) + ``pos_embed[:, :1]``; pos_embed ``[1, S+L, D]``."""
    start = 0 if cls_token is None else 1
    positions = pos_embed[:, start:, :].expand(tokens.shape[0], -1, -1)
    index = ids_keep.unsqueeze(-1).repeat(1, 1, tokens.shape[2])
    x = tokens + torch.gather(positions, dim=1, index=index)
    if cls_token is None:
        return x
    cls_token = cls_token + pos_embed[:, :1, :]
    return torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)


def embed_visible_patches(imgs, ids_keep, weight, bias, cls_token, pos_embed):
    """The patch embedding (a conv with stride = kernel; Conv3d weights embed videos) of every
    patch, the kept ones gathered and positioned by :func:`add_positions`."""
    conv = torch.nn.functional.conv2d if weight.dim() == 4 else torch.nn.functional.conv3d
    tokens = conv(imgs, weight, bias, stride=tuple(weight.shape[2:]))
    tokens = tokens.flatten(2).transpose(1, 2)
    kept = torch.gather(tokens, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, tokens.shape[2]))
    return add_positions(kept, ids_keep, cls_token, pos_embed)


def unshuffle_tokens(x, ids_restore, mask_token, pos_embed, has_cls: bool = True):
    """Decoder input: x ``[N, S+K, Dd]`` -> ``[N, S+L, Dd]`` with mask tokens, unshuffled, +
    pos_embed ``[1, S+L, Dd]``; S = 1 (a cls row first) with ``has_cls``."""
    start = int(has_cls)
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + start - x.shape[1], 1)
    x_ = torch.cat([x[:, start:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :start, :], x_], dim=1)
    return x + pos_embed


def shuffled_tokens(x, ids_shuffle, mask_token, pos_embed, has_cls: bool = True):
    """The decoder input in shuffled order: x ``[N, S+K, Dd]``, then mask tokens, row r of them
    plus ``pos_embed[:, S + ids_shuffle[n, r]]`` -> ``[N, S+R, Dd]`` for ``ids_shuffle [N, R]``
    (all L ids, or the first R under decoder masking). Attention does not depend on the order
    of the tokens, so a decoder gives each the same output as in :func:`unshuffle_tokens`."""
    start = int(has_cls)
    n, rows = ids_shuffle.shape
    mask_tokens = mask_token.expand(n, rows + start - x.shape[1], -1)
    tokens = torch.cat([x[:, start:, :], mask_tokens], dim=1)
    positions = pos_embed[:, start:, :].expand(n, -1, -1)
    index = ids_shuffle.unsqueeze(-1).expand(-1, -1, x.shape[2])
    tokens = tokens + torch.gather(positions, dim=1, index=index)
    return torch.cat([x[:, :start, :] + pos_embed[:, :start, :], tokens], dim=1)


def decoded_weights(ids_restore, len_keep: int, total: int):
    """``[N, L]``: 1 where a patch's rank lies in ``[len_keep, total)`` (removed, decoded)."""
    decoded = (ids_restore >= len_keep) & (ids_restore < total)
    return decoded.to(torch.get_default_dtype())


def select_tokens(x, ids, has_cls: bool = True):
    """x ``[N, S+L, D]`` -> ``[N, S+R, D]``: the cls row (S = 1 with ``has_cls``), then the rows
    of patches ``ids [N, R]``."""
    start = int(has_cls)
    index = ids.unsqueeze(-1).expand(-1, -1, x.shape[2])
    return torch.cat([x[:, :start, :], torch.gather(x[:, start:, :], 1, index)], dim=1)


def place_rows(rows, ids, length: int):
    """rows ``[N, R, P]`` -> ``[N, length, P]``, row r at position ``ids[n, r]`` and zeros
    elsewhere: the prediction of a decoder that saw only some positions. Differentiable."""
    n, _, pixels = rows.shape
    index = ids.unsqueeze(-1).expand(-1, -1, pixels)
    return rows.new_zeros(n, length, pixels).scatter(1, index, rows)


def masked_pixel_loss(
    imgs, pred, mask, patch_size, norm_pix_loss: bool = False, frames=None, pred_ids=None
):
    """Mean squared error per patch, averaged over the removed patches (mask 1).

    imgs ``[N, C, H, W]`` with patch ``(ph, pw)``, or a video ``[N, C, T, H, W]`` with tubelet
    ``(u, ph, pw)`` whose targets are the frames ``frames`` (int64; all without). Row r of pred
    ``[N, R, P]`` (and of mask ``[N, R]``) is patch r, or patch ``pred_ids[n, r]``. With
    ``norm_pix_loss`` the target patch is normalised by its mean and unbiased variance
    (+1e-6). A mask that sums to exactly 0 (no removed patch) gives 0 where the official code
    gives NaN; any other real mask, negative weights too, gives the official value.
    """
    if frames is not None:
        imgs = torch.index_select(imgs, 2, frames)
    if imgs.dim() == 4:
        patch_size = to_2tuple(patch_size, "patch_size")
    target = patch_rows(imgs, patch_size)
    if pred_ids is not None:
        target = torch.gather(target, 1, pred_ids[..., None].expand(-1, -1, target.shape[2]))
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    mask = mask.view(loss.shape)
    mask_sum = mask.sum()
    nonzero_sum = mask_sum != 0
    loss = (loss * mask).sum() / torch.where(nonzero_sum, mask_sum, torch.ones_like(mask_sum))
    return torch.where(nonzero_sum, loss, torch.zeros_like(loss))


def masked_pixel_loss_by_ids(video, pred, pred_ids, patch_size, norm: str, unnormalise=None):
    """Hugging Face VideoMAE's loss: the mean over ``pred [N, M, P]`` of ``(pred - target)^2``,
    row m's target being tubelet ``pred_ids[n, m]`` of the video ``[N, C, F, H, W]`` (pixels
    ``(u, i, j, c)``, HF's order too), un-normalised by ``unnormalise [2, C]`` (std, mean)
    and normalised by ``norm``: "none"; "patch", each row by its mean and unbiased variance
    (+ eps), as MAE; "channel", each channel of a row ``(x - mean) / (std + eps)`` with the
    unbiased std, as VideoMAE. No gradient flows into the video; no row at all gives 0."""
    target = patch_rows(video.detach(), patch_size)
    target = torch.gather(target, 1, pred_ids[..., None].expand(-1, -1, target.shape[2]))
    n, rows, pixels = target.shape
    channels = video.shape[1]
    by_channel = target.reshape(n, rows, pixels // channels, channels)
    if unnormalise is not None:
        std, mean = unnormalise.to(target.dtype)
        by_channel = by_channel * std + mean
    if norm == "channel":
        mean = by_channel.mean(dim=2, keepdim=True)
        std = by_channel.var(dim=2, unbiased=True, keepdim=True).sqrt()
        by_channel = (by_channel - mean) / (std + NORM_PIX_EPS)
    target = by_channel.reshape(n, rows, pixels)
    if norm == "patch":
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    if not target.numel():
        return (pred * 0).sum()
    return ((pred - target) ** 2).mean()
