"""Static GPU check: compile every fastmae kernel for sm_90 and sm_80 with no GPU.

    python -m benchmarks.static_check [--markdown]

Compiles what real steps launch: one forward+backward of the image drop-in (ViT-B/16 and
ViT-L/16 at 224 px), of mae_st's ViT-L on its default clip and of Hugging Face's VideoMAE-Base,
in fp32 and under bf16 autocast (without transformer blocks, which launch no fastmae kernel),
runs on the CPU in Triton's interpreter with every launch recorded: each distinct launch
(kernel, argument dtypes, constexprs, block sizes, warps) is one row. A kernel argument added
in a launcher is thus checked with no change here. Arguments are specialised as Triton's
launcher does at run time: pointers 16-byte aligned where they were, integers that are
multiples of 16 marked divisible, a 1 made a constant. Uses Triton's compiler and its bundled
cuobjdump, and prints per row: registers, local memory and stack (where spills go), shared
memory, and the widths of the global loads and stores in the PTX (128 bits = 16-byte vectors).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import fastmae
import fastmae.video
from fastmae import functional
from fastmae.config import (
    VIDEO_CLIP,
    VIDEO_MASK_RATIO,
    VIDEOMAE_TUBE_MASK_RATIO,
)
from fastmae.dispatch import interpreting_bfloat16
from fastmae.kernels._triton import (
    PointerArg,
    fused_kernel_names,
    interpreting,
    kernel_name,
    record_launches,
)

ARCHS = (90, 80)
MODELS = {"ViT-B/16": "mae_vit_base_patch16", "ViT-L/16": "mae_vit_large_patch16"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")
# The sizes the recorded steps run at: a model's own (224 px, mae_st's default clip, HF
# VideoMAE's base clip), or tiny ones that record the same kernels in a fraction of the time.
FULL_SIZE = dict(image={}, video=dict(VIDEO_CLIP), hf={})
TINY_SIZE = dict(
    image=dict(img_size=32),
    video=dict(img_size=32, num_frames=4, t_patch_size=2, pred_t_dim=2),
    hf=dict(image_size=32, num_frames=4),
)


def _train(model, inputs: tuple, dtype, **kwargs):
    """Forward and backward of ``model(*inputs, **kwargs)``'s loss (its first output, or
    ``.loss``), in fp32 or under bf16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(*inputs, **kwargs)
    (out[0] if isinstance(out, tuple) else out.loss).backward()


def _round_trip(model, imgs):
    model.unpatchify(model.patchify(imgs)).sum().backward()


