"""Static GPU check: compile every fastmae kernel for sm_90 and sm_80 with no GPU.

    python -m benchmarks.static_check [--markdown]

Uses Triton's compiler and its bundled cuobjdump, at the block sizes the launchers choose for
ViT-B/16 and ViT-L/16 (224 px, ratio 0.75, decoder 512), and prints per kernel: registers, local
memory and stack (where spills go), shared memory, and the widths of the global loads and stores
in the PTX (128 bits = 16-byte vectors). Arguments are specialised as Triton's launcher does at
run time: pointers 16-byte aligned, integers that are multiples of 16 marked divisible.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastmae.config import NORM_PIX_EPS, image_step, video_step
from fastmae.kernels import loss, masking, patch_embed, patchify, unshuffle
from fastmae.kernels._triton import fused_kernel_names, kernel_name, row_tile_config

ARCHS = (90, 80)
MODELS = {
    "ViT-B/16": image_step("mae_vit_base_patch16_dec512d8b"),
    "ViT-L/16": image_step("mae_vit_large_patch16_dec512d8b"),
}
STEP = MODELS["ViT-B/16"]  # the sizes all ViT-x/16 models share
IMG, PATCH, CHANS, DECODER = STEP.img_size, STEP.patch_size, STEP.in_chans, STEP.decoder_width
LENGTH, KEEP, PIXELS = STEP.length, STEP.keep, STEP.pixels


# The model's pred is the slice x[:, 1:] of the decoder output [N, 1+L, P]: read with strides.
PRED_STRIDES = dict(stride_n=(LENGTH + 1) * PIXELS, stride_l=PIXELS, stride_p=1)
# The video MAE's ViT-L default: 16 frames, tubelets of 2, ratio 0.9, 8 target frames (u' = 1).
VIDEO = video_step("mae_vit_large_patch16")
FRAMES, T_PATCH, PRED_T = VIDEO.num_frames, VIDEO.t_patch_size, VIDEO.pred_t_dim
VIDEO_LENGTH, VIDEO_KEEP = VIDEO.length, VIDEO.keep


def video_strides(frames: int, channels_first: bool = True) -> dict:
    """The strides of a ``[N, C, F, H, W]`` video of 224 px frames: contiguous, or (HF's
    ``[N, F, C, H, W]`` clip read as a permuted view) with frames outside channels."""
    frame = IMG * IMG
    channel, step = (frames * frame, frame) if channels_first else (frame, CHANS * frame)
    return dict(stride_n=CHANS * frames * frame, stride_c=channel, stride_f=step, stride_h=IMG)


def prefixed(strides: dict, prefix: str) -> dict:
    return {f"{prefix}{name}": value for name, value in strides.items()}


def ptr(dtype):
    return ("ptr", dtype)


def pointers(spec: str) -> dict:
    """``"out=fp32 x=bf16"`` -> ``{"out_ptr": ("ptr", "fp32"), "x_ptr": ("ptr", "bf16")}``."""
    return {f"{name}_ptr": ptr(dtype) for name, dtype in (p.split("=") for p in spec.split())}


def spec(label, kernel, args: dict, constexprs: dict, config: dict):
    """One kernel spec; ``config`` is the launcher's own, from its launch-config function."""
    config = dict(config)
    warps = config.pop("num_warps")
    return label, kernel, args, {**constexprs, **config}, warps


