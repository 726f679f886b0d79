"""Device-independent accounting of an MAE training step: reference vs fastmae.

    python -m benchmarks.account [--models mae_vit_base_patch16,video.mae_vit_large_patch16,
                                           hf.videomae]
                                 [--batch 8] [--dtype bf16|fp32] [--profile h200|h100-sxm]
                                 [--decoder-mask-ratio 0.5]
    python -m benchmarks.account --memory [--ranks 8]

A ``video.`` model is mae_st's, at its default clip (16 frames, tubelets of 2, 224 px) and
mask ratio 0.9; image models run at mask ratio 0.75. ``hf.videomae`` is Hugging Face's
``VideoMAEForPreTraining`` at its base configuration (16 frames of 224 px, tubelets of 2,
ViT-B) with 90% tube masking: the reference is the unpatched model, fastmae the same model
after ``fastmae.hf.apply_fastmae``. ``--decoder-mask-ratio`` builds fastmae's model with decoder
masking (``decoder_mask_ratio``; for ``hf.videomae``, ``apply_fastmae``'s): the reference stays
the official model, so the step's ratio is what a user who turns it on sees.

One forward+backward per model runs on the CPU under a ``TorchDispatchMode`` that sees every
op. Each eager op is counted at the bytes it reads and writes (views are free; a broadcast
input counts its distinct elements) and at its matmul/attention FLOPs; each fastmae fused op
is counted at what its kernels move, from ``fastmae.kernels._triton.FUSED_OPS`` (the same
functions the benchmark summary and fastmae/kernels/README.md's table use), whichever backend
ran it.
Saved activations are the tensors autograd keeps for backward, deduplicated by storage,
leaving out parameters, autocast's weight copies and the input batch (memory the step holds
anyway). Ops are attributed to regions by module hooks, forward and backward. Matmuls and
attention are evaluated for their output shapes only (their values never decide an index), so
a ViT-B step is counted in seconds. The modelled time is a roofline,
``max(bytes / bandwidth, FLOPs / peak)`` per op, summed: a model, not a measurement. The
numbers depend only on shapes and dtypes, so every run on every machine prints the same.
"""

from __future__ import annotations

import argparse
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

import fastmae
import fastmae.video
from fastmae import reference
from fastmae.blocks import CHECKPOINT_MODES, SELECTIVE_SAVED_OPS, transformer_blocks
from fastmae.config import MASK_RATIO, VIDEO_CLIP, VIDEO_MASK_RATIO, VIDEOMAE_TUBE_MASK_RATIO
from fastmae.kernels._triton import FUSED_OPS

REGIONS = (
    "patch embedding and masking",
    "encoder blocks",
    "decoder input",
    "decoder blocks",
    "prediction and loss",
)
# The regions the fused ops replace: everything outside the transformer blocks but the GEMMs.
FUSED_REGIONS = ("patch embedding and masking", "decoder input", "prediction and loss")
PROFILES = {
    # bandwidth in bytes/s (measured device copy, not the datasheet), peak matmul FLOP/s
    # (bf16 measured; fp32 is TF32 on the tensor cores, taken as half the bf16 rate).
    "h200": dict(bandwidth=4.3e12, peak={"bf16": 790e12, "fp32": 395e12}),
    "h100-sxm": dict(bandwidth=3.0e12, peak={"bf16": 700e12, "fp32": 350e12}),
}
DEFAULT_PROFILE = "h200"
MATMUL_TYPES = ("GEMM", "attention")
WEIGHT_CAST = "weight cast (once per step)"


def op_type(name: str) -> str:
    """A coarse class for an op, for the by-type table."""
    if name.startswith("fastmae::"):
        return "fastmae fused op"
    base = name.split(".")[0].removeprefix("aten::").lstrip("_")
    if base in ("mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"):
        return "GEMM"
    if "attention" in base:
        return "attention"
    if "layer_norm" in base:
        return "LayerNorm"
    if "gelu" in base:
        return "GELU"
    if base in ("to_copy", "copy", "clone", "contiguous"):
        return "copy/cast"
    if base in ("cat", "stack", "split_with_sizes", "unbind", "repeat"):
        return "cat/stack/split"
    if any(word in base for word in ("gather", "scatter", "index", "sort", "nonzero")):
        return "gather/scatter/sort"
    return "other elementwise/reduction"


def distinct_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor view covers (a broadcast dimension counts once)."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size() if tensor.numel() else 0


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


