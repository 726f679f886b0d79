"""ViTMAE (``model_type`` "vit_mae"): ``ViTMAEForPreTraining`` and ``ViTMAEModel``.

What runs fused (the same ops as the drop-in model, on the same backends):
- the encoder input: the mask drawn from ``noise`` (HF's ``random_masking``, with the config's
  ``mask_ratio``), the patch embedding of the kept patches only, the position add and the cls
  token (``ViTMAEEmbeddings.forward``; the kernel that reads the projection's weight runs in
  the projection's own forward, so FSDP2 may shard any module on the way);
- the decoder input: the unshuffle with ``mask_token`` and ``decoder_pos_embed`` in one pass
  (``ViTMAEDecoder.forward``, whose layers, norm and prediction stay HF's);
- the loss with ``config.norm_pix_loss``, read from ``pixel_values`` without a patchified copy.
Everything else is HF's own: the layers and their attention implementation,
``output_hidden_states``/``output_attentions``, gradient checkpointing, the output classes and
``return_dict``. Outputs (loss, logits, mask, ids_restore) and gradients equal the unpatched
model's on the same weights and noise, within float32 rounding; without ``noise`` the same
seed gives the same mask. The one deliberate difference is fastmae's: a mask that removes no
patch (``mask_ratio`` 0) gives loss 0, where HF's ``sum / mask.sum()`` gives NaN.

Calls that fall back to HF's own code for that call, with HF's result or HF's error, are those
the drop-in's own input checks (``fastmae._checks``) refuse: ``interpolate_pos_encoding=True``;
``pixel_values`` that are not a floating ``[N, C, H, W]`` tensor of the config's channels and
image size; ``noise`` that is not a floating ``[N, L]`` tensor on the images' device; a
``mask_ratio`` outside ``[0, 1)``; decoder inputs whose ``ids_restore`` is not ``[N, L]`` of
the model's L; a loss whose ``pred`` or ``mask`` is not shaped as the model makes them.

Decoder masking (``apply_fastmae(model, decoder_mask_ratio=...)``, transformers 5.x): the
decoder sees the cls token, the kept patches and the removed ones of lowest noise only (the
rule of :func:`fastmae.reference.decoder_masking`), logits stay ``[N, L, P]`` (zero where not
decoded) and the loss averages over the decoded removed patches; a call HF's own code would
take raises instead. :mod:`fastmae.hf.reference` holds its plain-torch oracle.

Supports transformers 5.x, and 4.x from 4.40 (where ``ViTMAEForPreTraining`` has
``forward_loss`` and the decoder takes ``output_attentions``): the patch is chosen by the
features the installed version has, not by its version string.
"""

from __future__ import annotations

import functools
import inspect

import torch

from fastmae import _checks, _unchecked, fused
from fastmae.hf import _patching

try:
    from transformers.models.vit_mae import modeling_vit_mae as hf_vitmae
except ImportError as error:  # pragma: no cover - exercised without transformers
    raise ImportError("fastmae.hf needs transformers: pip install 'fastmae[hf]'") from error

# HF's own methods, kept before any patching: the fallbacks call them, unpatch restores them.
_ORIGINAL = {
    (hf_vitmae.ViTMAEPatchEmbeddings, "__init__"): hf_vitmae.ViTMAEPatchEmbeddings.__init__,
    (hf_vitmae.ViTMAEPatchEmbeddings, "forward"): hf_vitmae.ViTMAEPatchEmbeddings.forward,
    (hf_vitmae.ViTMAEEmbeddings, "forward"): hf_vitmae.ViTMAEEmbeddings.forward,
    (hf_vitmae.ViTMAEDecoder, "forward"): hf_vitmae.ViTMAEDecoder.forward,
}
# 4.x computes the loss in forward_loss; 5.x inline in forward, which is then replaced whole.
_LOSS_METHOD = "forward_loss" if hasattr(hf_vitmae.ViTMAEForPreTraining, "forward_loss") else None
_PRETRAINING_METHOD = _LOSS_METHOD or "forward"
_ORIGINAL[(hf_vitmae.ViTMAEForPreTraining, _PRETRAINING_METHOD)] = getattr(
    hf_vitmae.ViTMAEForPreTraining, _PRETRAINING_METHOD
)
# Older 4.x decoders collect hidden states and attentions themselves.
_DECODER_COLLECTS_OUTPUTS = (
    "output_attentions" in inspect.signature(hf_vitmae.ViTMAEDecoder.forward).parameters
)


