"""Regional compilation: the transformer blocks through Inductor, everything else eager.

Half of an MAE step is elementwise work inside the blocks (LayerNorm, GELU, bias, residual,
casts) that Inductor fuses into its neighbours; the fused fastmae ops around the blocks are
already single kernels. Compiling block by block rather than the whole model keeps the cold
start short (blocks of one shape share one compiled graph, so a ViT compiles two graphs, the
encoder's and the decoder's, not 32 blocks' worth) and needs no whole-graph capture.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile each encoder and decoder block of an MAE model in place; returns ``model``.

    Works on :class:`fastmae.MaskedAutoencoderViT` and :class:`fastmae.reference.
    MaskedAutoencoderViT` (and on either wrapped in DDP or ``torch.compile``: the wrapped
    model is found). ``compile_kwargs`` go to ``nn.Module.compile`` (``mode=``, ``dynamic=``,
    ``backend=``...). Parameters, state_dict keys and the optimizer's view of the model do not
    change; the fused ops and the rest of the model stay eager. Call it before wrapping the
    model in DDP.
    """
    inner = getattr(model, "module", model)  # DistributedDataParallel
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    blocks = [*getattr(inner, "blocks", ()), *getattr(inner, "decoder_blocks", ())]
    if not blocks:
        raise TypeError(
            f"compile_blocks expects an MAE model with .blocks and .decoder_blocks, got "
            f"{type(inner).__name__}"
        )
    config = torch._dynamo.config
    if not getattr(config, "inline_inbuilt_nn_modules", True):
        # torch < 2.5 specialises a graph on each module instance, so every block would compile
        # its own (and blocks past the recompile limit would silently run eager). 2.5 made
        # parameters graph inputs by default; ask for that here.
        config.inline_inbuilt_nn_modules = True
    for block in blocks:
        block.compile(**compile_kwargs)
    return model