def eager_bytes(func, args, kwargs, out) -> int:
    schema = func._schema
    is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    if is_view or func in (torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default):
        return 0
    seen, total = set(), 0
    for tensor in tensors_in((args, kwargs)):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if key not in seen:
            seen.add(key)
            total += distinct_bytes(tensor)
    return total + sum(distinct_bytes(t) for t in tensors_in(out))


def op_flops(func, args, kwargs, out) -> int:
    packet = func._overloadpacket
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    name = str(packet)
    if "scaled_dot_product" in name and "for_cpu" in name:  # CPU flash attention
        if "backward" in name:
            return int(sdpa_backward_flop_count(*(t.shape for t in args[:4])))
        return int(sdpa_flop_count(*(t.shape for t in args[:3])))
    return 0


@dataclass
class Tally:
    bytes: dict = field(default_factory=lambda: defaultdict(int))  # (region, type) -> bytes
    flops: dict = field(default_factory=lambda: defaultdict(int))
    seconds: dict = field(default_factory=lambda: defaultdict(float))
    saved: dict = field(default_factory=lambda: defaultdict(int))  # region -> bytes
    fused: dict = field(default_factory=lambda: defaultdict(int))  # fused op name -> bytes


class Accountant(TorchDispatchMode):
    """Counts every op's bytes and FLOPs under the current region; fused ops by their kernels."""

    def __init__(
        self,
        tally: Tally,
        bandwidth: float,
        peak: float,
        parameters: set,
        shapes_only_matmuls=False,
    ):
        super().__init__()
        # Counting needs shapes, not values: the matmuls and attention (nearly all of a step's
        # arithmetic) can skip theirs. Nothing downstream indexes by their values.
        self.shapes_only_matmuls = shapes_only_matmuls
        self.tally, self.bandwidth, self.peak = tally, bandwidth, peak
        self.parameters = parameters  # storages of the parameters, to tell weight casts apart
        self.weight_casts = set()  # storages of autocast's weight copies: per step, not image
        # The tensors behind those two sets, kept alive for the step: a freed storage's address
        # could otherwise be reused by an activation, which would then be skipped as one of them.
        self.keep_alive = []
        self.region = REGIONS[0]
        # Inside a block under checkpoint_blocks(mode="selective"), the outputs the policy
        # keeps are saved activations that autograd's hooks never see: counted here (set in
        # a block's forward only; backward recomputes without keeping).
        self.save_selected: callable | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func._schema.name)
        if self.shapes_only_matmuls and op_type(name) in MATMUL_TYPES:
            out = shapes_only(func, args, kwargs)
        else:
            out = func(*args, **kwargs)  # a fused op runs whole: its inner ops are not seen
        if self.save_selected is not None and func in SELECTIVE_SAVED_OPS:
            for tensor in tensors_in(out):
                self.save_selected(tensor)
        if name in FUSED_OPS:
            moved, flops = FUSED_OPS[name].bytes(*args, outputs=out, **kwargs), 0
            self.tally.fused[name] += moved
        else:
            moved, flops = eager_bytes(func, args, kwargs, out), op_flops(func, args, kwargs, out)
        kind = (self.region, op_type(name))
        if kind[1] == "copy/cast" and args[0].untyped_storage().data_ptr() in self.parameters:
            kind = (self.region, WEIGHT_CAST)
            self.weight_casts.add(out.untyped_storage().data_ptr())
            self.keep_alive.append(out)
        self.tally.bytes[kind] += moved
        self.tally.flops[kind] += flops
        self.tally.seconds[kind] += max(moved / self.bandwidth, flops / self.peak)
        return out


def shapes_only(func, args, kwargs):
    """``func``'s outputs with the right shapes, strides and dtypes, left uninitialised."""

    def to_meta(value):
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    def materialise(value):
        if isinstance(value, torch.Tensor):
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype)
        return value

    meta_args, meta_kwargs = tree_map(to_meta, (args, kwargs))
    return tree_map(materialise, func(*meta_args, **meta_kwargs))


HF_VIDEOMAE = "hf.videomae"


def is_hf_videomae(model) -> bool:
    return type(model).__name__ == "VideoMAEForPreTraining"


