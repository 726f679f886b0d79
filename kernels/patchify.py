"""Patch gather and scatter between images ``[N, C, H, W]`` and patch rows ``[N, T, P]``.

One kernel pair serves three ops:
- patchify / unpatchify: every patch, pixel order ``(i, j, c)`` (channel fastest), as MAE's;
- the encoder input: the kept patches only (``ids``), in the conv weight's ``(c, i, j)`` order,
  and its backward, which scatters pixel gradients back into a zero image.
Each pixel belongs to one patch, so the scatter writes every destination at most once.
"""

from typing import Optional

import torch

from ._triton import IntList, ids_in_range, kernel_bytes, launch, nbytes, tl, triton, warps_for


@triton.jit
def _patch_offsets(
    element, C, H, W, PH: tl.constexpr, PW: tl.constexpr, CHANNEL_LAST: tl.constexpr
):
    """Offsets inside one image ``[C, H, W]`` of the pixels ``element`` of a patch at (0, 0)."""
    if CHANNEL_LAST:
        channel = element % C
        inside = element // C
    else:
        channel = element // (PH * PW)
        inside = element % (PH * PW)
    return channel * H * W + (inside // PW) * W + inside % PW


@triton.jit
def _patch_corner(
    token, ids_ptr, T, C, H, W, grid_w, PH: tl.constexpr, PW: tl.constexpr, HAS_IDS: tl.constexpr
):
    """Offset (int64) in ``[N, C, H, W]`` of the top-left pixel of row ``token``'s patch, and
    whether that patch exists: an id outside ``[0, L)`` gives offset 0 and False, so callers
    mask every access through it."""
    image = token // T
    if HAS_IDS:
        patch = tl.load(ids_ptr + token).to(tl.int64)
        in_range = (patch >= 0) & (patch < (H // PH) * grid_w)
        patch = tl.where(in_range, patch, 0)
    else:
        patch = token % T
        in_range = patch >= 0
    corner = image * C * H * W + (patch // grid_w) * PH * W + (patch % grid_w) * PW
    return corner, in_range


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
    corner, in_range = _patch_corner(token, ids_ptr, T, C, H, W, grid_w, PH, PW, HAS_IDS)
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


def tile_config(channels: int, patch_size) -> dict:
    """Launch parameters of the patch kernels: at most 4096 pixels (8 per thread) per step."""
    ph_block, pw_block = (triton.next_power_of_2(side) for side in patch_size)
    c_block = max(1, min(triton.next_power_of_2(channels), 4096 // (ph_block * pw_block)))
    tile = c_block * ph_block * pw_block
    return dict(C_BLOCK=c_block, PH_BLOCK=ph_block, PW_BLOCK=pw_block, num_warps=warps_for(tile))


def _patch_view(imgs: torch.Tensor, patch_size, channel_last: bool) -> torch.Tensor:
    """A strided view ``[N, h, w, *patch]`` of imgs, patch as ``(ph, pw, C)`` or ``(C, ph, pw)``."""
    n, c, height, width = imgs.shape
    ph, pw = patch_size
    view = imgs.view(n, c, height // ph, ph, width // pw, pw)
    return view.permute(0, 2, 4, 3, 5, 1) if channel_last else view.permute(0, 2, 4, 1, 3, 5)


def _grid_index(ids: torch.Tensor, n: int, grid_w: int, num_patches: int):
    """Advanced-indexing triple (image, patch row, patch column) for ``ids [N, T]``, and the
    ``[N, T]`` validity of each id; ids outside ``[0, L)`` are replaced by 0, as the kernel does.
    """
    ids, in_range = ids_in_range(ids, num_patches)
    rows = torch.arange(n, device=ids.device)[:, None]
    return (rows, ids // grid_w, ids % grid_w), in_range


def gather_patches(
    imgs: torch.Tensor,
    ids: Optional[torch.Tensor],
    patch_size,
    channel_last: bool,
    use_triton: bool,
) -> torch.Tensor:
    """imgs ``[N, C, H, W]`` -> patches ``[N, T, ph*pw*C]`` of the same dtype.

    ``ids [N, T]`` int64 selects patches (row-major over the patch grid); None takes all L.
    """
    imgs = imgs.contiguous()
    n, c, height, width = imgs.shape
    ph, pw = patch_size
    grid_w = width // pw
    num_patches = (height // ph) * grid_w
    tokens = num_patches if ids is None else ids.shape[1]
    pixels = c * ph * pw
    if not use_triton:
        view = _patch_view(imgs, patch_size, channel_last)
        if ids is None:  # always a copy: an op's output must not alias its input
            return imgs.new_empty(view.shape).copy_(view).view(n, tokens, pixels)
        index, in_range = _grid_index(ids, n, grid_w, num_patches)
        patches = view[index].reshape(n, tokens, pixels)
        return patches.masked_fill_(in_range.logical_not()[..., None], 0)
    patches = torch.empty(n, tokens, pixels, dtype=imgs.dtype, device=imgs.device)
    if patches.numel():
        ids_arg = imgs if ids is None else ids.contiguous()
        launch(
            _copy_patches_kernel,
            (n * tokens,),
            imgs,
            patches,
            ids_arg,
            tokens,
            c,
            height,
            width,
            grid_w,
            PH=ph,
            PW=pw,
            HAS_IDS=ids is not None,
            CHANNEL_LAST=channel_last,
            TO_IMAGE=False,
            **tile_config(c, patch_size),
        )
    return patches


def scatter_patches(
    patches: torch.Tensor,
    ids: Optional[torch.Tensor],
    patch_size,
    image_shape,
    channel_last: bool,
    use_triton: bool,
) -> torch.Tensor:
    """patches ``[N, T, ph*pw*C]`` -> imgs ``image_shape``; pixels of unlisted patches are 0."""
    patches = patches.contiguous()
    n, c, height, width = image_shape
    ph, pw = patch_size
    grid_w = width // pw
    num_patches = (height // ph) * grid_w
    tokens = patches.shape[1]
    every_patch = ids is None
    imgs = patches.new_empty(image_shape) if every_patch else patches.new_zeros(image_shape)
    if not use_triton:
        view = _patch_view(imgs, patch_size, channel_last)
        if every_patch:
            view.copy_(patches.view(view.shape))
        else:
            index, in_range = _grid_index(ids, n, grid_w, num_patches)
            rows, grid_rows, grid_cols = (part.expand_as(ids)[in_range] for part in index)
            view[rows, grid_rows, grid_cols] = patches.view(n, tokens, *view.shape[3:])[in_range]
        return imgs
    if patches.numel():
        ids_arg = patches if every_patch else ids.contiguous()
        launch(
            _copy_patches_kernel,
            (n * tokens,),
            imgs,
            patches,
            ids_arg,
            tokens,
            c,
            height,
            width,
            grid_w,
            PH=ph,
            PW=pw,
            HAS_IDS=not every_patch,
            CHANNEL_LAST=channel_last,
            TO_IMAGE=True,
            **tile_config(c, patch_size),
        )
    return imgs


# Custom ops (why custom_op and not triton_op: see kernels/__init__.py).


@torch.library.custom_op("fastmae::gather_patches", mutates_args=())
def gather_patches_op(
    imgs: torch.Tensor,
    ids: Optional[torch.Tensor],
    patch_size: IntList,
    channel_last: bool,
    use_triton: bool,
) -> torch.Tensor:
    """:func:`gather_patches` as a differentiable op; its backward is ``scatter_patches``."""
    return gather_patches(imgs, ids, tuple(patch_size), channel_last, use_triton)


@gather_patches_op.register_fake
def _(imgs, ids, patch_size, channel_last, use_triton):
    n, c, height, width = imgs.shape
    tokens = (height // patch_size[0]) * (width // patch_size[1]) if ids is None else ids.shape[1]
    return imgs.new_empty(n, tokens, c * patch_size[0] * patch_size[1])


@torch.library.custom_op("fastmae::scatter_patches", mutates_args=())
def scatter_patches_op(
    patches: torch.Tensor,
    ids: Optional[torch.Tensor],
    patch_size: IntList,
    image_shape: IntList,
    channel_last: bool,
    use_triton: bool,
) -> torch.Tensor:
    """:func:`scatter_patches` as a differentiable op; its backward is ``gather_patches``."""
    return scatter_patches(patches, ids, tuple(patch_size), image_shape, channel_last, use_triton)


@scatter_patches_op.register_fake
def _(patches, ids, patch_size, image_shape, channel_last, use_triton):
    return patches.new_empty(image_shape)


@kernel_bytes("fastmae::gather_patches")
def _gather_bytes(imgs, ids, patch_size, channel_last, use_triton, outputs):
    ids_bytes = 0 if ids is None else nbytes(ids)
    return 2 * nbytes(outputs) + ids_bytes  # the gathered pixels read, then written


@kernel_bytes("fastmae::scatter_patches")
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