def _original(cls, name):
    return _ORIGINAL[(cls, name)]


# -- when the fused path applies -----------------------------------------------------------------


def _fusable_images(embeddings, pixel_values) -> bool:
    """pixel_values as the fused ops take them: floating [N, C, H, W] of the config's C, H, W,
    in the projection's dtype (any floating dtype under autocast, which casts as HF's conv)."""
    patches = embeddings.patch_embeddings
    size = tuple(patches.image_size)
    return _checks.passes(
        _checks.check_images, pixel_values, patches.num_channels, size
    ) and _checks.dtype_matches(pixel_values, patches.projection.weight)


def _len_keep(embeddings):
    """HF's ``int(L * (1 - mask_ratio))``, or None where the ratio is outside ``[0, 1)``."""
    num_patches = embeddings.patch_embeddings.num_patches
    ratio = embeddings.config.mask_ratio
    if not _checks.passes(_checks.len_keep, num_patches, ratio):
        return None
    return _checks.len_keep(num_patches, ratio)


def _fusable_noise(noise, pixel_values, num_patches) -> bool:
    return noise is None or _checks.passes(
        _checks.check_noise, noise, pixel_values.shape[0], num_patches, pixel_values.device
    )


# -- the fused methods ---------------------------------------------------------------------------


def _embeddings_forward(self, pixel_values, noise=None, interpolate_pos_encoding=False):
    """``ViTMAEEmbeddings.forward``: -> (embeddings ``[N, 1+K, D]``, mask, ids_restore)."""
    num_patches = self.patch_embeddings.num_patches
    len_keep = _len_keep(self)
    fusable = (
        not interpolate_pos_encoding
        and _fusable_images(self, pixel_values)
        and _fusable_noise(noise, pixel_values, num_patches)
        and len_keep is not None
    )
    if not fusable:
        extra = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}
        original = _original(hf_vitmae.ViTMAEEmbeddings, "forward")
        return original(self, pixel_values, noise=noise, **extra)
    if noise is None:  # HF's draw, at the same point of the random stream
        noise = torch.rand(pixel_values.shape[0], num_patches, device=pixel_values.device)
    ids_keep, ids_restore, mask = _unchecked.random_masking_indices(noise, len_keep)
    embeddings = self.patch_embeddings(
        pixel_values,
        ids_keep=ids_keep,
        cls_token=self.cls_token,
        pos_embed=self.position_embeddings,
    )
    return embeddings, mask, ids_restore


def _patch_embeddings_forward(
    self, pixel_values, *args, ids_keep=None, cls_token=None, pos_embed=None, **kwargs
):
    """``ViTMAEPatchEmbeddings.forward``, HF's; with ``ids_keep``, the fused encoder input
    ``[N, 1+K, D]`` (see :func:`fastmae.hf._patching.project`)."""
    if ids_keep is None:
        original = _original(hf_vitmae.ViTMAEPatchEmbeddings, "forward")
        return original(self, pixel_values, *args, **kwargs)
    return _patching.project(self, pixel_values, ids_keep, cls_token, pos_embed)


