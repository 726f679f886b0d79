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

from fastmae.kernels import loss, masking, patch_embed, patchify, unshuffle
from fastmae.kernels._triton import block_size, warps_for

ARCHS = (90, 80)
MODELS = {"ViT-B/16": 768, "ViT-L/16": 1024}
IMG, PATCH, CHANS, DECODER = 224, 16, 3, 512
LENGTH = (IMG // PATCH) ** 2
KEEP = int(LENGTH * 0.25)
PIXELS = PATCH * PATCH * CHANS


# The model's pred is the slice x[:, 1:] of the decoder output [N, 1+L, P]: read with strides.
PRED_STRIDES = dict(stride_n=(LENGTH + 1) * PIXELS, stride_l=PIXELS, stride_p=1)


def ptr(dtype):
    return ("ptr", dtype)


def kernel_specs(width: int):
    """(label, kernel, args as name -> ('ptr', dtype) | int, constexprs, num_warps) at ViT sizes."""
    loss_block = loss._patch_block(PIXELS)
    image = dict(C=CHANS, H=IMG, W=IMG, grid_w=IMG // PATCH)
    specs = [
        (
            f"masking{'' if dtype == 'fp32' else ' (bf16 noise, mask)'}",
            masking._masking_kernel,
            dict(
                ids_keep_ptr=ptr("i64"),
                ids_restore_ptr=ptr("i64"),
                mask_ptr=ptr(dtype),
                noise_ptr=ptr(dtype),
                L=LENGTH,
                K=KEEP,
            ),
            dict(BLOCK_Q=block_size(LENGTH, 64), BLOCK_K=block_size(LENGTH, 64)),
            4,
        )
        for dtype in ("fp32", "bf16")
    ]
    tiles = patchify.tile_config(CHANS, (PATCH, PATCH))
    tile_warps = tiles.pop("num_warps")
    for label, has_ids, channel_last, tokens in (
        ("kept patches (c,i,j)", True, False, KEEP),
        ("patchify (i,j,c)", False, True, LENGTH),
    ):
        for to_image in (False, True):
            specs.append(
                (
                    f"{'scatter' if to_image else 'gather'} {label}",
                    patchify._copy_patches_kernel,
                    {
                        "imgs_ptr": ptr("fp32"),
                        "patches_ptr": ptr("fp32"),
                        "ids_ptr": ptr("i64"),
                        "T": tokens,
                        **image,
                    },
                    dict(
                        PH=PATCH,
                        PW=PATCH,
                        HAS_IDS=has_ids,
                        CHANNEL_LAST=channel_last,
                        TO_IMAGE=to_image,
                        **tiles,
                    ),
                    tile_warps,
                )
            )
    embed_block_d = block_size(width, 128)
    specs.append(
        (
            "add positions (bf16 GEMM out)",
            patch_embed._add_positions_kernel,
            dict(
                out_ptr=ptr("fp32"),
                tokens_ptr=ptr("bf16"),
                ids_keep_ptr=ptr("i64"),
                cls_ptr=ptr("fp32"),
                pos_ptr=ptr("fp32"),
                K=KEEP,
                L=LENGTH,
                D=width,
            ),
            dict(BLOCK_T=16, BLOCK_D=embed_block_d),
            4,
        )
    )
    unshuffle_block_d, _ = unshuffle._tiles(1, LENGTH, DECODER)
    specs.append(
        (
            "unshuffle fwd (bf16 x)",
            unshuffle._unshuffle_fwd_kernel,
            dict(
                out_ptr=ptr("fp32"),
                x_ptr=ptr("bf16"),
                ids_restore_ptr=ptr("i64"),
                mask_token_ptr=ptr("fp32"),
                pos_ptr=ptr("fp32"),
                L=LENGTH,
                K=KEEP,
                D=DECODER,
            ),
            dict(BLOCK_T=unshuffle._BLOCK_T, BLOCK_D=unshuffle_block_d),
            4,
        )
    )
    specs.append(
        (
            "unshuffle bwd",
            unshuffle._unshuffle_bwd_kernel,
            dict(
                grad_x_ptr=ptr("bf16"),
                mask_token_partial_ptr=ptr("fp32"),
                grad_out_ptr=ptr("fp32"),
                ids_restore_ptr=ptr("i64"),
                L=LENGTH,
                K=KEEP,
                D=DECODER,
            ),
            dict(BLOCK_T=unshuffle._BLOCK_T, BLOCK_D=unshuffle_block_d),
            4,
        )
    )
    for norm_pix in (False, True):
        suffix = " normpix" if norm_pix else ""
        specs.append(
            (
                f"loss fwd{suffix} (bf16 pred)",
                loss._masked_loss_fwd_kernel,
                dict(
                    patch_loss_ptr=ptr("fp32"),
                    patch_mse_ptr=ptr("fp32"),
                    mean_ptr=ptr("fp32"),
                    rstd_ptr=ptr("fp32"),
                    pred_ptr=ptr("bf16"),
                    imgs_ptr=ptr("fp32"),
                    mask_ptr=ptr("fp32"),
                    L=LENGTH,
                    **image,
                    P=PIXELS,
                    **PRED_STRIDES,
                    eps=("fp32", loss.EPS),
                ),
                dict(PH=PATCH, PW=PATCH, NORM_PIX=norm_pix, ALL_PATCHES=False, BLOCK=loss_block),
                warps_for(loss_block),
            )
        )
        specs.append(
            (
                f"loss bwd{suffix} (bf16 pred)",
                loss._masked_loss_bwd_kernel,
                dict(
                    grad_pred_ptr=ptr("bf16"),
                    grad_imgs_ptr=ptr("fp32"),
                    scale_ptr=ptr("fp32"),
                    pred_ptr=ptr("bf16"),
                    imgs_ptr=ptr("fp32"),
                    mask_ptr=ptr("fp32"),
                    mean_ptr=ptr("fp32"),
                    rstd_ptr=ptr("fp32"),
                    L=LENGTH,
                    **image,
                    P=PIXELS,
                    **PRED_STRIDES,
                ),
                dict(PH=PATCH, PW=PATCH, NORM_PIX=norm_pix, GRAD_IMGS=False, BLOCK=loss_block),
                warps_for(loss_block),
            )
        )
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
    for model, width in MODELS.items():
        for label, kernel, args, constexprs, warps in kernel_specs(width):
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