def kernel_specs(width: int):
    """(label, kernel, args as name -> ('ptr', dtype) | int, constexprs, num_warps) at ViT sizes,
    the block sizes and warps from the launchers' own configuration functions."""
    image = dict(C=CHANS, F=1, H=IMG, grid_w=IMG // PATCH, **video_strides(1), stride_w=1)
    video = {**image, "F": FRAMES, **video_strides(FRAMES)}
    hf_clip = {**video, **video_strides(FRAMES, channels_first=False)}
    sizes = dict(L=LENGTH, K=KEEP)
    video_sizes = dict(L=VIDEO_LENGTH, K=VIDEO_KEEP)
    specs = [
        spec(
            f"masking{'' if dtype == 'fp32' else ' (bf16 noise, mask)'}",
            masking._masking_kernel,
            {**pointers(f"ids_keep=i64 ids_restore=i64 mask={dtype} noise={dtype}"), **sizes},
            {},
            masking.launch_config(LENGTH),
        )
        for dtype in ("fp32", "bf16")
    ]
    for label, has_ids, channel_last, tokens, geometry, u in (
        ("kept patches (c,i,j)", True, False, KEEP, image, 1),
        ("patchify (i,j,c)", False, True, LENGTH, image, 1),
        ("video kept tubelets (c,u,i,j)", True, False, VIDEO_KEEP, video, T_PATCH),
        ("HF clip kept tubelets (c,u,i,j)", True, False, VIDEO_KEEP, hf_clip, T_PATCH),
    ):
        for to_image in (False, True):
            flags = dict(HAS_IDS=has_ids, CHANNEL_LAST=channel_last, TO_IMAGE=to_image)
            specs.append(
                spec(
                    f"{'scatter' if to_image else 'gather'} {label}",
                    patchify._copy_patches_kernel,
                    {**pointers("imgs=fp32 patches=fp32 ids=i64"), "T": tokens, **geometry},
                    dict(U=u, PH=PATCH, PW=PATCH, **flags),
                    patchify.launch_config(CHANS, (u, PATCH, PATCH)),
                )
            )
    for prefix, cls, row_sizes in (("", 1, sizes), ("video ", 0, video_sizes)):
        specs += [
            spec(
                f"{prefix}add positions (bf16 GEMM out)",
                patch_embed._add_positions_kernel,
                {
                    **pointers("out=fp32 tokens=bf16 ids_keep=i64 cls=fp32 pos=fp32"),
                    **row_sizes,
                    "D": width,
                },
                {"CLS": cls},
                row_tile_config(width),
            ),
            spec(
                f"{prefix}unshuffle fwd (bf16 x)",
                unshuffle._unshuffle_fwd_kernel,
                {**pointers("out=fp32 x=bf16 ids=i64 mask_token=fp32 pos=fp32")}
                | {**row_sizes, "D": DECODER, "num_positions": row_sizes["L"]},
                {"CLS": cls, "SHUFFLED": False},
                row_tile_config(DECODER),
            ),
            spec(
                f"{prefix}unshuffle bwd",
                unshuffle._unshuffle_bwd_kernel,
                {
                    **pointers("grad_x=bf16 mask_token_partial=fp32 grad_out=fp32 ids=i64"),
                    **row_sizes,
                    "D": DECODER,
                },
                {"CLS": cls, "SHUFFLED": False},
                row_tile_config(DECODER),
            ),
        ]
    specs += [  # HF VideoMAE's decoder input: shuffled order, positions by ids
        spec(
            f"HF VideoMAE decoder input {direction}",
            kernel,
            {**pointers(pointer_spec), **video_sizes, "D": DECODER, **extra_sizes},
            {"CLS": 0, "SHUFFLED": True},
            row_tile_config(DECODER),
        )
        for direction, kernel, pointer_spec, extra_sizes in (
            (
                "fwd (bf16 x)",
                unshuffle._unshuffle_fwd_kernel,
                "out=fp32 x=bf16 ids=i64 mask_token=fp32 pos=fp32",
                {"num_positions": VIDEO_LENGTH},
            ),
            (
                "bwd",
                unshuffle._unshuffle_bwd_kernel,
                "grad_x=bf16 mask_token_partial=fp32 grad_out=fp32 ids=i64",
                {},
            ),
        )
    ]
    image_loss = dict(C=CHANS, H=IMG, grid_w=IMG // PATCH, P=PIXELS)
    pred_video_strides = dict(stride_n=VIDEO_LENGTH * PIXELS, stride_l=PIXELS, stride_p=1)
    hf_pixels = T_PATCH * PIXELS  # HF VideoMAE predicts whole tubelets
    hf_strides = dict(stride_n=VIDEO_LENGTH * hf_pixels, stride_l=hf_pixels, stride_p=1)
    loss_cases = (  # label, rows R, video strides, pred strides, pixels, u, constexprs
        ("loss", LENGTH, video_strides(1), PRED_STRIDES, PIXELS, 1, {}),
        ("loss normpix", LENGTH, video_strides(1), PRED_STRIDES, PIXELS, 1, {"NORM": 1}),
        (
            "video loss normpix",
            VIDEO_LENGTH,
            video_strides(FRAMES),
            pred_video_strides,
            PIXELS,
            1,
            {"NORM": 1, "FRAME_TABLE": True},
        ),
        (
            "HF VideoMAE loss normpix",
            VIDEO_LENGTH - VIDEO_KEEP,
            video_strides(FRAMES, channels_first=False),
            hf_strides,
            hf_pixels,
            T_PATCH,
            {"NORM": 2, "PRED_IDS": True, "UNNORMALISE": True},
        ),
    )
    for label, rows, strides, pred_strides, pixels, u, flags in loss_cases:
        constexprs = dict(U=u, PH=PATCH, PW=PATCH, FRAME_TABLE=False, NORM=0)
        constexprs.update(flags)
        geometry = {**image_loss, "R": rows, "P": pixels, **prefixed(strides, "video_")}
        geometry["video_stride_w"] = 1
        forward_only = {key: constexprs.pop(key, False) for key in ("PRED_IDS", "UNNORMALISE")}
        specs.append(
            spec(
                f"{label} fwd (bf16 pred)",
                loss._masked_loss_fwd_kernel,
                {
                    **pointers("patch_loss=fp32 residual=fp32 patch_mse=fp32 mean=fp32 rstd=fp32"),
                    **pointers("pred=bf16 imgs=fp32 mask=fp32 ids=i64 frames=i64"),
                    **pointers("unnormalise=fp32"),
                    **geometry,
                    **pred_strides,
                    "eps": ("fp32", NORM_PIX_EPS),
                },
                dict(ALL_PATCHES=False, **constexprs, **forward_only),
                loss.launch_config(pixels),
            )
        )
        if constexprs["NORM"] == 2:  # its backward is grad_pred alone: the NORM 0 kernel
            continue
        specs.append(
            spec(
                f"{label} bwd (bf16 pred)",
                loss._masked_loss_bwd_kernel,
                {
                    **pointers("grad_pred=bf16 grad_imgs=fp32 scale=fp32 residual=fp32"),
                    **pointers("mask=fp32 imgs=fp32 mean=fp32 rstd=fp32 frames=i64"),
                    **geometry,
                    "W": IMG,
                },
                dict(GRAD_IMGS=False, **constexprs),
                loss.launch_config(pixels),
            )
        )
    covered = {kernel_name(spec[1]) for spec in specs}
    registered = fused_kernel_names()
    assert covered == registered, f"kernels without a spec: {sorted(registered - covered)}"
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
    for model, sizes in MODELS.items():
        for label, kernel, args, constexprs, warps in kernel_specs(sizes.width):
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
    markdown = parser.parse_args().markdown
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
