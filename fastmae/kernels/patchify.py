"""Patch gather and scatter between images or videos and patch rows ``[N, T, P]``.

An image ``[N, C, H, W]`` is a video ``[N, C, 1, H, W]`` of one frame, and a patch a tubelet
of ``u = 1`` frame: one kernel pair serves both, and three ops:
- patchify / unpatchify: every patch, pixel order ``(u, i, j, c)`` (channel fastest), as MAE's;
- the encoder input: the kept patches only (``ids``), in the conv weight's ``(c, u, i, j)``
  order, and its backward, which scatters pixel gradients back into a zero image.
Patches are numbered ``(t, h, w)``, row-major. Each pixel belongs to one patch, so the scatter
writes every destination at most once.
"""

from typing import Optional

import torch
from torch import Tensor

from ._jit import patch_corner
from ._triton import IntList, fused_op, ids_in_range, launch, nbytes, tl, triton, warps_for


@triton.jit
def _tile_offsets(
    first_channel,
    frame,
    C,
    stride_c,
    stride_f,
    stride_h,
    stride_w,
    U: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    C_BLOCK: tl.constexpr,
    PH_BLOCK: tl.constexpr,
    PW_BLOCK: tl.constexpr,
    CHANNEL_LAST: tl.constexpr,
):
    """A ``[C_BLOCK, PH_BLOCK, PW_BLOCK]`` tile of frame ``frame`` of one patch: offsets in the
    strided video (relative to the patch corner), offsets in the patch row, and validity. The
    innermost axis runs along image columns: with a unit column stride, video-side accesses are
    contiguous runs of PW pixels."""
    channel = first_channel + tl.arange(0, C_BLOCK)[:, None, None]
    row = tl.arange(0, PH_BLOCK)[None, :, None]
    col = tl.arange(0, PW_BLOCK)[None, None, :]
    valid = (channel < C) & (row < PH) & (col < PW)
    image_offsets = channel * stride_c + frame * stride_f + row * stride_h + col * stride_w
    if CHANNEL_LAST:
        patch_offsets = ((frame * PH + row) * PW + col) * C + channel
    else:
        patch_offsets = ((channel * U + frame) * PH + row) * PW + col
    return image_offsets, patch_offsets, valid


