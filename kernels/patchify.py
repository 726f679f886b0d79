"""Patch gather and scatter between images ``[N, C, H, W]`` and patch rows ``[N, T, P]``.

One kernel pair serves three ops:
- patchify / unpatchify: every patch, pixel order ``(i, j, c)`` (channel fastest), as MAE's;
- the encoder input: the kept patches only (``ids``), in the conv weight's ``(c, i, j)`` order,
  and its backward, which scatters pixel gradients back into a zero image.
Each pixel belongs to one patch, so the scatter writes every destination at most once.
"""

from typing import Optional

import torch
from torch import Tensor

from ._jit import patch_corner
from ._triton import IntList, fused_op, ids_in_range, launch, nbytes, tl, triton, warps_for


@triton.jit
def _tile_offsets(
    first_channel,
    C,
    H,
    W,
    PH: tl.constexpr,
    PW: tl.constexpr,
    C_BLOCK: tl.constexpr,
    PH_BLOCK: tl.constexpr,
    PW_BLOCK: tl.constexpr,
    CHANNEL_LAST: tl.constexpr,
):
    """A ``[C_BLOCK, PH_BLOCK, PW_BLOCK]`` tile of one patch: offsets in the image (relative to
    the patch corner), offsets in the patch row, and validity. The innermost axis runs along
    image columns, so image-side accesses are contiguous runs of PW pixels (vectorisable)."""
    channel = first_channel + tl.arange(0, C_BLOCK)[:, None, None]
    row = tl.arange(0, PH_BLOCK)[None, :, None]
    col = tl.arange(0, PW_BLOCK)[None, None, :]
    valid = (channel < C) & (row < PH) & (col < PW)
    image_offsets = channel * H * W + row * W + col
    if CHANNEL_LAST:
        patch_offsets = (row * PW + col) * C + channel
    else:
        patch_offsets = (channel * PH + row) * PW + col
    return image_offsets, patch_offsets, valid


@triton.jit
def _copy_patches_kernel(
    imgs_ptr,  # [N, C, H, W]: read, or written when TO_IMAGE (other patches left untouched)
    patches_ptr,  # [N, T, C*PH*PW]: written, or read when TO_IMAGE
    ids_ptr,  # [N, T] int64 patch index of each row (read only when HAS_IDS)
    T,
    C,
    H,
    W,
    grid_w,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_IDS: tl.constexpr,
    CHANNEL_LAST: tl.constexpr,
    TO_IMAGE: tl.constexpr,
    C_BLOCK: tl.constexpr,
    PH_BLOCK: tl.constexpr,
    PW_BLOCK: tl.constexpr,
):
    """Grid ``(N*T,)``: each program copies one patch between the image and its row (the
    gather), or back (TO_IMAGE, the scatter), C_BLOCK channels a step."""
    token = tl.program_id(0).to(tl.int64)
    corner, in_range = patch_corner(token, ids_ptr, T, C, H, W, grid_w, PH, PW, HAS_IDS)
    row_start = patches_ptr + token * (C * PH * PW)
    for first_channel in range(0, C, C_BLOCK):
        image_offsets, patch_offsets, valid = _tile_offsets(
            first_channel, C, H, W, PH, PW, C_BLOCK, PH_BLOCK, PW_BLOCK, CHANNEL_LAST
        )
        # A row whose id is out of range gathers zeros and scatters nothing. (tl.where, not
        # `&`: the interpreter mistypes a scalar & tensor mask.)
        image_valid = tl.where(in_range, valid, False)
        if TO_IMAGE:
            pixels = tl.load(row_start + patch_offsets, mask=valid)
            tl.store(imgs_ptr + corner + image_offsets, pixels, mask=image_valid)
        else:
            pixels = tl.load(imgs_ptr + corner + image_offsets, mask=image_valid, other=0)
            tl.store(row_start + patch_offsets, pixels, mask=valid)


