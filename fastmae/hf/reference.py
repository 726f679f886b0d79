"""Plain-torch oracles of Hugging Face's ViTMAE and VideoMAE pre-training forwards with
decoder masking, run on an unpatched model's own modules: the tests compare
:func:`fastmae.hf.apply_fastmae`'s fused forwards with these.

Each follows HF's own forward step by step (its encoder, its decoder's unshuffle and position
add, its layers, norm and head) and then keeps only the decoded patches, with gathers and
boolean indexing, as an implementation of decoder masking on top of HF would; the VideoMAE
loss is :func:`fastmae.naive.masked_pixel_loss_by_ids`, HF's labels in plain torch. With
every masked patch decoded both equal HF's own forwards (the tests check it).
"""

from __future__ import annotations

import torch
from transformers.models.videomae import modeling_videomae as hf_videomae
from transformers.models.vit_mae import modeling_vit_mae as hf_vitmae
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from fastmae import naive


def _mean_over(per_patch, weights):
    """``sum(per_patch * weights) / sum(weights)``, 0 where no patch is weighted (fastmae's
    rule for a loss over no patch, where HF's division gives NaN)."""
    total = weights.sum()
    if total == 0:
        return (per_patch * weights).sum()
    return (per_patch * weights).sum() / total


def vitmae_pretraining(model, pixel_values, noise=None, decoder_mask_ratio: float = 0.0):
    """An unpatched ``ViTMAEForPreTraining`` (transformers 5.x) with decoder masking: the
    decoder sees the cls token, the K kept patches and the ``M = int((L - K) * (1 - ratio))``
    removed ones of lowest noise; the loss averages over those M; logits ``[N, L, P]`` are
    zero at the patches not decoded. Ratio 0 is HF's own forward."""
    outputs = model.vit(pixel_values, noise=noise)
    latent, mask, ids_restore = outputs.last_hidden_state, outputs.mask, outputs.ids_restore
    decoder = model.decoder
    x = decoder.decoder_embed(latent)
    batch, rows, width = x.shape
    length, kept = ids_restore.shape[1], rows - 1
    # HF's unshuffle and position add: every position in patch order.
    mask_tokens = decoder.mask_token.repeat(batch, length - kept, 1)
    tokens = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).repeat(1, 1, width))
    x = torch.cat([x[:, :1, :], tokens], dim=1) + decoder.decoder_pos_embed
    # The patches the decoder sees: ranks 0 .. K+M-1 of the noise.
    decoded = kept + int((length - kept) * (1 - decoder_mask_ratio))
    seen = torch.argsort(ids_restore, dim=1)[:, :decoded]
    x = torch.cat(
        [x[:, :1, :], torch.gather(x[:, 1:, :], 1, seen[..., None].expand(-1, -1, width))], 1
    )
    for layer in decoder.decoder_layers:
        x = layer(x)
        x = x[0] if isinstance(x, tuple) else x
    rows = decoder.decoder_pred(decoder.decoder_norm(x))[:, 1:, :]
    pixels = rows.shape[2]
    logits = rows.new_zeros(batch, length, pixels)
    logits = logits.scatter(1, seen[..., None].expand(-1, -1, pixels), rows)
    target = model.patchify(pixel_values)
    if model.config.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((logits - target) ** 2).mean(dim=-1)
    decoded_removed = torch.zeros_like(mask).scatter(1, seen[:, kept:], 1.0)
    return hf_vitmae.ViTMAEForPreTrainingOutput(
        loss=_mean_over(per_patch, mask * decoded_removed),
        logits=logits,
        mask=mask,
        ids_restore=ids_restore,
    )


def videomae_pretraining(model, pixel_values, bool_masked_pos, decoder_mask):
    """An unpatched ``VideoMAEForPreTraining`` with decoder masking: the decoder sees the
    visible tubelets and the masked ones ``decoder_mask [N, L]`` marks (VideoMAE V2's
    ``decode_masked_pos``), the logits ``[N, M, P]`` and the MSE are those of the M marked
    tubelets in increasing order. ``decoder_mask == bool_masked_pos`` is HF's own forward."""
    outputs = model.videomae(pixel_values, bool_masked_pos=bool_masked_pos)
    x = model.encoder_to_decoder(outputs.last_hidden_state)
    batch, _, width = x.shape
    positions = model.position_embeddings.expand(batch, -1, -1).type_as(pixel_values)
    positions = positions.detach().to(device=pixel_values.device, copy=True)
    visible_positions = positions[~bool_masked_pos].reshape(batch, -1, width)
    decoded_positions = positions[decoder_mask].reshape(batch, -1, width)
    decoded = decoded_positions.shape[1]
    x = torch.cat([x + visible_positions, model.mask_token + decoded_positions], dim=1)
    for layer in model.decoder.decoder_layers:
        x = layer(x)
        x = x[0] if isinstance(x, tuple) else x
    logits = model.decoder.head(model.decoder.norm(x[:, x.shape[1] - decoded :]))
    config = model.config
    # HF's labels: ImageNet un-normalisation for 3 channels, per-channel norm_pix_loss.
    unnormalise = None
    if config.num_channels == 3:
        table = [IMAGENET_DEFAULT_STD, IMAGENET_DEFAULT_MEAN]
        unnormalise = torch.tensor(table, dtype=pixel_values.dtype, device=pixel_values.device)
    decoded_ids = torch.argsort((~decoder_mask).to(torch.int8), dim=1, stable=True)[:, :decoded]
    loss = naive.masked_pixel_loss_by_ids(
        pixel_values.permute(0, 2, 1, 3, 4),  # [N, C, T, H, W]
        logits,
        decoded_ids,
        (config.tubelet_size, config.patch_size, config.patch_size),
        "channel" if config.norm_pix_loss else "none",
        unnormalise,
    )
    return hf_videomae.VideoMAEForPreTrainingOutput(loss=loss, logits=logits)