@triton.jit
def _copy_patches_kernel(
    imgs_ptr,  # [N, C, F, H, W] strided: read, or written when TO_IMAGE (others untouched)
    patches_ptr,  # [N, T, C*U*PH*PW]: written, or read when TO_IMAGE
    ids_ptr,  # [N, T] int64 patch index of each row (read only when HAS_IDS)
    T,
    C,
    F,
    H,
    grid_w,
    stride_n,
    stride_c,
    stride_f,
    stride_h,
    stride_w,
    U: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_IDS: tl.constexpr,
    CHANNEL_LAST: tl.constexpr,
    TO_IMAGE: tl.constexpr,
    C_BLOCK: tl.constexpr,
    PH_BLOCK: tl.constexpr,
    PW_BLOCK: tl.constexpr,
):
    """Grid ``(N*T,)``: each program copies one patch between the video and its row (the
    gather), or back (TO_IMAGE, the scatter), one frame and C_BLOCK channels a step."""
    token = tl.program_id(0).to(tl.int64)
    corner, in_range = patch_corner(
        token, ids_ptr, T, F, H, grid_w, stride_n, stride_f, stride_h, stride_w, U, PH, PW, HAS_IDS
    )
    row_start = patches_ptr + token * (C * U * PH * PW)
    for frame in range(U):
        for first_channel in range(0, C, C_BLOCK):
            image_offsets, patch_offsets, valid = _tile_offsets(
                first_channel,
                frame,
                C,
                stride_c,
                stride_f,
                stride_h,
                stride_w,
                U,
                PH,
                PW,
                C_BLOCK,
                PH_BLOCK,
                PW_BLOCK,
                CHANNEL_LAST,
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
    """Launch parameters of the patch kernels: at most 4096 pixels (8 per thread) per step;
    ``patch_size`` is ``(ph, pw)`` or ``(u, ph, pw)`` (a step is one frame)."""
    ph_block, pw_block = (triton.next_power_of_2(side) for side in patch_size[-2:])
    c_block = max(1, min(triton.next_power_of_2(channels), 4096 // (ph_block * pw_block)))
    tile = c_block * ph_block * pw_block
    return dict(C_BLOCK=c_block, PH_BLOCK=ph_block, PW_BLOCK=pw_block, num_warps=warps_for(tile))


def as_video(imgs: Tensor, patch_size):
    """``(imgs as [N, C, F, H, W], patch size as (u, ph, pw))``: an image is one frame. A view
    with imgs' strides: the kernels and the torch paths read strided videos in place."""
    _, patch_size = video_geometry(imgs.shape, patch_size)
    return (imgs.unsqueeze(2) if imgs.dim() == 4 else imgs), patch_size


def video_geometry(shape, patch_size):
    """:func:`as_video` for a shape: ``(shape as [N, C, F, H, W], patch size as (u, ph, pw))``."""
    if len(shape) == 4:
        n, c, height, width = shape
        return [n, c, 1, height, width], (1, *patch_size)
    return list(shape), tuple(patch_size)


def _copy_patches_triton(video, patches, ids, patch_size, channel_last: bool, to_image: bool):
    """One program per patch row: video -> patches, or patches -> video with ``to_image``."""
    n, tokens, _ = patches.shape
    if not patches.numel():
        return
    _, c, frames, height, width = video.shape
    u, ph, pw = patch_size
    launch(
        _copy_patches_kernel,
        (n * tokens,),
        video,
        patches,
        video if ids is None else ids.contiguous(),  # any pointer when HAS_IDS is off
        tokens,
        c,
        frames,
        height,
        width // pw,
        *video.stride(),
        U=u,
        PH=ph,
        PW=pw,
        HAS_IDS=ids is not None,
        CHANNEL_LAST=channel_last,
        TO_IMAGE=to_image,
        **launch_config(c, patch_size),
    )


def _patch_view(video: Tensor, patch_size, channel_last: bool) -> Tensor:
    """A strided view ``[N, t, h, w, *patch]`` of a video, patch as ``(u, ph, pw, C)`` or
    ``(C, u, ph, pw)``."""
    n, c, frames, height, width = video.shape
    u, ph, pw = patch_size
    view = video.view(n, c, frames // u, u, height // ph, ph, width // pw, pw)
    order = (3, 5, 7, 1) if channel_last else (1, 3, 5, 7)
    return view.permute(0, 2, 4, 6, *order)


def _grid_index(ids: Tensor, view: Tensor):
    """Advanced-indexing tuple (video, t, h, w) for ``ids [N, T]`` into a patch view, and the
    ``[N, T]`` validity of each id; ids outside ``[0, L)`` are replaced by 0, as the kernel
    does."""
    n, grid_t, grid_h, grid_w = view.shape[:4]
    ids, in_range = ids_in_range(ids, grid_t * grid_h * grid_w)
    rows = torch.arange(n, device=ids.device)[:, None]
    return (rows, ids // (grid_h * grid_w), ids // grid_w % grid_h, ids % grid_w), in_range


def patch_view(video: Tensor, patch_size) -> Tensor:
    """A strided view ``[N, t, h, w, u, ph, pw, C]`` of a video ``[N, C, F, H, W]``: the
    patches in the shape a ``[N, t*h*w, u*ph*pw*C]`` tensor views as, with no copy."""
    return _patch_view(video, patch_size, channel_last=True)


def _gather_torch(video, ids, patch_size, channel_last: bool):
    """-> ``[N, T, *patch]``, a new tensor (an op's output must not alias its input)."""
    view = _patch_view(video, patch_size, channel_last)
    if ids is None:
        return video.new_empty(view.shape).copy_(view)
    index, in_range = _grid_index(ids, view)
    return view[index].masked_fill_(in_range.logical_not()[..., None, None, None, None], 0)


def _scatter_torch(video, patches, ids, patch_size, channel_last: bool):
    view = _patch_view(video, patch_size, channel_last)
    if ids is None:
        view.copy_(patches.view(view.shape))
        return
    index, in_range = _grid_index(ids, view)
    rows, grid_t, grid_h, grid_w = (part.expand_as(ids)[in_range] for part in index)
    view[rows, grid_t, grid_h, grid_w] = patches.view(*ids.shape, *view.shape[4:])[in_range]


def gather_patches(imgs, ids: Optional[Tensor], patch_size, channel_last, use_triton):
    """imgs ``[N, C, H, W]`` (patch ``(ph, pw)``) or ``[N, C, F, H, W]`` (patch ``(u, ph,
    pw)``), any strides (a permuted ``[N, F, C, H, W]`` clip is read in place) -> patches
    ``[N, T, u*ph*pw*C]`` of the same dtype.

    ``ids [N, T]`` int64 selects patches (row-major over the ``(t, h, w)`` grid); None takes
    all L. An id outside ``[0, L)`` gives a row of zeros.
    """
    video, patch_size = as_video(imgs, patch_size)
    n, c, frames, height, width = video.shape
    u, ph, pw = patch_size
    length = (frames // u) * (height // ph) * (width // pw)
    tokens = length if ids is None else ids.shape[1]
    if not use_triton:
        patches = _gather_torch(video, ids, patch_size, channel_last)
        return patches.reshape(n, tokens, c * u * ph * pw)  # a permuted clip: a new layout
    patches = imgs.new_empty(n, tokens, c * u * ph * pw)
    _copy_patches_triton(video, patches, ids, patch_size, channel_last, to_image=False)
    return patches


def scatter_patches(
    patches, ids: Optional[Tensor], patch_size, image_shape, channel_last, use_triton
):
    """patches ``[N, T, u*ph*pw*C]`` -> imgs ``image_shape`` (4-D or 5-D, as for
    :func:`gather_patches`); pixels of unlisted patches (and rows whose id is outside
    ``[0, L)``) are 0."""
    patches = patches.contiguous()
    imgs = patches.new_empty(image_shape) if ids is None else patches.new_zeros(image_shape)
    video, patch_size = as_video(imgs, patch_size)
    if use_triton:
        _copy_patches_triton(video, patches, ids, patch_size, channel_last, to_image=True)
    else:
        _scatter_torch(video, patches, ids, patch_size, channel_last)
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
    video, (u, ph, pw) = as_video(imgs, patch_size)
    n, c, frames, height, width = video.shape
    tokens = (frames // u) * (height // ph) * (width // pw) if ids is None else ids.shape[1]
    return imgs.new_empty(n, tokens, c * u * ph * pw)


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