def launch_config(channels: int, patch_size) -> dict:
    """Launch parameters of the patch kernels: at most 4096 pixels (8 per thread) per step."""
    ph_block, pw_block = (triton.next_power_of_2(side) for side in patch_size)
    c_block = max(1, min(triton.next_power_of_2(channels), 4096 // (ph_block * pw_block)))
    tile = c_block * ph_block * pw_block
    return dict(C_BLOCK=c_block, PH_BLOCK=ph_block, PW_BLOCK=pw_block, num_warps=warps_for(tile))


def _copy_patches_triton(imgs, patches, ids, patch_size, channel_last: bool, to_image: bool):
    """One program per patch row: imgs -> patches, or patches -> imgs with ``to_image``."""
    n, tokens, _ = patches.shape
    if not patches.numel():
        return
    _, c, height, width = imgs.shape
    ph, pw = patch_size
    launch(
        _copy_patches_kernel,
        (n * tokens,),
        imgs,
        patches,
        imgs if ids is None else ids.contiguous(),  # any pointer when HAS_IDS is off
        tokens,
        c,
        height,
        width,
        width // pw,
        PH=ph,
        PW=pw,
        HAS_IDS=ids is not None,
        CHANNEL_LAST=channel_last,
        TO_IMAGE=to_image,
        **launch_config(c, patch_size),
    )


def _patch_view(imgs: torch.Tensor, patch_size, channel_last: bool) -> torch.Tensor:
    """A strided view ``[N, h, w, *patch]`` of imgs, patch as ``(ph, pw, C)`` or ``(C, ph, pw)``."""
    n, c, height, width = imgs.shape
    ph, pw = patch_size
    view = imgs.view(n, c, height // ph, ph, width // pw, pw)
    return view.permute(0, 2, 4, 3, 5, 1) if channel_last else view.permute(0, 2, 4, 1, 3, 5)


def _grid_index(ids: torch.Tensor, imgs: torch.Tensor, patch_size):
    """Advanced-indexing triple (image, patch row, patch column) for ``ids [N, T]`` into the
    patch view of ``imgs``, and the ``[N, T]`` validity of each id; ids outside ``[0, L)`` are
    replaced by 0, as the kernel does."""
    grid_w = imgs.shape[3] // patch_size[1]
    ids, in_range = ids_in_range(ids, (imgs.shape[2] // patch_size[0]) * grid_w)
    rows = torch.arange(imgs.shape[0], device=ids.device)[:, None]
    return (rows, ids // grid_w, ids % grid_w), in_range


def _gather_torch(imgs, ids, patch_size, channel_last: bool):
    """-> ``[N, T, *patch]``, a new tensor (an op's output must not alias its input)."""
    view = _patch_view(imgs, patch_size, channel_last)
    if ids is None:
        return imgs.new_empty(view.shape).copy_(view)
    index, in_range = _grid_index(ids, imgs, patch_size)
    return view[index].masked_fill_(in_range.logical_not()[..., None, None, None], 0)


def _scatter_torch(imgs, patches, ids, patch_size, channel_last: bool):
    view = _patch_view(imgs, patch_size, channel_last)
    if ids is None:
        view.copy_(patches.view(view.shape))
        return
    index, in_range = _grid_index(ids, imgs, patch_size)
    rows, grid_rows, grid_cols = (part.expand_as(ids)[in_range] for part in index)
    view[rows, grid_rows, grid_cols] = patches.view(*ids.shape, *view.shape[3:])[in_range]


def gather_patches(imgs, ids: Optional[torch.Tensor], patch_size, channel_last, use_triton):
    """imgs ``[N, C, H, W]`` -> patches ``[N, T, ph*pw*C]`` of the same dtype.

    ``ids [N, T]`` int64 selects patches (row-major over the patch grid); None takes all L.
    An id outside ``[0, L)`` gives a row of zeros.
    """
    imgs = imgs.contiguous()
    n, c, height, width = imgs.shape
    ph, pw = patch_size
    tokens = (height // ph) * (width // pw) if ids is None else ids.shape[1]
    if not use_triton:
        return _gather_torch(imgs, ids, patch_size, channel_last).view(n, tokens, c * ph * pw)
    patches = imgs.new_empty(n, tokens, c * ph * pw)
    _copy_patches_triton(imgs, patches, ids, patch_size, channel_last, to_image=False)
    return patches


def scatter_patches(
    patches, ids: Optional[torch.Tensor], patch_size, image_shape, channel_last, use_triton
):
    """patches ``[N, T, ph*pw*C]`` -> imgs ``image_shape``; pixels of unlisted patches (and rows
    whose id is outside ``[0, L)``) are 0."""
    patches = patches.contiguous()
    imgs = patches.new_empty(image_shape) if ids is None else patches.new_zeros(image_shape)
    if use_triton:
        _copy_patches_triton(imgs, patches, ids, patch_size, channel_last, to_image=True)
    else:
        _scatter_torch(imgs, patches, ids, patch_size, channel_last)
    return imgs


# Custom ops (why custom_op and not triton_op: see kernels/__init__.py).


@torch.library.custom_op("fastmae::gather_patches", mutates_args=())
def gather_patches_op(
    imgs: Tensor, ids: Optional[Tensor], patch_size: IntList, channel_last: bool, use_triton: bool
) -> Tensor:
    """:func:`gather_patches` as a differentiable op; its backward is ``scatter_patches``."""
    return gather_patches(imgs, ids, tuple(patch_size), channel_last, use_triton)


@gather_patches_op.register_fake
def _(imgs, ids, patch_size, channel_last, use_triton):
    n, c, height, width = imgs.shape
    tokens = (height // patch_size[0]) * (width // patch_size[1]) if ids is None else ids.shape[1]
    return imgs.new_empty(n, tokens, c * patch_size[0] * patch_size[1])


@torch.library.custom_op("fastmae::scatter_patches", mutates_args=())
def scatter_patches_op(
    patches: Tensor,
    ids: Optional[Tensor],
    patch_size: IntList,
    image_shape: IntList,
    channel_last: bool,
    use_triton: bool,
) -> Tensor:
    """:func:`scatter_patches` as a differentiable op; its backward is ``gather_patches``."""
    return scatter_patches(patches, ids, tuple(patch_size), image_shape, channel_last, use_triton)


@scatter_patches_op.register_fake
def _(patches, ids, patch_size, image_shape, channel_last, use_triton):
    return patches.new_empty(image_shape)


@fused_op("fastmae::gather_patches", kernels=[_copy_patches_kernel])
def _gather_bytes(imgs, ids, patch_size, channel_last, use_triton, outputs):
    ids_bytes = 0 if ids is None else nbytes(ids)
    return 2 * nbytes(outputs) + ids_bytes  # the gathered pixels read, then written


@fused_op("fastmae::scatter_patches", kernels=[_copy_patches_kernel])
def _scatter_bytes(patches, ids, patch_size, image_shape, channel_last, use_triton, outputs):
    if ids is None:
        return 2 * nbytes(patches)
    return nbytes(outputs) + 2 * nbytes(patches) + nbytes(ids)  # zero fill, then the patches


def _setup_gather(ctx, inputs, output):
    imgs, ids, ctx.patch_size, ctx.channel_last, ctx.use_triton = inputs
    ctx.image_shape = list(imgs.shape)
    ctx.save_for_backward(ids)


def _backward_gather(ctx, grad):
    (ids,) = ctx.saved_tensors
    grad_imgs = scatter_patches_op(
        grad, ids, ctx.patch_size, ctx.image_shape, ctx.channel_last, ctx.use_triton
    )
    return grad_imgs, None, None, None, None


def _setup_scatter(ctx, inputs, output):
    _, ids, ctx.patch_size, _, ctx.channel_last, ctx.use_triton = inputs
    ctx.save_for_backward(ids)


def _backward_scatter(ctx, grad):
    (ids,) = ctx.saved_tensors
    grad_patches = gather_patches_op(grad, ids, ctx.patch_size, ctx.channel_last, ctx.use_triton)
    return grad_patches, None, None, None, None, None


gather_patches_op.register_autograd(_backward_gather, setup_context=_setup_gather)
scatter_patches_op.register_autograd(_backward_scatter, setup_context=_setup_scatter)
