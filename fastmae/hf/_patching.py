"""What every patched Hugging Face model family shares: the family record the registry holds,
installing fused methods on one instance or on the classes, and the patch embedding's
projection that runs the fused kernel in its own forward."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

from fastmae.layers import project_patches


@dataclass(frozen=True)
class ModelFamily:
    """One supported ``config.model_type``.

    ``classes`` are the models :func:`fastmae.hf.apply_fastmae` takes; ``original`` and
    ``fused`` map ``(class, method name)`` to HF's method and fastmae's (``original`` also
    holds the patch embedding's ``__init__``, which class patching wraps); ``modules(model)``
    gives, for one model, the module of each patched class inside it; ``patch_embeddings`` is
    the patch-embedding class, whose projection runs the fused kernel; ``pretraining`` the
    class with a decoder, which takes decoder masking unless ``decoder_masking_unsupported``
    says why not.
    """

    model_type: str
    classes: tuple
    original: dict
    fused: dict
    modules: Callable
    patch_embeddings: type
    pretraining: type
    decoder_masking_unsupported: str = ""

    def describe(self) -> str:
        names = ", ".join(cls.__name__ for cls in self.classes)
        return f"{self.model_type!r} ({names})"


def present_signatures(family: ModelFamily, extra_keywords: dict | None = None) -> None:
    """A replaced method presents the original's signature: callers read it (Trainer's
    columns; HF's tests ask whether forward takes output_attentions through its kwargs).
    ``extra_keywords`` maps ``(class, method name)`` to the keyword-only arguments (default
    None) that fastmae's version adds."""
    extra_keywords = extra_keywords or {}
    for (cls, name), fused in family.fused.items():
        signature = inspect.signature(family.original[(cls, name)])
        params = list(signature.parameters.values())
        added = [
            inspect.Parameter(keyword, inspect.Parameter.KEYWORD_ONLY, default=None)
            for keyword in extra_keywords.get((cls, name), ())
        ]
        # Keyword-only arguments go before any **kwargs.
        at = len(params) - (params[-1].kind is inspect.Parameter.VAR_KEYWORD)
        fused.__signature__ = signature.replace(parameters=params[:at] + added + params[at:])


def install(model, family: ModelFamily, decoder_mask_ratio: float = 0.0) -> None:
    """The fused methods on this model's modules, in place, and its decoder mask ratio (a
    checked one), which the fused pretraining forward reads."""
    if decoder_mask_ratio and not isinstance(model, family.pretraining):
        raise ValueError(
            f"decoder_mask_ratio needs a model with a decoder ({family.pretraining.__name__}), "
            f"got {type(model).__name__} with decoder_mask_ratio={decoder_mask_ratio}"
        )
    if decoder_mask_ratio and family.decoder_masking_unsupported:
        raise ValueError(
            f"decoder_mask_ratio={decoder_mask_ratio} for {family.model_type!r} needs "
            f"{family.decoder_masking_unsupported}"
        )
    if isinstance(model, family.pretraining):
        model._fastmae_decoder_mask_ratio = decoder_mask_ratio
    modules = family.modules(model)
    for (cls, name), fused in family.fused.items():
        if cls in modules:
            # A partial of a module-level function pickles and deep-copies with the model, and
            # the copy keeps the fused ops (a bound method would pickle as a lookup by name).
            setattr(modules[cls], name, functools.partial(fused, modules[cls]))
    install_projection_forward(modules[family.patch_embeddings])


def decoder_mask_ratio(model) -> float:
    """The decoder mask ratio :func:`fastmae.hf.apply_fastmae` gave this model (0: none; a
    model patched by class or pickled before the option has none)."""
    return getattr(model, "_fastmae_decoder_mask_ratio", 0.0)


def patch_classes(family: ModelFamily) -> None:
    """The fused methods on the classes, and the patch embedding's ``__init__`` wrapped so
    that each new one gets the projection's forward as :func:`install` sets it."""
    for (cls, name), fused in family.fused.items():
        setattr(cls, name, fused)
    original_init = family.original[(family.patch_embeddings, "__init__")]

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        install_projection_forward(self)

    family.patch_embeddings.__init__ = __init__


def unpatch_classes(family: ModelFamily) -> None:
    for (cls, name), original in family.original.items():
        setattr(cls, name, original)


def install_projection_forward(patch_embeddings) -> None:
    """The projection's forward becomes :func:`fastmae.layers.project_patches` (the same
    convolution without ``ids_keep``)."""
    projection = patch_embeddings.projection
    projection.forward = functools.partial(project_patches, projection)


def project(patch_embeddings, pixels, ids_keep, cls_token, pos_embed):
    """The fused encoder input of :func:`fastmae.layers.project_patches`, computed in the
    projection's own forward where that has been patched (so that FSDP2 gathers a projection
    sharded on its own around the kernel that reads it)."""
    projection = patch_embeddings.projection
    forward = vars(projection).get("forward")
    if isinstance(forward, functools.partial) and forward.func is project_patches:
        return projection(pixels, ids_keep, cls_token, pos_embed)
    return project_patches(projection, pixels, ids_keep, cls_token, pos_embed)


def tuple_capable(forward):
    """HF 5.x's ``return_dict=False`` handling (``can_return_tuple``), as its forwards have."""
    from transformers import utils

    wrap = getattr(utils, "can_return_tuple", None)
    return wrap(forward) if wrap is not None else forward
