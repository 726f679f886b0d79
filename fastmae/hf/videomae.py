"""VideoMAE (``model_type`` "videomae"): ``VideoMAEForPreTraining`` and ``VideoMAEModel``.

The caller gives the masked tubelets as ``bool_masked_pos [N, L]``, the same count in every
sample, as HF requires. What runs fused:
- the encoder input: only the visible tubelets are embedded (gather, GEMM, fixed sin-cos
  positions), read in place from ``pixel_values [N, T, C, H, W]``, where HF's Conv3d embeds
  every tubelet and then keeps the visible ones (``VideoMAEEmbeddings.forward``; the kernel
  that reads the projection's weight runs in the projection's own forward, for FSDP2);
- the decoder input in one pass: the visible tokens, then mask tokens, each plus the decoder
  position of its tubelet, in HF's order (visible first);
- the loss, read from ``pixel_values`` in place: HF's labels (ImageNet un-normalisation when
  the model has 3 channels; with ``norm_pix_loss`` each tubelet normalised per channel over its
  ``tubelet_size * patch_size**2`` values, ``(x - mean) / (std + 1e-6)`` with the unbiased
  std) for the masked tubelets only, against logits rows in HF's order, with no permuted copy
  of the clip. As in HF, no gradient flows into ``pixel_values`` through the labels.
Everything else is HF's own: the layers and their attention implementation, the decoder,
``output_hidden_states``/``output_attentions``, ``use_mean_pooling``, gradient checkpointing,
the output classes and ``return_dict``. Loss, logits and gradients equal the unpatched model's
on the same weights and ``bool_masked_pos``, within float32 rounding.

Calls that fall back to HF's own code for that call, with HF's result or HF's error:
``bool_masked_pos`` None or not a bool ``[N, L]`` tensor on the clip's device;
``pixel_values`` that are not a floating ``[N, T, C, H, W]`` clip of the config's frames,
channels and image size in the model's dtype (any floating dtype under autocast); a model of
other than 3 channels without ``norm_pix_loss`` (HF refuses it); calls under ``torch.func``
transforms; a mask that masks every tubelet, or (``VideoMAEForPreTraining``) none. The
deliberate difference: a ``bool_masked_pos`` that masks different counts in different samples
raises a ValueError saying so (HF's reshape either fails or silently mixes samples).

Decoder masking (``apply_fastmae(model, decoder_mask_ratio=...)``, or forward's
``decoder_mask [N, L]``): the decoder sees the visible tubelets and the decoded masked ones
only (a uniform random subset of ``int(masked * (1 - ratio))``, the lowest of a ``torch.rand``
drawn first in forward, or those ``decoder_mask`` marks), and the logits ``[N, M, P]`` and the
loss are the decoded tubelets', in increasing order. :mod:`fastmae.hf.reference` holds its
plain-torch oracle.

Needs transformers 5.x or 4.x from 4.40.
"""

from __future__ import annotations

import inspect

import torch

from fastmae import _checks, _unchecked
from fastmae.dispatch import functorch_active
from fastmae.hf import _patching

try:
    from transformers.models.videomae import modeling_videomae as hf_videomae
    from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
except ImportError as error:  # pragma: no cover - exercised without transformers
    raise ImportError("fastmae.hf needs transformers: pip install 'fastmae[hf]'") from error

# HF's own methods, kept before any patching: the fallbacks call them, unpatch restores them.
_ORIGINAL = {
    (cls, name): getattr(cls, name)
    for cls, name in (
        (hf_videomae.VideoMAEPatchEmbeddings, "__init__"),
        (hf_videomae.VideoMAEPatchEmbeddings, "forward"),
        (hf_videomae.VideoMAEEmbeddings, "forward"),
        (hf_videomae.VideoMAEForPreTraining, "forward"),
    )
}
# 4.x forwards take return_dict themselves; 5.x's get it from can_return_tuple.
_TAKES_RETURN_DICT = (
    "return_dict" in inspect.signature(hf_videomae.VideoMAEForPreTraining.forward).parameters
)


def _original(cls, name):
    return _ORIGINAL[(cls, name)]


# -- when the fused path applies -----------------------------------------------------------------


def _masked_per_sample(embeddings, pixel_values, bool_masked_pos):
    """The number of masked tubelets per sample where the fused path takes this call, else
    None (HF's code runs). Raises ValueError for a mask whose counts differ between samples."""
    patches = embeddings.patch_embeddings
    config = embeddings.config
    size = tuple(patches.image_size)
    fusable = (
        not functorch_active()
        and _checks.passes(
            _checks.check_clip, pixel_values, config.num_frames, patches.num_channels, size
        )
        and config.num_frames % patches.tubelet_size == 0
        and _checks.dtype_matches(pixel_values, patches.projection.weight)
        and _checks.passes(
            _checks.check_bool_masked_pos,
            bool_masked_pos,
            pixel_values.shape[0],
            patches.num_patches,
            pixel_values.device,
        )
    )
    if not fusable:
        return None
    masked = _checks.masked_per_sample(bool_masked_pos)
    return None if masked == patches.num_patches else masked  # nothing visible: HF's error