def _bf16_masking(length: int):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the mask takes the default dtype
    try:
        functional.random_masking_indices(torch.rand(1, length).bfloat16(), length // 4)
    finally:
        torch.set_default_dtype(default)


def _image_steps(factory: str, sizes: dict):
    """The drop-in's step, with and without norm_pix_loss and decoder masking, with the
    images' gradient; its patchify and unpatchify; the masking of bf16 noise."""
    for norm_pix, decoder_mask_ratio in ((False, 0.0), (True, 0.0), (True, 0.5)):
        options = dict(norm_pix_loss=norm_pix, decoder_mask_ratio=decoder_mask_ratio)
        model = getattr(fastmae, factory)(depth=0, decoder_depth=0, **options, **sizes)
        size = model.patch_embed.img_size
        for dtype in (torch.float32, torch.bfloat16):
            imgs = torch.randn(1, 3, *size, requires_grad=norm_pix and not decoder_mask_ratio)
            name = f"image {dtype}, norm_pix {norm_pix}, decoder masking {decoder_mask_ratio}"
            yield name, functools.partial(_train, model, (imgs,), dtype)
    imgs = torch.randn(1, 3, *size, requires_grad=True)
    yield "patchify", functools.partial(_round_trip, model, imgs)
    yield "masking bf16 noise", functools.partial(_bf16_masking, model.patch_embed.num_patches)


def _video_steps(sizes: dict):
    model = fastmae.video.mae_vit_large_patch16(
        depth=0, decoder_depth=0, norm_pix_loss=True, **sizes
    )
    embed = model.patch_embed
    for dtype in (torch.float32, torch.bfloat16):
        clip = torch.randn(1, 3, embed.frames, *embed.img_size)
        step = functools.partial(_train, model, (clip,), dtype, mask_ratio=VIDEO_MASK_RATIO)
        yield f"video {dtype}", step


def _videomae_steps(sizes: dict):
    """Hugging Face VideoMAE, patched, at its base configuration: HF's clip layout and loss."""
    import transformers

    from fastmae.hf import apply_fastmae

    config = transformers.VideoMAEConfig(
        num_hidden_layers=0, decoder_num_hidden_layers=0, norm_pix_loss=True, **sizes
    )
    model = apply_fastmae(transformers.VideoMAEForPreTraining(config))
    size = config.image_size
    spatial = (size // config.patch_size) ** 2
    masked = torch.arange(spatial) < int(VIDEOMAE_TUBE_MASK_RATIO * spatial)
    masked = masked.repeat(config.num_frames // config.tubelet_size)[None]
    for dtype in (torch.float32, torch.bfloat16):
        clip = torch.randn(1, config.num_frames, 3, size, size)
        yield f"HF VideoMAE {dtype}", functools.partial(_train, model, (clip, masked), dtype)


def recorded_launches(factory: str = "mae_vit_base_patch16", sizes: dict = FULL_SIZE):
    """``[(step name, Launch)]``: every kernel launch of the steps a GPU runs (the image
    drop-in ``factory``, mae_st's ViT-L, HF VideoMAE; fp32 and bf16 autocast; without
    transformer blocks, which launch no fastmae kernel), recorded in Triton's interpreter on
    the CPU, batch 1."""
    if not interpreting():
        raise RuntimeError(
            "the static check records launches in Triton's interpreter: run it "
            "with TRITON_INTERPRET=1 set before anything imports triton"
        )
    steps = [
        *_image_steps(factory, sizes["image"]),
        *_video_steps(sizes["video"]),
        *_videomae_steps(sizes["hf"]),
    ]
    launches = []
    torch.manual_seed(0)
    with fastmae.use_backend("triton"), interpreting_bfloat16():
        for name, step in steps:
            with record_launches() as recorded:
                step()
            launches += [(name, launch) for launch in recorded]
    return launches


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}[dtype]  # fmt: skip


def _print_recorded_launches(factory: str, tiny: bool) -> None:
    """The subprocess of :func:`recorded_specs`: its launches as JSON, ``[step, "module:kernel",
    arguments]`` with a tensor as ``["ptr", dtype, aligned]``."""
    rows = []
    for step, launch in recorded_launches(factory, TINY_SIZE if tiny else FULL_SIZE):
        arguments = {
            name: ["ptr", _dtype_name(value.dtype), value.aligned]
            if isinstance(value, PointerArg)
            else value
            for name, value in launch.arguments.items()
        }
        where = f"{launch.kernel.fn.__module__}:{kernel_name(launch.kernel)}"
        rows.append([step, where, arguments])
    print(json.dumps(rows))


def launch_spec(step: str, kernel, arguments: dict):
    """A recorded launch of the jit ``kernel`` as (label, kernel, args, constexprs, num_warps):
    args map each runtime argument to ``("ptr", dtype, aligned)``, ``("fp32", value)`` or an
    int; the label names the kernel, its flags, its bf16 tensors and the step that launched
    it."""
    arguments = dict(arguments)
    warps = arguments.pop("num_warps", 4)
    for option in LAUNCH_OPTIONS:
        arguments.pop(option, None)
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    args, constexprs = {}, {}
    for name, value in arguments.items():
        if name in constexpr_names:
            constexprs[name] = value
        elif isinstance(value, list):
            args[name] = tuple(value)
        elif isinstance(value, float):
            args[name] = ("fp32", value)
        else:
            args[name] = int(value)
    flags = [
        name if value is True else f"{name}={value}"
        for name, value in constexprs.items()
        if not name.startswith("BLOCK") and value is not False and name not in ("U", "PH", "PW")
    ]
    pointers = {name: value for name, value in args.items() if isinstance(value, tuple)}
    bf16 = [name.removesuffix("_ptr") for name, value in pointers.items() if value[1] == "bf16"]
    label = kernel_name(kernel).strip("_").removesuffix("_kernel")
    label += f" {' '.join(flags)}" if flags else ""
    label += f" (bf16 {', '.join(bf16)})" if bf16 else ""
    return f"{label} [{step}]", kernel, args, constexprs, warps


def recorded_specs(factory: str = "mae_vit_base_patch16", tiny: bool = False):
    """One spec (see :func:`launch_spec`) per distinct launch (kernel, argument types and
    specialisation, constexprs, warps) of :func:`recorded_launches`, in the order first seen;
    every registered kernel must have one. The launches are recorded in a subprocess under
    Triton's interpreter (where ``triton.jit`` makes interpreted functions, which do not
    compile); the kernels are resolved here, where they are jit functions that do."""
    command = [sys.executable, "-m", "benchmarks.static_check", "--record", factory]
    command += ["--tiny"] if tiny else []
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"recording the launches failed:\n{result.stderr}")
    specs, seen = [], set()
    for step, where, arguments in json.loads(result.stdout):
        module, name = where.split(":")
        kernel = getattr(importlib.import_module(module), name)
        label, kernel, args, constexprs, warps = launch_spec(step, kernel, arguments)
        specialised = {
            name: value if isinstance(value, tuple) else (value % 16 == 0, value == 1)
            for name, value in args.items()
        }
        key = (name, str(sorted(specialised.items())), str(sorted(constexprs.items())), warps)
        if key not in seen:
            seen.add(key)
            specs.append((label, kernel, args, constexprs, warps))
    covered = {kernel_name(spec[1]) for spec in specs}
    registered = fused_kernel_names()
    assert covered == registered, f"kernels no step launched: {sorted(registered - covered)}"
    return specs


def compile_kernel(kernel, args, constexprs, num_warps, arch):
    """Compile for ``sm_<arch>``; returns the CompiledKernel. Speaks each Triton's ASTSource:
    3.0-3.1 take ``constants`` and an ``AttrsDescriptor`` of argument indices, later ones a
    ``constexpr`` signature entry per constant and ``tt.divisibility`` attributes, under the
    keyword ``constants`` (up to 3.2's successors) or ``constexprs`` (3.9)."""
    signature, attrs, constants = {}, {}, dict(constexprs)
    divisible, ones = set(), set()
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, tuple) and value[0] == "ptr":
            signature[name] = "*" + value[1]
            if value[2:3] != (False,):  # aligned, or not said
                divisible.add(index)
        elif isinstance(value, tuple):
            signature[name] = value[0]
        elif value == 1:  # the launcher turns a 1 into a constant
            signature[name] = "i32" if _LEGACY_ATTRS else "constexpr"
            constants[name] = 1
            ones.add(index)
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                divisible.add(index)
    if _LEGACY_ATTRS:
        signature = {name: kind for name, kind in signature.items() if kind != "constexpr"}
        attrs = _LEGACY_ATTRS(divisible_by_16=divisible, equal_to_1=ones)
    else:
        attrs = {(index,): [["tt.divisibility", 16]] for index in divisible}
    keyword = "constexprs" if "constexprs" in _AST_SOURCE_PARAMETERS else "constants"
    source = ASTSource(kernel, signature, **{keyword: constants}, attrs=attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
    )


