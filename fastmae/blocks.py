"""Whole-block transforms of an MAE model, each in one call: regional compilation and
activation checkpointing of the transformer blocks.

Both leave the parameters, their names and the state_dict as they are, and both act through
each block's ``forward``, so FSDP2's and DDP's hooks around the block still run where they
did. They compose with each other, with autocast, DDP and FSDP2 (``fully_shard`` before or
after).

- :func:`compile_blocks`: Half of an MAE step is elementwise work inside the blocks (LayerNorm,
  GELU, bias, residual, casts) that Inductor fuses into its neighbours; the fused fastmae ops
  around the blocks are already single kernels. Compiling block by block rather than the whole
  model keeps the cold start short (blocks of one shape share one compiled graph, so a ViT
  compiles two graphs, the encoder's and the decoder's) and needs no whole-graph capture.
- :func:`checkpoint_blocks`: each block keeps only what it needs to run again in backward.
  ``"full"`` keeps the block's input; ``"selective"`` also keeps the outputs of its matmuls and
  attention and recomputes the elementwise work between them. The saved bytes per image of
  each mode are in ``python -m benchmarks.account --memory``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

CHECKPOINT_MODES = ("full", "selective")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


def transformer_blocks(model: nn.Module, caller: str) -> list:
    """The encoder then decoder blocks of a fastmae, reference, video or Hugging Face ViTMAE or
    VideoMAE model (wrapped in DDP or ``torch.compile`` or not); a TypeError names ``caller``."""
    inner = _unwrapped(model)
    if hasattr(inner, "blocks") and hasattr(inner, "decoder_blocks"):
        return [*inner.blocks, *inner.decoder_blocks]
    vit = getattr(inner, "vit", None) or getattr(inner, "videomae", inner)
    decoder = getattr(inner, "decoder", None)
    layers = getattr(vit, "layers", None) or getattr(getattr(vit, "encoder", None), "layer", None)
    if layers is not None:  # transformers 5.x names them vit.layers, 4.x vit.encoder.layer
        return [*layers, *getattr(decoder, "decoder_layers", ())]
    raise TypeError(
        f"{caller} expects an MAE model with .blocks and .decoder_blocks (fastmae's, the "
        f"reference's, the video model's) or a transformers ViTMAE or VideoMAE model, got "
        f"{type(inner).__name__}"
    )


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile each encoder and decoder block of an MAE model in place; returns ``model``.

    Works on :class:`fastmae.MaskedAutoencoderViT` and :class:`fastmae.reference.
    MaskedAutoencoderViT` (and on either wrapped in DDP or ``torch.compile``: the wrapped
    model is found). ``compile_kwargs`` go to ``nn.Module.compile`` (``mode=``, ``dynamic=``,
    ``backend=``...). Parameters, state_dict keys and the optimizer's view of the model do not
    change; the fused ops and the rest of the model stay eager. Call it before wrapping the
    model in DDP.
    """
    blocks = transformer_blocks(model, "compile_blocks")
    config = torch._dynamo.config
    if not getattr(config, "inline_inbuilt_nn_modules", True):
        # torch < 2.5 specialises a graph on each module instance, so every block would compile
        # its own (and blocks past the recompile limit would silently run eager). 2.5 made
        # parameters graph inputs by default; ask for that here.
        config.inline_inbuilt_nn_modules = True
    for block in blocks:
        block.compile(**compile_kwargs)
    return model


# What "selective" keeps: the outputs of the ops that cost FLOPs (matmuls and attention).
# Everything between them (LayerNorm, GELU, bias, residual, casts, views) is recomputed.
_SAVED_OP_NAMES = (
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
SELECTIVE_SAVED_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in _SAVED_OP_NAMES
    if hasattr(torch.ops.aten, name)
)


def _selective_policy(ctx, op, *args, **kwargs):
    if op in SELECTIVE_SAVED_OPS:
        return torch_checkpoint.CheckpointPolicy.MUST_SAVE
    return torch_checkpoint.CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_contexts():
    """The ``context_fn`` of ``torch.utils.checkpoint`` for the "selective" mode."""
    return torch_checkpoint.create_selective_checkpoint_contexts(_selective_policy)


def _fsdp_module_class():
    """FSDP2's ``FSDPModule`` from where this torch keeps it, or None without distributed."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    return FSDPModule


def _check_selective(block: nn.Module) -> None:
    """Selective checkpointing replays a block's ops by count. FSDP2 units inside the block
    run other ops when recomputed in backward than in forward, so torch's replay fails (with
    "encountered during backward but not found in storage"): say what to do instead."""
    fsdp_module = _fsdp_module_class()
    inner = [m for m in block.modules() if m is not block]
    if fsdp_module is not None and any(isinstance(m, fsdp_module) for m in inner):
        raise RuntimeError(
            'checkpoint_blocks(mode="selective") needs each block to be whole inside one FSDP2 '
            "unit, but a module inside a block has its own fully_shard: shard whole blocks "
            '(fully_shard(block)) or use mode="full"'
        )


def _checkpointed_forward(block: nn.Module, mode: str, *args, **kwargs):
    """A block's own forward under non-reentrant ``torch.utils.checkpoint`` (plainly when no
    gradient is being recorded)."""
    forward = functools.partial(type(block).forward, block)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    if mode == "selective":
        _check_selective(block)
    context_fn = (
        selective_checkpoint_contexts if mode == "selective" else torch_checkpoint.noop_context_fn
    )
    return torch_checkpoint.checkpoint(
        forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs
    )


def checkpoint_blocks(model: nn.Module, mode: str = "full") -> nn.Module:
    """Activation checkpointing of every encoder and decoder block, in place; returns ``model``.

    ``mode``: ``"full"`` saves each block's input and recomputes the block in backward;
    ``"selective"`` also saves the outputs of its matmuls and attention, recomputing only the
    elementwise work. Gradients are those without checkpointing. Works on the fastmae,
    reference and video models (also inside DDP or ``torch.compile``); call it again to change
    the mode.

    A Hugging Face ViTMAE model has its own gradient checkpointing, and this defers to it
    (``activation_checkpointing_enable``, ``gradient_checkpointing_enable`` before
    transformers 5), non-reentrant and, for ``"selective"``, with the same policy. HF
    checkpoints only in training mode (``model.train()``).

    "selective" replays a block's ops by count, so it needs each block whole inside one FSDP2
    unit (``fully_shard(block)`` or coarser); sharding modules inside a block is a clear error
    here (torch's own under HF's checkpointing). "full" takes any wrap policy.
    """
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"mode must be one of {CHECKPOINT_MODES}, got {mode!r}")
    blocks = transformer_blocks(model, "checkpoint_blocks")
    inner = _unwrapped(model)
    if hasattr(inner, "gradient_checkpointing_enable"):  # a transformers model
        kwargs = {"use_reentrant": False}
        if mode == "selective":
            kwargs["context_fn"] = selective_checkpoint_contexts
        if hasattr(inner, "activation_checkpointing_enable"):  # its name from transformers 5.x
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model
    for block in blocks:
        # An instance attribute, as FSDP2 and DDP call it: their hooks stay around it. A
        # partial of a module-level function pickles and deep-copies with the model.
        block.forward = functools.partial(_checkpointed_forward, block, mode)
    return model