def _visible_then_masked(bool_masked_pos, decoder_mask=None):
    """``ids_shuffle [N, L]``: each sample's visible tubelets, then its masked ones (with
    ``decoder_mask``, the decoded masked ones, then the others), each group in increasing
    order (the order of HF's ``x[~mask]`` and ``x[mask]``)."""
    key = bool_masked_pos.to(torch.int8)
    if decoder_mask is not None:
        key = key * 2 - decoder_mask.to(torch.int8)
    return torch.argsort(key, dim=1, stable=True)


def _compute_dtype(tensor, weight):
    """The dtype HF's Conv3d gives: autocast's where it is on, else the weight's."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _labels_unnormalisation(config, pixel_values):
    """``[2, C]`` (std, mean) of ImageNet for 3 channels (HF un-normalises them), else None."""
    if config.num_channels != 3:
        return None
    values = [IMAGENET_DEFAULT_STD, IMAGENET_DEFAULT_MEAN]
    return torch.tensor(values, dtype=torch.float32, device=pixel_values.device)


# -- the fused methods ---------------------------------------------------------------------------


def _patch_embeddings_forward(self, pixel_values, ids_keep=None, pos_embed=None):
    """``VideoMAEPatchEmbeddings.forward``, HF's; with ``ids_keep [N, K]``, the visible
    tubelets' embeddings plus their positions ``pos_embed [L, D]``: ``[N, K, D]``, read from
    the clip ``[N, T, C, H, W]`` in place."""
    if ids_keep is None:
        return _original(hf_videomae.VideoMAEPatchEmbeddings, "forward")(self, pixel_values)
    clip = pixel_values.permute(0, 2, 1, 3, 4)  # [N, C, T, H, W], a view
    return _patching.project(self, clip, ids_keep, None, pos_embed)


def _embeddings_forward(self, pixel_values, bool_masked_pos):
    """``VideoMAEEmbeddings.forward``: -> the visible tubelets' embeddings ``[N, K, D]``."""
    masked = _masked_per_sample(self, pixel_values, bool_masked_pos)
    if masked is None:
        original = _original(hf_videomae.VideoMAEEmbeddings, "forward")
        return original(self, pixel_values, bool_masked_pos)
    visible = self.num_patches - masked
    ids_keep = _visible_then_masked(bool_masked_pos)[:, :visible]
    # HF adds the fixed table in the embeddings' dtype (autocast's, under autocast).
    dtype = _compute_dtype(pixel_values, self.patch_embeddings.projection.weight)
    positions = self.position_embeddings.to(device=pixel_values.device, dtype=dtype)
    return self.patch_embeddings(pixel_values, ids_keep=ids_keep, pos_embed=positions)


def _decoder_mask(self, pixel_values, bool_masked_pos, masked: int, decoder_mask, noise):
    """The checked ``decoder_mask [N, L]`` (bool, a subset of the masked tubelets, the same
    count in every sample) and its count M; where the caller gave none, the
    ``int(masked * (1 - ratio))`` masked tubelets of lowest ``noise [N, L]``: a uniform random
    subset."""
    if decoder_mask is None:
        decoded = int(masked * (1 - _patching.decoder_mask_ratio(self)))
        ranks = noise.masked_fill(~bool_masked_pos, 2.0).argsort(dim=1)[:, :decoded]
        chosen = torch.zeros_like(bool_masked_pos).scatter(1, ranks, True)
        return chosen, decoded
    batch, length = bool_masked_pos.shape
    _checks.check_bool_masked_pos(decoder_mask, batch, length, pixel_values.device, "decoder_mask")
    if (decoder_mask & ~bool_masked_pos).any():
        raise ValueError(
            "decoder_mask must mark only masked tubelets (True in bool_masked_pos), got "
            f"{int((decoder_mask & ~bool_masked_pos).sum())} visible ones marked"
        )
    return decoder_mask, _checks.masked_per_sample(decoder_mask, "decoder_mask")