_AST_SOURCE_PARAMETERS = inspect.signature(ASTSource.__init__).parameters
try:  # Triton 3.0-3.1: attributes as a dataclass of argument indices
    from triton.compiler.compiler import AttrsDescriptor as _Attrs

    _LEGACY_ATTRS = _Attrs if "divisible_by_16" in getattr(_Attrs, "__annotations__", {}) else None
except ImportError:
    _LEGACY_ATTRS = None


def resource_usage(cubin: bytes) -> dict:
    """Registers, local memory (spills land there), stack and shared memory from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        result = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        )
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", result.stdout))
    return {key.lower(): int(value) for key, value in fields.items()}


ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9:]+)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\b")


def widest_access(ptx: str) -> dict:
    """Widest global load and store in bits, and how many of each width, from the PTX."""
    widths = {"ld": {}, "st": {}}
    for op, vector, bits in ACCESS.findall(ptx):
        width = int(vector or 1) * int(bits)
        widths[op][width] = widths[op].get(width, 0) + 1
    return widths


def rows():
    for model, factory in MODELS.items():
        for label, kernel, args, constexprs, warps in recorded_specs(factory):
            for arch in ARCHS:
                compiled = compile_kernel(kernel, args, constexprs, warps, arch)
                ptx = compiled.asm["ptx"]
                report = resource_usage(compiled.asm["cubin"])
                access = widest_access(ptx)
                yield dict(
                    model=model,
                    kernel=label,
                    arch=f"sm_{arch}",
                    warps=warps,
                    **report,
                    loads=access["ld"],
                    stores=access["st"],
                )


def describe(widths: dict) -> str:
    return " ".join(f"{bits}b x{count}" for bits, count in sorted(widths.items(), reverse=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--record", metavar="FACTORY", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.record:  # the subprocess of recorded_specs
        _print_recorded_launches(options.record, options.tiny)
        return
    markdown = options.markdown
    header = [
        "model",
        "kernel",
        "arch",
        "warps",
        "regs",
        "local/stack B (spills)",
        "smem B",
        "global loads (bits x count)",
        "global stores",
    ]
    table = []
    seen = set()
    for row in rows():
        key = (row["kernel"], row["arch"], row["reg"], str(row["loads"]))
        if row["model"] != "ViT-B/16" and key in seen:
            continue  # ViT-L compiles identically for ops that do not depend on the width
        seen.add(key)
        table.append(
            [
                row["model"],
                row["kernel"],
                row["arch"],
                str(row["warps"]),
                str(row["reg"]),
                f"{row['local']}/{row['stack']}",
                str(row["shared"]),
                describe(row["loads"]),
                describe(row["stores"]),
            ]
        )
    stamp = f"{datetime.date.today()}, Triton {triton.__version__}"
    note = "ViT-L/16 rows identical to ViT-B/16 ones (same block sizes) are left out."
    if markdown:
        print(f"Static check ({stamp}; `python -m benchmarks.static_check --markdown`)\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in table:
            print("| " + " | ".join(line) + " |")
        print(f"\n{note}")
        return
    widths = [max(len(r[i]) for r in table + [header]) for i in range(len(header))]
    print(f"fastmae static GPU check, {stamp}")
    for line in [header] + table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    print(note)


if __name__ == "__main__":
    main()