def region_modules(model) -> dict:
    """Where a step enters each region: the first encoder block, the module whose backward
    ends the encoder (``encoder_last``), the decoder input's first module, the first decoder
    block, the prediction's first module forward and the decoder's last module backward."""
    if is_hf_videomae(model):
        layers, decoder = model.videomae.encoder.layer, model.decoder
        return dict(
            encoder_first=layers[0],
            encoder_last=model.videomae.layernorm or layers[-1],
            decoder_input=model.encoder_to_decoder,
            decoder_first=decoder.decoder_layers[0]
            if len(decoder.decoder_layers)
            else decoder.norm,
            prediction=decoder.norm,
            decoder_last=decoder.norm,
        )
    first_decoder = model.decoder_blocks[0] if len(model.decoder_blocks) else model.decoder_norm
    return dict(
        encoder_first=model.blocks[0],
        encoder_last=model.norm,
        decoder_input=model.decoder_embed,
        decoder_first=first_decoder,
        prediction=model.decoder_pred,
        decoder_last=model.decoder_norm,
    )


def region_hooks(model, accountant: Accountant):
    """Forward pre-hooks and backward hooks that move ``accountant.region`` along the step."""

    def enter(region):
        def hook(*_):
            accountant.region = region

        return hook

    modules = region_modules(model)
    handles = [
        modules["encoder_first"].register_forward_pre_hook(enter("encoder blocks")),
        modules["decoder_input"].register_forward_pre_hook(enter("decoder input")),
        modules["decoder_first"].register_forward_pre_hook(enter("decoder blocks")),
        modules["prediction"].register_forward_pre_hook(enter("prediction and loss")),
        # Backward runs the other way: leave each region when its first module is done.
        modules["decoder_last"].register_full_backward_pre_hook(enter("decoder blocks")),
        modules["decoder_first"].register_full_backward_hook(enter("decoder input")),
        modules["encoder_last"].register_full_backward_pre_hook(enter("encoder blocks")),
        modules["encoder_first"].register_full_backward_hook(enter("patch embedding and masking")),
    ]
    return handles