def _pretraining_forward(self, pixel_values, bool_masked_pos=None, *, decoder_mask=None, **kwargs):
    """``VideoMAEForPreTraining.forward``: HF's encoder call (its embeddings fused by their
    own patch), the fused decoder input, HF's decoder, the fused loss.

    Decoder masking (``decoder_mask [N, L]``, or the model's decoder mask ratio): the decoder
    sees the visible tubelets and the decoded masked ones only, and the logits ``[N, M, P]``
    and loss are those of the M decoded tubelets, in increasing order."""
    embeddings, config = self.videomae.embeddings, self.config
    decoding = decoder_mask is not None or _patching.decoder_mask_ratio(self) > 0
    # The decoded subset's draw comes first, before the encoder's.
    noise = None
    if decoding and decoder_mask is None and isinstance(bool_masked_pos, torch.Tensor):
        noise = torch.rand(bool_masked_pos.shape, device=bool_masked_pos.device)
    masked = None
    if config.norm_pix_loss or config.num_channels == 3:  # else HF refuses to make labels
        masked = _masked_per_sample(embeddings, pixel_values, bool_masked_pos)
    original = _original(hf_videomae.VideoMAEForPreTraining, "forward")
    legacy_return_dict = kwargs.pop("return_dict", None) if _TAKES_RETURN_DICT else None
    if not masked:  # not fusable, or nothing masked (HF's decoder then returns every token)
        if decoding:
            raise ValueError(
                "decoder masking (decoder_mask or decoder_mask_ratio) needs a call the fused "
                "path takes: a bool_masked_pos [N, L] that masks some tubelets, and a clip of "
                "the config's shape in the model's dtype, with labels HF can make; got "
                f"pixel_values {_checks.describe(pixel_values)}, bool_masked_pos "
                f"{_checks.describe(bool_masked_pos)}"
            )
        if legacy_return_dict is not None:
            kwargs["return_dict"] = legacy_return_dict
        return original(self, pixel_values, bool_masked_pos, **kwargs)
    visible, decoded = embeddings.num_patches - masked, masked
    if decoding:
        decoder_mask, decoded = _decoder_mask(
            self, pixel_values, bool_masked_pos, masked, decoder_mask, noise
        )
    if _TAKES_RETURN_DICT:
        kwargs["return_dict"] = True
    outputs = self.videomae(pixel_values, bool_masked_pos=bool_masked_pos, **kwargs)
    tokens = self.encoder_to_decoder(outputs.last_hidden_state)
    ids_shuffle = _visible_then_masked(bool_masked_pos, decoder_mask)[:, : visible + decoded]
    # HF adds the fixed decoder table in the clip's dtype.
    positions = self.position_embeddings.to(device=pixel_values.device, dtype=pixel_values.dtype)
    decoder_input = _unchecked.unshuffle_tokens(
        tokens, ids_shuffle, self.mask_token, positions, has_cls=False, shuffled=True
    )
    # HF's decoder returns its last `return_token_num` rows, every row for 0.
    logits = self.decoder(decoder_input, decoded or decoder_input.shape[1]).logits
    logits = logits[:, logits.shape[1] - decoded :]
    loss = _unchecked.masked_pixel_loss_by_ids(
        pixel_values.permute(0, 2, 1, 3, 4),  # [N, C, T, H, W], a view
        logits,
        ids_shuffle[:, visible:],
        (config.tubelet_size, config.patch_size, config.patch_size),
        "channel" if config.norm_pix_loss else "none",
        _labels_unnormalisation(config, pixel_values),
    )
    output = hf_videomae.VideoMAEForPreTrainingOutput(
        loss=loss,
        logits=logits,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )
    if _TAKES_RETURN_DICT:
        use_return_dict = (
            config.use_return_dict if legacy_return_dict is None else legacy_return_dict
        )
        return output if use_return_dict else output.to_tuple()
    return output


# The module-level name is the wrapped function, so that pickle finds it by its name.
_pretraining_forward = _patching.tuple_capable(_pretraining_forward)


def _modules(model) -> dict:
    """The module of each patched class inside a VideoMAEForPreTraining or VideoMAEModel."""
    modules = {}
    if isinstance(model, hf_videomae.VideoMAEForPreTraining):
        modules[hf_videomae.VideoMAEForPreTraining] = model
        model = model.videomae
    modules[hf_videomae.VideoMAEEmbeddings] = model.embeddings
    modules[hf_videomae.VideoMAEPatchEmbeddings] = model.embeddings.patch_embeddings
    return modules


FAMILY = _patching.ModelFamily(
    model_type="videomae",
    classes=(hf_videomae.VideoMAEForPreTraining, hf_videomae.VideoMAEModel),
    original=_ORIGINAL,
    fused={
        (hf_videomae.VideoMAEPatchEmbeddings, "forward"): _patch_embeddings_forward,
        (hf_videomae.VideoMAEEmbeddings, "forward"): _embeddings_forward,
        (hf_videomae.VideoMAEForPreTraining, "forward"): _pretraining_forward,
    },
    modules=_modules,
    patch_embeddings=hf_videomae.VideoMAEPatchEmbeddings,
    pretraining=hf_videomae.VideoMAEForPreTraining,
)
_patching.present_signatures(
    FAMILY, extra_keywords={(hf_videomae.VideoMAEForPreTraining, "forward"): ("decoder_mask",)}
)
