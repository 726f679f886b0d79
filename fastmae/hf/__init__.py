"""fastmae's fused ops inside Hugging Face transformers' masked autoencoders, with one call.

    import fastmae.hf

    model = VideoMAEForPreTraining.from_pretrained(...)   # or a ViTMAE model
    fastmae.hf.apply_fastmae(model)      # this instance, in place
    # or, before the models are made:
    fastmae.hf.patch("videomae")         # the classes; fastmae.hf.unpatch("videomae") undoes it

Supported, by ``config.model_type``: "vit_mae" (``ViTMAEForPreTraining``, ``ViTMAEModel``:
see :mod:`fastmae.hf.vitmae`) and "videomae" (``VideoMAEForPreTraining``, ``VideoMAEModel``:
see :mod:`fastmae.hf.videomae`), each module saying what runs fused and what falls back to
HF's code. The weights, the state_dict and the outputs stay the model's.
"""

from __future__ import annotations

from fastmae import _checks
from fastmae.hf import _patching, videomae, vitmae

# ViTMAE's fused methods under their names before fastmae.hf became a package: models patched
# by apply_fastmae and pickled then refer to them here.
from fastmae.hf.vitmae import (  # noqa: E402, F401
    _decoder_forward,
    _embeddings_forward,
    _forward_loss,
    _patch_embeddings_forward,
    _pretraining_forward,
)

__all__ = ["MODEL_TYPE_TO_FAMILY", "apply_fastmae", "patch", "unpatch"]

# One entry per supported config.model_type: what apply_fastmae, patch and unpatch dispatch on.
MODEL_TYPE_TO_FAMILY = {family.model_type: family for family in (vitmae.FAMILY, videomae.FAMILY)}


def _supported() -> str:
    return ", ".join(family.describe() for family in MODEL_TYPE_TO_FAMILY.values())


def _families(model_type):
    if model_type is None:
        return list(MODEL_TYPE_TO_FAMILY.values())
    if model_type not in MODEL_TYPE_TO_FAMILY:
        raise ValueError(f"model_type must be one of {_supported()}, got {model_type!r}")
    return [MODEL_TYPE_TO_FAMILY[model_type]]


def apply_fastmae(model, decoder_mask_ratio=0.0):
    """Put the fused ops into one supported model, in place; returns it.

    Dispatches on ``model.config.model_type``. Raises TypeError for a model of any other
    type or class, naming the supported ones.

    ``decoder_mask_ratio`` in [0, 1) (a ``...ForPreTraining`` model only) turns on decoder
    masking, which changes the objective: the decoder sees only part of the masked patches and
    the loss averages over those. ViTMAE: the ``int((L - K) * (1 - ratio))`` removed patches of
    lowest noise, as :func:`fastmae.reference.decoder_masking`; ``logits`` stay ``[N, L, P]``,
    zero at the patches not decoded. VideoMAE: a uniform random subset of the masked tubelets
    of that size, or those that ``forward``'s ``decoder_mask [N, L]`` marks (the same count in
    every sample); ``logits`` are the decoded tubelets' rows ``[N, M, P]``. Calling again sets
    the ratio anew (0 turns it off).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = MODEL_TYPE_TO_FAMILY.get(model_type)
    if family is None or not isinstance(model, family.classes):
        got = f"{type(model).__module__}.{type(model).__qualname__}"
        raise TypeError(
            f"fastmae.hf.apply_fastmae supports {_supported()}; got {got} "
            f"(model_type {model_type!r})"
        )
    ratio = _checks.ratio_value(decoder_mask_ratio, "decoder_mask_ratio")
    _patching.install(model, family, ratio)
    return model


def patch(model_type: str | None = None) -> None:
    """Patch transformers' classes of ``model_type`` (every supported type when None), so that
    every such model, made before or after, runs the fused ops (except instances whose methods
    were replaced one by one)."""
    for family in _families(model_type):
        _patching.patch_classes(family)


def unpatch(model_type: str | None = None) -> None:
    """Undo :func:`patch`: the classes get HF's own methods back. Instances patched by
    :func:`apply_fastmae` keep the fused ops."""
    for family in _families(model_type):
        _patching.unpatch_classes(family)


def patch_vitmae() -> None:
    """``patch("vit_mae")``."""
    patch("vit_mae")


def unpatch_vitmae() -> None:
    """``unpatch("vit_mae")``."""
    unpatch("vit_mae")