def _decoder_forward(self, hidden_states, ids_restore, *args, decoded_ids=None, **kwargs):
    """``ViTMAEDecoder.forward``: the fused unshuffle, then HF's layers, norm and prediction.

    With ``decoded_ids [N, K+M]`` (decoder masking, from the pretraining forward): the decoder
    sees the cls token and the patches ``decoded_ids`` only, the K kept ones then M mask tokens,
    in that order, and its logits are their rows ``[N, K+M, P]``."""
    if decoded_ids is not None:
        x = self.decoder_embed(hidden_states)
        x = _unchecked.unshuffle_tokens(
            x, decoded_ids, self.mask_token, self.decoder_pos_embed, shuffled=True
        )
        return _decoder_layers(self, x)
    width, length = self.decoder_embed.in_features, self.decoder_pos_embed.shape[1] - 1
    fusable = (
        not args
        and not kwargs.get("interpolate_pos_encoding", False)
        and _checks.passes(
            _checks.check_decoder_inputs, hidden_states, ids_restore, width, length, True
        )
    )
    if not fusable:
        original = _original(hf_vitmae.ViTMAEDecoder, "forward")
        return original(self, hidden_states, ids_restore, *args, **kwargs)
    x = self.decoder_embed(hidden_states)
    x = _unchecked.unshuffle_tokens(x, ids_restore, self.mask_token, self.decoder_pos_embed)
    if _DECODER_COLLECTS_OUTPUTS:
        return _decoder_layers_collecting(self, x, **kwargs)
    return _decoder_layers(self, x)


def _decoder_layers(self, x):
    """The rest of a 5.x decoder forward: HF's layers, norm and prediction, cls row dropped."""
    for layer in self.decoder_layers:
        x = layer(x)
        x = x[0] if isinstance(x, tuple) else x
    logits = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
    return hf_vitmae.ViTMAEDecoderOutput(logits=logits)


def _decoder_layers_collecting(
    self, x, output_attentions=False, output_hidden_states=False, return_dict=True
):
    """The rest of a 4.x decoder forward that collects hidden states and attentions itself."""
    all_hidden_states = () if output_hidden_states else None
    all_attentions = () if output_attentions else None
    for layer in self.decoder_layers:
        if output_hidden_states:
            all_hidden_states += (x,)
        if self.gradient_checkpointing and self.training:
            outputs = self._gradient_checkpointing_func(layer.__call__, x, None, output_attentions)
        else:
            outputs = layer(x, head_mask=None, output_attentions=output_attentions)
        x = outputs[0]
        if output_attentions:
            all_attentions += (outputs[1],)
    if output_hidden_states:
        all_hidden_states += (x,)
    logits = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
    if not return_dict:
        return tuple(v for v in (logits, all_hidden_states, all_attentions) if v is not None)
    return hf_vitmae.ViTMAEDecoderOutput(
        logits=logits, hidden_states=all_hidden_states, attentions=all_attentions
    )


def _fused_loss(self, pixel_values, pred, mask):
    """The fused loss, or None where pred and mask are not shaped as the model makes them."""
    config = self.config
    patch = config.patch_size
    length = self.vit.embeddings.patch_embeddings.num_patches
    pixels = patch * patch * config.num_channels
    fusable = _fusable_images(self.vit.embeddings, pixel_values) and _checks.passes(
        _checks.check_pred_and_mask, pred, mask, pixel_values, length, pixels
    )
    if not fusable:
        return None
    return _unchecked_loss(self, pixel_values, pred, mask)


def _unchecked_loss(self, pixel_values, pred, mask, pred_ids=None):
    """The fused loss on checked inputs (see :func:`fastmae._unchecked.masked_pixel_loss`)."""
    patch = self.config.patch_size
    return _unchecked.masked_pixel_loss(
        pixel_values, pred, mask, (patch, patch), self.config.norm_pix_loss, pred_ids=pred_ids
    )


def _forward_loss(self, pixel_values, pred, mask, interpolate_pos_encoding=False):
    """4.x ``ViTMAEForPreTraining.forward_loss``."""
    loss = None if interpolate_pos_encoding else _fused_loss(self, pixel_values, pred, mask)
    if loss is not None:
        return loss
    extra = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}
    original = _original(hf_vitmae.ViTMAEForPreTraining, "forward_loss")
    return original(self, pixel_values, pred, mask, **extra)