def tube_mask(config, batch: int, mask_ratio: float) -> torch.Tensor:
    """VideoMAE's tube masking: ``int(ratio * h * w)`` spatial patches masked in every frame,
    drawn per sample -> ``bool_masked_pos [N, L]``."""
    spatial = (config.image_size // config.patch_size) ** 2
    ranks = torch.rand(batch, spatial).argsort(1).argsort(1)
    masked = ranks < int(mask_ratio * spatial)
    return masked.repeat(1, config.num_frames // config.tubelet_size)


def step_loss(model, imgs, mask_ratio: float):
    """A function that runs the forward of one step and returns its loss. VideoMAE's mask is
    drawn here, outside the counted step: its data loader makes it."""
    if is_hf_videomae(model):
        bool_masked_pos = tube_mask(model.config, imgs.shape[0], mask_ratio)
        return lambda: model(imgs, bool_masked_pos=bool_masked_pos).loss
    return lambda: model(imgs, mask_ratio=mask_ratio)[0]


def account_step(
    model,
    imgs,
    dtype: str,
    profile: dict,
    mask_ratio: float = 0.75,
    checkpoint=None,
    backward: bool = True,
) -> Tally:
    """One forward+backward of ``model`` on ``imgs``, counted. Saved tensors that are the
    parameters, autocast's weight copies or the input batch (which the training loop holds
    anyway) cost no activation memory and are left out, for both models alike.

    ``checkpoint``: the mode ``fastmae.checkpoint_blocks`` gave the model's blocks ("full",
    "selective"), or None. Autograd's hooks see nothing inside a checkpointed block; what
    checkpointing keeps is counted where it is kept: each block's input, and under
    "selective" the outputs of the ops its policy saves. Recomputation counts as traffic.
    ``backward=False`` counts the forward only (all that decides the saved activations).
    """
    tally = Tally()
    peak = profile["peak"][dtype]
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inputs = {imgs.untyped_storage().data_ptr()}
    accountant = Accountant(tally, profile["bandwidth"], peak, parameters, shapes_only_matmuls=True)
    handles = region_hooks(model, accountant)
    saved_storages = set()

    def save(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        skip = parameters | inputs | accountant.weight_casts
        if key not in skip and key not in saved_storages:
            saved_storages.add(key)
            tally.saved[accountant.region] += storage.nbytes()
        return tensor

    def enter_block(_, args):
        save(args[0])
        if checkpoint == "selective":
            accountant.save_selected = save

    def leave_block(*_):
        accountant.save_selected = None

    if checkpoint is not None:
        for block in transformer_blocks(model, "account_step"):
            handles.append(block.register_forward_pre_hook(enter_block))
            handles.append(block.register_forward_hook(leave_block))

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    forward = step_loss(model, imgs, mask_ratio)
    try:
        with accountant, torch.autograd.graph.saved_tensors_hooks(save, lambda t: t):
            accountant.region = REGIONS[0]
            with autocast:
                loss = forward()
            accountant.region = "prediction and loss"
            if backward:
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return tally


def count_bytes(step, *args) -> int:
    """Bytes one call ``step(*args)`` moves, eager ops and fused kernels counted as above: the
    benchmark summary's GB/s and these tables come from the same functions."""
    accountant = Accountant(Tally(), 1.0, 1.0, set())
    with accountant:
        step(*args)
    return sum(accountant.tally.bytes.values())


README_TABLE = ("<!-- fused-op-table:start -->", "<!-- fused-op-table:end -->")
MEMORY_TABLE = ("<!-- memory-table:start -->", "<!-- memory-table:end -->")
REPOSITORY = os.path.join(os.path.dirname(__file__), "..")


def fused_op_table(batch: int = 256, profile_name: str = DEFAULT_PROFILE) -> str:
    """fastmae/kernels/README.md's byte table: what each fused op's kernels move in one ViT-B/16
    training step (224 px, ratio 0.75, bf16 autocast), from the ops' registered byte counts.
    The transformer blocks move none of it, so the model is built without them."""
    torch.manual_seed(0)
    model = fastmae.mae_vit_base_patch16(depth=0, decoder_depth=0)
    imgs = torch.randn(batch, 3, *model.patch_embed.img_size)
    tally = Tally()
    with fastmae.use_backend("torch"), Accountant(tally, 1.0, 1.0, set(), True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = model(imgs, mask_ratio=0.75)
        loss.backward()
    bandwidth = PROFILES[profile_name]["bandwidth"]
    rows = [
        [f"`{name}`", ", ".join(f"`{k}`" for k in FUSED_OPS[name].kernels)]
        + [mb(moved), f"{moved / bandwidth * 1e6:.0f}"]
        for name, moved in tally.fused.items()
    ]
    total = sum(tally.fused.values())
    rows.append(["**all**", "", mb(total), f"{total / bandwidth * 1e6:.0f}"])
    header = ["op (in call order)", "kernels", "MB", f"floor us at {bandwidth / 1e12:.1f} TB/s"]
    title = (
        f"ViT-B/16, batch {batch}, 224 px, ratio 0.75, bf16 autocast, one forward+backward "
        "(`python -m benchmarks.account --readme`):"
    )
    return title + "\n\n" + per_image_table("", rows, header).lstrip("\n")


def write_readme_table(path: str, table: str, markers=README_TABLE) -> None:
    """Replace the text between the ``markers`` of ``path`` with ``table``."""
    with open(path) as f:
        text = f.read()
    start, end = text.index(markers[0]), text.index(markers[1])
    text = f"{text[: start + len(markers[0])]}\n{table}\n{text[end:]}"
    with open(path, "w") as f:
        f.write(text)


def mb(value: float) -> str:
    return f"{value / 1e6:.1f}"


def ratio(new: float, old: float) -> str:
    return f"{new / old:.3f}x" if old else "-"


def per_image_table(title, rows, header) -> str:
    lines = [title, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report(
    model_name: str,
    tallies: dict,
    batch: int,
    dtype: str,
    profile_name: str,
    decoder_mask_ratio: float = 0.0,
) -> str:
    ref, fused = tallies["reference"], tallies["fastmae"]
    profile = PROFILES[profile_name]

    def by_region(table, region):
        return sum(v for (r, _), v in table.items() if r == region)

    unit = "clip" if model_name.startswith(("video.", HF_VIDEOMAE)) else "image"
    fastmae_label = "fastmae"
    if decoder_mask_ratio:
        fastmae_label += f" with decoder_mask_ratio {decoder_mask_ratio}"
    out = [f"### {model_name}, batch {batch}, {dtype}: per {unit} (reference -> {fastmae_label})"]
    out.append("")
    rows = [
        [region, mb(ref.saved[region] / batch), mb(fused.saved[region] / batch)]
        + [ratio(fused.saved[region], ref.saved[region])]
        for region in REGIONS
    ]
    total_ref, total_fused = sum(ref.saved.values()), sum(fused.saved.values())
    rows.append(["**step**", mb(total_ref / batch), mb(total_fused / batch)])
    rows[-1].append(ratio(total_fused, total_ref))
    out.append(
        per_image_table(
            f"**Saved activations** (MB per {unit}; tensors kept for backward, by storage)",
            rows,
            ["region", "reference", "fastmae", "ratio"],
        )
    )
    rows = []
    for region in REGIONS:
        ref_bytes, fused_bytes = by_region(ref.bytes, region), by_region(fused.bytes, region)
        rows.append(
            [region, mb(ref_bytes / batch), mb(fused_bytes / batch), ratio(fused_bytes, ref_bytes)]
            + [f"{by_region(ref.flops, region) / batch / 1e9:.2f}"]
            + [f"{by_region(fused.flops, region) / batch / 1e9:.2f}"]
        )

    def non_matmul(tally):
        aside = (*MATMUL_TYPES, WEIGHT_CAST)
        return sum(
            v for (r, kind), v in tally.bytes.items() if r in FUSED_REGIONS and kind not in aside
        )

    rows.append(
        ["**masking, unshuffle and loss regions, GEMMs and weight casts aside**"]
        + [mb(non_matmul(ref) / batch), mb(non_matmul(fused) / batch)]
        + [ratio(non_matmul(fused), non_matmul(ref)), "", ""]
    )
    step_ref, step_fused = sum(ref.bytes.values()), sum(fused.bytes.values())
    rows.append(
        ["**step**", mb(step_ref / batch), mb(step_fused / batch), ratio(step_fused, step_ref)]
        + [f"{sum(ref.flops.values()) / batch / 1e9:.2f}"]
        + [f"{sum(fused.flops.values()) / batch / 1e9:.2f}"]
    )
    out += [
        "",
        per_image_table(
            f"**Traffic and FLOPs by region** (MB read + written, GFLOP, per {unit})",
            rows,
            ["region", "ref MB", "fastmae MB", "ratio", "ref GFLOP", "fastmae GFLOP"],
        ),
    ]
    kinds = sorted({kind for _, kind in ref.bytes} | {kind for _, kind in fused.bytes})

    def by_kind(table, kind):
        return sum(v for (_, k), v in table.items() if k == kind)

    rows = [
        [kind, mb(by_kind(ref.bytes, kind) / batch), mb(by_kind(fused.bytes, kind) / batch)]
        for kind in kinds
    ]
    out += [
        "",
        per_image_table(
            f"**Traffic by op type** (MB per {unit})", rows, ["op type", "reference", "fastmae"]
        ),
    ]
    time_ref, time_fused = sum(ref.seconds.values()), sum(fused.seconds.values())
    assumptions = (
        f"{profile_name}: {profile['bandwidth'] / 1e12:.1f} TB/s, "
        f"{profile['peak'][dtype] / 1e12:.0f} TFLOP/s {dtype} matmul; every op at its roofline "
        "max(bytes / bandwidth, FLOPs / peak), no overlap, no launch overhead"
    )
    rows = [
        [region]
        + [f"{by_region(ref.seconds, region) / batch * 1e6:.1f}"]
        + [f"{by_region(fused.seconds, region) / batch * 1e6:.1f}"]
        for region in REGIONS
    ]
    rows.append(
        ["**step**", f"{time_ref / batch * 1e6:.1f}", f"{time_fused / batch * 1e6:.1f}"]
        + [f"speedup {time_ref / time_fused:.3f}x"]
    )
    for row in rows[:-1]:
        row.append("")
    out += [
        "",
        per_image_table(
            f"**Modelled time** (a model, not a measurement: {assumptions}; us per {unit})",
            rows,
            ["region", "reference", "fastmae", ""],
        ),
    ]
    return "\n".join(out)


def build(impl: str, model_name: str, decoder_mask_ratio: float = 0.0, **kwargs):
    """(model, mask ratio) for ``reference`` or ``fastmae``; ``video.<factory>`` names are
    mae_st's models at its default clip and ratio 0.9, ``hf.videomae`` HF's VideoMAE (see the
    module docstring). ``kwargs`` go to the factory (the VideoMAE config);
    ``decoder_mask_ratio`` to fastmae's model only."""
    torch.manual_seed(0)
    if model_name == HF_VIDEOMAE:
        import transformers

        from fastmae.hf import apply_fastmae

        model = transformers.VideoMAEForPreTraining(transformers.VideoMAEConfig(**kwargs))
        if impl == "fastmae":
            apply_fastmae(model, decoder_mask_ratio=decoder_mask_ratio)
        return model, VIDEOMAE_TUBE_MASK_RATIO
    if impl == "fastmae":
        kwargs["decoder_mask_ratio"] = decoder_mask_ratio
    if model_name.startswith("video."):
        module = fastmae.video if impl == "fastmae" else fastmae.video.reference
        factory = getattr(module, model_name.removeprefix("video."))
        return factory(**{**VIDEO_CLIP, **kwargs}), VIDEO_MASK_RATIO
    module = fastmae if impl == "fastmae" else reference
    return getattr(module, model_name)(**kwargs), MASK_RATIO


def sample_batch(model, batch: int) -> torch.Tensor:
    """A batch of the images (or clips) ``model`` takes."""
    torch.manual_seed(1)
    if is_hf_videomae(model):  # [N, T, C, H, W]
        config = model.config
        size = (config.image_size, config.image_size)
        return torch.randn(batch, config.num_frames, config.num_channels, *size)
    embed = model.patch_embed
    frames = (embed.frames,) if hasattr(embed, "frames") else ()
    return torch.randn(batch, embed.in_chans, *frames, *embed.img_size)


# -- memory you can plan with ----------------------------------------------------------------

MEMORY_MODELS = {  # label: (factory, factory kwargs)
    "ViT-B/16, 224 px": ("mae_vit_base_patch16", {}),
    "ViT-B/16, 448 px": ("mae_vit_base_patch16", dict(img_size=448)),
    "ViT-L/16, 224 px": ("mae_vit_large_patch16", {}),
    "ViT-L/16, 448 px": ("mae_vit_large_patch16", dict(img_size=448)),
    "ViT-H/14, 224 px": ("mae_vit_huge_patch14", {}),
    "ViT-H/14, 448 px": ("mae_vit_huge_patch14", dict(img_size=448)),
    "mae_st ViT-L/16, 16 frames of 224 px": ("video.mae_vit_large_patch16", {}),
}
# Device memory as the driver reports it (nvidia-smi's total: 81559 MiB, 143771 MiB).
GPU_MEMORY = {"H100 80 GB": 81559 * 2**20, "H200 141 GB": 143771 * 2**20}
# What a batch may fill: the rest is for the CUDA context, the allocator's fragmentation and
# the collectives' buffers.
USABLE_FRACTION = 0.9
MEMORY_MODES = ("eager", *CHECKPOINT_MODES)


@dataclass
class MemoryPlan:
    """One model's memory in a bf16 FSDP2 + AdamW step (bytes).

    ``per_image``: saved activations per image for each mode; ``working_per_image``: one
    block's eager saved activations (live while that block runs backward, recomputed or not);
    ``sharded``: fp32 parameters, fp32 gradients and AdamW's two fp32 moments, divided among
    the ranks; ``gathered``: the largest block's bf16 parameters twice (in use and prefetched)
    and its bf16 gradient, plus the root module's own bf16 parameters and gradients.
    """

    parameters: int
    per_image: dict
    working_per_image: int
    sharded: int
    gathered: int

    def largest_batch(self, capacity: int, mode: str) -> int:
        free = USABLE_FRACTION * capacity - self.sharded - self.gathered
        return max(0, math.floor(free / (self.per_image[mode] + self.working_per_image)))


def memory_plan(model_name: str, ranks: int, batch: int = 2, **kwargs) -> MemoryPlan:
    """The :class:`MemoryPlan` of fastmae's ``model_name`` (a factory, ``video.`` for mae_st's)
    under bf16 autocast, from one counted step per mode of a batch of ``batch``."""
    model, ratio = build("fastmae", model_name, **kwargs)
    imgs = sample_batch(model, batch)
    profile = PROFILES[DEFAULT_PROFILE]  # the roofline does not enter the memory
    tallies = {}
    with fastmae.use_backend("torch"):
        for mode in MEMORY_MODES:  # eager first: then each mode in place
            checkpoint = None if mode == "eager" else mode
            if checkpoint:
                fastmae.checkpoint_blocks(model, checkpoint)
            tallies[mode] = account_step(
                model, imgs, "bf16", profile, ratio, checkpoint, backward=False
            )
    per_image = {mode: sum(t.saved.values()) / batch for mode, t in tallies.items()}
    eager = tallies["eager"].saved
    working = max(
        eager["encoder blocks"] / max(len(model.blocks), 1),
        eager["decoder blocks"] / max(len(model.decoder_blocks), 1),
    )
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest_block = max(
        sum(p.numel() for p in block.parameters())
        for block in transformer_blocks(model, "memory_plan")
    )
    root_own = sum(p.numel() for p in model.parameters(recurse=False))
    return MemoryPlan(
        parameters=parameters,
        per_image=per_image,
        working_per_image=int(working / batch),
        sharded=(4 * parameters + 4 * trainable + 8 * trainable) // ranks,
        gathered=2 * (3 * largest_block + 2 * root_own),
    )


def memory_table(ranks: int = 8, models=None) -> str:
    """The memory table: per image saved activations by mode, per GPU states under FSDP2 on
    ``ranks`` ranks, and the largest batch per GPU that fits each GPU's memory."""
    labels = list(models or MEMORY_MODELS)
    header = ["model", "params", *(f"{m} MB/img" for m in MEMORY_MODES), "states GB/GPU"]
    for gpu in GPU_MEMORY:
        header.append(f"batch/GPU {gpu} ({', '.join(MEMORY_MODES)})")
    rows = []
    for label in labels:
        factory, kwargs = MEMORY_MODELS[label]
        plan = memory_plan(factory, ranks, **kwargs)
        row = [label, f"{plan.parameters / 1e6:.0f}M"]
        row += [mb(plan.per_image[mode]) for mode in MEMORY_MODES]
        row.append(f"{(plan.sharded + plan.gathered) / 1e9:.2f}")
        for capacity in GPU_MEMORY.values():
            row.append(" / ".join(str(plan.largest_batch(capacity, m)) for m in MEMORY_MODES))
        rows.append(row)
    title = (
        f"Memory of a fastmae training step: bf16 autocast, FSDP2 on {ranks} GPUs "
        "(fp32 parameters, gradients and AdamW moments sharded; bf16 gathered blocks), image "
        "mask ratio 0.75, video 0.9 (`python -m benchmarks.account --memory`). MB/img: saved "
        "activations per image (per clip for video). batch/GPU: the largest batch that fits "
        f"{USABLE_FRACTION:.0%} of the device's memory, counting one block's eager "
        "activations as live during its backward. A model computed from shapes, not a "
        "measurement."
    )
    return title + "\n\n" + per_image_table("", rows, header).lstrip("\n")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mae_vit_base_patch16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE)
    parser.add_argument(
        "--readme",
        action="store_true",
        help="rewrite fastmae/kernels/README.md's fused-op byte table (with --memory: "
        "benchmarks/README.md's memory table)",
    )
    parser.add_argument(
        "--memory", action="store_true", help="print the memory table (saved activations, batch)"
    )
    parser.add_argument("--ranks", type=int, default=8, help="FSDP2 ranks for --memory")
    parser.add_argument(
        "--decoder-mask-ratio",
        type=float,
        default=0.0,
        help="fastmae's model leaves this share of the removed patches out of the decoder",
    )
    options = parser.parse_args(argv)
    if options.memory:
        table = memory_table(options.ranks)
        if options.readme:
            write_readme_table(
                os.path.join(REPOSITORY, "benchmarks", "README.md"), table, MEMORY_TABLE
            )
        print(table)
        return table
    if options.readme:
        table = fused_op_table(profile_name=options.profile)
        write_readme_table(os.path.join(REPOSITORY, "fastmae", "kernels", "README.md"), table)
        print(table)
        return table
    sections = []
    for model_name in [m.strip() for m in options.models.split(",") if m.strip()]:
        tallies = {}
        for impl in ("reference", "fastmae"):
            model, ratio = build(impl, model_name, options.decoder_mask_ratio)
            imgs = sample_batch(model, options.batch)
            profile = PROFILES[options.profile]
            with fastmae.use_backend("torch"):
                tallies[impl] = account_step(model, imgs, options.dtype, profile, ratio)
        sections.append(
            report(
                model_name,
                tallies,
                options.batch,
                options.dtype,
                options.profile,
                options.decoder_mask_ratio,
            )
        )
    text = "\n\n".join(sections)
    print(text)
    return text


if __name__ == "__main__":
    main()