def _pretraining_forward(
    self, pixel_values=None, noise=None, interpolate_pos_encoding=None, attention_mask=None, **kw
):
    """5.x ``ViTMAEForPreTraining.forward`` (its loss is inline): HF's encoder and decoder
    calls (both fused by their own patches) and the fused loss; with a decoder mask ratio, the
    decoder sees only the patches :func:`fastmae.reference.decoder_masking` names."""
    embeddings = self.vit.embeddings
    ratio = _patching.decoder_mask_ratio(self)
    if interpolate_pos_encoding or not _fusable_images(embeddings, pixel_values):
        if ratio:
            raise ValueError(
                f"decoder_mask_ratio {ratio} needs pixel_values as the fused path takes them "
                "(floating [N, C, H, W] of the config's channels and image size, in the "
                "model's dtype) and no interpolate_pos_encoding; got "
                f"{_checks.describe(pixel_values)} with interpolate_pos_encoding="
                f"{interpolate_pos_encoding}"
            )
        original = _original(hf_vitmae.ViTMAEForPreTraining, "forward")
        return original(
            self,
            pixel_values,
            noise=noise,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            **kw,
        )
    outputs = self.vit(
        pixel_values,
        noise=noise,
        interpolate_pos_encoding=interpolate_pos_encoding,
        attention_mask=attention_mask,
        **kw,
    )
    latent, mask, ids_restore = outputs.last_hidden_state, outputs.mask, outputs.ids_restore
    if ratio:
        len_keep = latent.shape[1] - 1
        total = _checks.len_decode(ids_restore.shape[1], len_keep, ratio)
        decoded_ids = _unchecked.shuffle_order(ids_restore)[:, :total]
        rows = self.decoder(latent, ids_restore, decoded_ids=decoded_ids).logits
        loss_fn = functools.partial(_unchecked_loss, self)
        loss, logits = fused.decoder_masked_loss(
            pixel_values, rows, decoded_ids, ids_restore, len_keep, loss_fn
        )
    else:
        logits = self.decoder(latent, ids_restore).logits
        loss = _fused_loss(self, pixel_values, logits, mask)
    return hf_vitmae.ViTMAEForPreTrainingOutput(
        loss=loss,
        logits=logits,
        mask=mask,
        ids_restore=ids_restore,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )


# The module-level name is the wrapped function, so that pickle finds it by its name.
_pretraining_forward = _patching.tuple_capable(_pretraining_forward)


def _modules(model) -> dict:
    """The module of each patched class inside a ViTMAEForPreTraining or ViTMAEModel."""
    if isinstance(model, hf_vitmae.ViTMAEForPreTraining):
        embeddings = model.vit.embeddings
        modules = {hf_vitmae.ViTMAEDecoder: model.decoder, hf_vitmae.ViTMAEForPreTraining: model}
    else:
        embeddings, modules = model.embeddings, {}
    modules[hf_vitmae.ViTMAEEmbeddings] = embeddings
    modules[hf_vitmae.ViTMAEPatchEmbeddings] = embeddings.patch_embeddings
    return modules


FAMILY = _patching.ModelFamily(
    model_type="vit_mae",
    classes=(hf_vitmae.ViTMAEForPreTraining, hf_vitmae.ViTMAEModel),
    original=_ORIGINAL,
    fused={
        (hf_vitmae.ViTMAEPatchEmbeddings, "forward"): _patch_embeddings_forward,
        (hf_vitmae.ViTMAEEmbeddings, "forward"): _embeddings_forward,
        (hf_vitmae.ViTMAEDecoder, "forward"): _decoder_forward,
        (hf_vitmae.ViTMAEForPreTraining, _PRETRAINING_METHOD): (
            _forward_loss if _LOSS_METHOD else _pretraining_forward
        ),
    },
    modules=_modules,
    patch_embeddings=hf_vitmae.ViTMAEPatchEmbeddings,
    pretraining=hf_vitmae.ViTMAEForPreTraining,
    decoder_masking_unsupported=(
        "transformers 5 or newer (4.x computes the loss in forward_loss, which does not see "
        "which patches the decoder saw)"
        if _LOSS_METHOD
        else ""
    ),
)
_patching.present_signatures(FAMILY)
