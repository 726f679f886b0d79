"""Masked (normalized-)pixel loss read straight from the images or videos, forward and backward.

    target = patch l of imgs[n], pixel order (u, i, j, c)        (no patchified copy)
    target = (target - mean) / sqrt(var + 1e-6)  with norm_pix   (var unbiased, divisor P-1)
    loss   = sum_{n,l} mask[n,l] * mean_P (pred - target)^2 / sum(mask)

An image is a video of one frame and its patches tubelets of one frame. For a video, frame u of
the tubelets at temporal index t is ``frames[t*U + u]`` (the frames the video MAE predicts,
read in place: no ``index_select`` copy; a frame may be named twice), or ``t*U + u`` without a
frame table.

Only patches with a nonzero mask are read; kept patches cost one mask load. Statistics and
accumulation are fp32 whatever the dtype of ``pred``, so fp16 predictions cannot overflow.
The per-patch losses land in an ``[N, L]`` buffer summed by torch: deterministic, no atomics,
and no host synchronisation (an all-kept mask gives 0 through ``where``, not a branch).

The backward needs neither ``pred`` nor ``mask`` nor the loss, all of which the caller holds and
may change in place (the official training loop divides the loss in place): the forward keeps
the weighted residual ``mask * (pred - target)`` and a copy of the mask's weights instead, as
the official loss keeps ``pred - target``. The images are kept only when they need a gradient.
"""

from typing import Optional

import torch
from torch import Tensor

from fastmae.config import NORM_PIX_EPS

from ._triton import (
    IntList,
    accumulation_dtype,
    block_size,
    fused_op,
    launch,
    nbytes,
    promoted_dtype,
    tl,
    triton,
    warps_for,
)
from .patchify import as_video, gather_patches, scatter_patches, video_geometry

MAX_PATCH_PIXELS = 1 << 16  # one patch is one block of a program


@triton.jit
def _target_offsets(
    frames_ptr,
    patch_row,
    L,
    C,
    F,
    H,
    W,
    grid_w,
    P,
    U: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    FRAME_TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Offsets of one patch's pixels, in (u, i, j, c) order, in the video ``[N, C, F, H, W]``
    (frame ``frames[t*U + u]`` with FRAME_TABLE, else ``t*U + u``), and their validity."""
    image, patch = patch_row // L, patch_row % L
    grid_hw = (H // PH) * grid_w
    spatial = patch % grid_hw
    element = tl.arange(0, BLOCK)
    valid = element < P
    channel = element % C
    inside = element // C  # (u, i, j)
    frame = (patch // grid_hw) * U + inside // (PH * PW)
    if FRAME_TABLE:
        frame = tl.load(frames_ptr + frame, mask=valid, other=0)
    row = (spatial // grid_w) * PH + inside % (PH * PW) // PW
    col = (spatial % grid_w) * PW + inside % PW
    return ((image * C + channel) * F + frame) * H * W + row * W + col, valid


@triton.jit
def _pred_row(pred_ptr, patch_row, L, stride_n, stride_l, stride_p, BLOCK: tl.constexpr):
    """Pointers to the P values of patch ``patch_row`` (= n*L + l) of a strided pred: the
    model's pred is the slice ``x[:, 1:]`` of the decoder output, read without a copy."""
    image, patch = patch_row // L, patch_row % L
    return pred_ptr + image * stride_n + patch * stride_l + tl.arange(0, BLOCK) * stride_p


@triton.jit
def _masked_loss_fwd_kernel(
    patch_loss_ptr,  # [N*L] fp32 out: mask * mean squared error of each patch (0 where mask 0)
    residual_ptr,  # [N*L, P] fp32 out: mask * (pred - target), 0 where mask 0
    patch_mse_ptr,  # [N*L] fp32 out: mean squared error of every patch (only if ALL_PATCHES)
    mean_ptr,  # [N*L] fp32 out: target mean (written where the patch is read and NORM_PIX)
    rstd_ptr,  # [N*L] fp32 out: 1 / sqrt(var + eps)
    pred_ptr,  # [N, L, P] with strides (stride_n, stride_l, stride_p)
    imgs_ptr,  # [N, C, F, H, W] (an image: F = 1)
    mask_ptr,  # [N*L] fp32 mask weights
    frames_ptr,  # [L / (h*w) * U] int64 frame of each tubelet frame (read with FRAME_TABLE)
    L,
    C,
    F,
    H,
    W,
    grid_w,
    P,
    stride_n,
    stride_l,
    stride_p,
    eps,
    U: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    FRAME_TABLE: tl.constexpr,
    NORM_PIX: tl.constexpr,
    ALL_PATCHES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid ``(N*L,)``: one patch per program, all P pixels in one block. Reads the patches whose
    weight is nonzero, or every patch with ALL_PATCHES (the mask's gradient needs each MSE)."""
    patch_row = tl.program_id(0).to(tl.int64)
    weight = tl.load(mask_ptr + patch_row)
    element = tl.arange(0, BLOCK)
    residual_row = residual_ptr + patch_row * P + element
    if (weight != 0) | ALL_PATCHES:
        offsets, valid = _target_offsets(
            frames_ptr, patch_row, L, C, F, H, W, grid_w, P, U, PH, PW, FRAME_TABLE, BLOCK
        )
        target = tl.load(imgs_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        if NORM_PIX:
            mean = tl.sum(target, axis=0) / P
            centered = tl.where(valid, target - mean, 0.0)
            var = tl.sum(centered * centered, axis=0) / (P - 1)
            rstd = 1.0 / tl.sqrt(var + eps)
            target = centered * rstd
            tl.store(mean_ptr + patch_row, mean)
            tl.store(rstd_ptr + patch_row, rstd)
        pred_row = _pred_row(pred_ptr, patch_row, L, stride_n, stride_l, stride_p, BLOCK)
        pred = tl.load(pred_row, mask=valid, other=0.0)
        diff = tl.where(valid, pred.to(tl.float32) - target, 0.0)
        mse = tl.sum(diff * diff, axis=0) / P
        if ALL_PATCHES:
            tl.store(patch_mse_ptr + patch_row, mse)
        # A patch of weight 0 adds 0 even when its MSE is not finite: it is not part of the loss.
        is_weighted = weight != 0
        tl.store(patch_loss_ptr + patch_row, tl.where(is_weighted, weight * mse, 0.0))
        tl.store(residual_row, tl.where(is_weighted, weight * diff, 0.0), mask=valid)
    else:
        tl.store(patch_loss_ptr + patch_row, 0.0)
        tl.store(residual_row, tl.zeros([BLOCK], dtype=tl.float32), mask=element < P)


@triton.jit
def _masked_loss_bwd_kernel(
    grad_pred_ptr,  # [N, L, P] out, contiguous: zeros at kept patches
    grad_imgs_ptr,  # [N, C, F', H, W] out, zero-initialised (written only when GRAD_IMGS)
    scale_ptr,  # [1] fp32: 2 * grad_loss / (P * sum(mask)), 0 when sum(mask) is 0
    residual_ptr,  # [N*L, P] fp32 from the forward: mask * (pred - target)
    mask_ptr,  # [N*L] fp32 mask weights from the forward
    imgs_ptr,  # [N, C, F, H, W] (read only when GRAD_IMGS)
    mean_ptr,  # [N*L] fp32 from the forward
    rstd_ptr,  # [N*L] fp32 from the forward
    frames_ptr,  # [F'] int64 frame of each tubelet frame (read with FRAME_TABLE)
    L,
    C,
    F,
    H,
    W,
    grid_w,
    P,
    U: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    FRAME_TABLE: tl.constexpr,
    NORM_PIX: tl.constexpr,
    GRAD_IMGS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid ``(N*L,)``: d loss / d pred = scale * residual, and optionally the gradient through
    the target into the pixels of the target frames ``[N, C, F', H, W]`` (F' = F without a
    frame table; each pixel there belongs to one patch, so every store is its own)."""
    patch_row = tl.program_id(0).to(tl.int64)
    weight = tl.load(mask_ptr + patch_row)
    element = tl.arange(0, BLOCK)
    grad_row = grad_pred_ptr + patch_row * P + element
    if weight != 0:
        valid = element < P
        residual = tl.load(residual_ptr + patch_row * P + element, mask=valid, other=0.0)
        grad = tl.load(scale_ptr) * residual
        tl.store(grad_row, grad.to(grad_pred_ptr.dtype.element_ty), mask=valid)
        if GRAD_IMGS:
            grad_target = -grad
            if NORM_PIX:
                # Backward of (x - mean) * rstd with the unbiased variance inside rstd.
                offsets, _ = _target_offsets(
                    frames_ptr, patch_row, L, C, F, H, W, grid_w, P, U, PH, PW, FRAME_TABLE, BLOCK
                )
                pixels = tl.load(imgs_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_ptr + patch_row)
                target = tl.where(valid, (pixels - tl.load(mean_ptr + patch_row)) * rstd, 0.0)
                mean_grad = tl.sum(grad_target, axis=0) / P
                dot = tl.sum(grad_target * target, axis=0) / (P - 1)
                grad_target = rstd * (grad_target - mean_grad - target * dot)
            selected_frames = L // ((H // PH) * grid_w) * U
            grad_offsets, _ = _target_offsets(
                frames_ptr,
                patch_row,
                L,
                C,
                selected_frames,
                H,
                W,
                grid_w,
                P,
                U,
                PH,
                PW,
                False,
                BLOCK,
            )
            tl.store(
                grad_imgs_ptr + grad_offsets,
                grad_target.to(grad_imgs_ptr.dtype.element_ty),
                mask=valid,
            )
    else:
        tl.store(
            grad_row, tl.zeros([BLOCK], dtype=grad_pred_ptr.dtype.element_ty), mask=element < P
        )


def launch_config(pixels: int) -> dict:
    """Launch parameters of the loss kernels: one patch of ``pixels`` values per program."""
    if pixels > MAX_PATCH_PIXELS:
        raise ValueError(
            f"the fused loss kernels hold a patch in one block, at most {MAX_PATCH_PIXELS} "
            f"pixels; got {pixels} (use FASTMAE_BACKEND=torch for such patches)"
        )
    block = block_size(pixels, MAX_PATCH_PIXELS)
    return dict(BLOCK=block, num_warps=warps_for(block))


def _geometry(video_shape, frames, length, pixels, patch_size, norm_pix) -> dict:
    """The keyword arguments both loss kernels take after their tensors: the video's and the
    patches' geometry, the constexprs and the launch parameters."""
    _, c, num_frames, height, width = video_shape
    u, ph, pw = patch_size
    sizes = dict(L=length, C=c, F=num_frames, H=height, W=width, grid_w=width // pw, P=pixels)
    constants = dict(U=u, PH=ph, PW=pw, FRAME_TABLE=frames is not None, NORM_PIX=norm_pix)
    return dict(**sizes, **constants, **launch_config(pixels))


def _loss_forward_triton(video, frames, pred, weight, patch_size, norm_pix, all_patches, state):
    """Fills the state (residual; mean and rstd with norm_pix; mse with all_patches); returns
    the sum over patches of mask * MSE."""
    residual, mean, rstd, patch_mse = state
    patch_loss = torch.empty(weight.numel(), dtype=torch.float32, device=pred.device)
    if patch_loss.numel():
        length, pixels = pred.shape[1], pred.shape[2]
        launch(
            _masked_loss_fwd_kernel,
            (patch_loss.numel(),),
            patch_loss,
            residual,
            patch_mse,
            mean,
            rstd,
            pred,
            video,
            weight,
            video if frames is None else frames,  # any pointer without a frame table
            stride_n=pred.stride(0),
            stride_l=pred.stride(1),
            stride_p=pred.stride(2),
            eps=NORM_PIX_EPS,
            ALL_PATCHES=all_patches,
            **_geometry(list(video.shape), frames, length, pixels, patch_size, norm_pix),
        )
    return patch_loss.sum()


def _target_frames(video, frames):
    """The frames the targets come from: the video's, or those the frame table names."""
    return video if frames is None else video.index_select(2, frames)


def _read_rows(video, frames, weight, pixels, patch_size, all_patches):
    """The patch rows the loss reads (flat indices over N*L: weight nonzero, or all), and their
    targets in the weights' dtype. The torch path selects rows with ``nonzero``, which costs
    nothing on the CPU."""
    if all_patches:
        rows = torch.arange(weight.numel(), device=weight.device)
    else:
        rows = torch.nonzero(weight).squeeze(1)
    source = _target_frames(video, frames)
    patches = gather_patches(source, None, patch_size, True, False).reshape(-1, pixels)
    return rows, patches.index_select(0, rows).to(weight.dtype)


def _normalise_rows(target, pixels):
    """-> (target rows normalised by their mean and unbiased variance + eps, mean, rstd)."""
    target_mean = target.mean(-1, keepdim=True)
    target = target - target_mean
    # Two passes over the centred rows: torch.var is several times slower on the CPU.
    var = torch.linalg.vector_norm(target, dim=-1, keepdim=True).square() / (pixels - 1)
    target_rstd = torch.rsqrt(var + NORM_PIX_EPS)
    return target * target_rstd, target_mean[:, 0], target_rstd[:, 0]


def _loss_forward_torch(video, frames, pred, weight, patch_size, norm_pix, all_patches, state):
    """The torch path on the rows read only; fills the same state as the kernel."""
    residual, mean, rstd, patch_mse = state
    length, pixels = pred.shape[1], pred.shape[2]
    rows, target = _read_rows(video, frames, weight, pixels, patch_size, all_patches)
    if norm_pix and rows.numel():
        target, target_mean, target_rstd = _normalise_rows(target, pixels)
        mean.index_copy_(0, rows, target_mean)
        rstd.index_copy_(0, rows, target_rstd)
    # The strided pred's rows gathered (no full copy), then in place: every pass counts.
    diff = pred[rows // length, rows % length].to(target.dtype).sub_(target)
    mse = torch.linalg.vector_norm(diff, dim=-1).square() / pixels
    row_weight = weight.index_select(0, rows)
    is_weighted = row_weight != 0
    if all_patches:
        patch_mse.copy_(mse)
        diff = torch.where(is_weighted[:, None], diff, 0.0)  # keep kept rows' gradient 0
    else:  # zero only the rows not read: every pass counts on the CPU
        residual.index_fill_(0, torch.nonzero(weight == 0).squeeze(1), 0.0)
    residual.index_copy_(0, rows, diff.mul_(row_weight[:, None]))
    return torch.where(is_weighted, mse * row_weight, 0.0).sum()


def _selected_shape(video_shape, length, patch_size):
    """The shape ``[N, C, F', H, W]`` of the target frames: F' = t * u for t tubelets in time."""
    n, c, _, height, width = video_shape
    u, ph, pw = patch_size
    return [n, c, length // ((height // ph) * (width // pw)) * u, height, width]


def _loss_backward_triton(scale, residual, weight, video, mean, rstd, frames, grad_pred, geometry):
    """Fills grad_pred ``[N, L, P]``; returns the gradient of the target frames
    ``[N, C, F', H, W]`` when ``video`` (the images as a video) is given, else None."""
    video_shape, length, patch_size, norm_pix = geometry
    grad_source = None
    if video is not None:
        grad_source = video.new_zeros(_selected_shape(video_shape, length, patch_size))
    if grad_pred.numel():
        pixels = residual.shape[1]
        launch(
            _masked_loss_bwd_kernel,
            (weight.numel(),),
            grad_pred,
            grad_pred if video is None else grad_source,  # any pointer without GRAD_IMGS
            scale,
            residual,
            weight,
            *((residual,) * 3 if video is None else (video, mean, rstd)),  # any without
            residual if frames is None else frames,  # any pointer without a frame table
            GRAD_IMGS=video is not None,
            **_geometry(video_shape, frames, length, pixels, patch_size, norm_pix),
        )
    return grad_source


def _loss_backward_torch(scale, residual, weight, video, mean, rstd, frames, grad_pred, geometry):
    """The torch path of :func:`_loss_backward_triton`: grad_pred is one multiply, and the
    target frames' gradient goes back through the (normalised) target."""
    video_shape, length, patch_size, norm_pix = geometry
    grad_pred.view(-1, residual.shape[1]).copy_(residual * scale)
    if video is None:
        return None
    pixels = residual.shape[1]
    rows, target = _read_rows(video, frames, weight, pixels, patch_size, False)
    grad_target = -(residual.index_select(0, rows) * scale)
    if norm_pix:  # backward of (x - mean) * rstd, the unbiased variance inside rstd
        patch_rstd = rstd.index_select(0, rows)[:, None]
        target = (target - mean.index_select(0, rows)[:, None]) * patch_rstd
        grad_target = patch_rstd * (
            grad_target
            - grad_target.mean(-1, keepdim=True)
            - target * (grad_target * target).sum(-1, keepdim=True) / (pixels - 1)
        )
    selected_shape = _selected_shape(video_shape, length, patch_size)
    grad_patches = video.new_zeros(selected_shape[0], length, pixels)
    grad_patches.view(-1, pixels).index_copy_(0, rows, grad_target.to(video.dtype))
    return scatter_patches(grad_patches, None, patch_size, selected_shape, True, False)


def _inverse_mask_sum(weight: torch.Tensor) -> torch.Tensor:
    """1 / sum(mask), or 0 when the sum is exactly 0, so that such a mask gives loss 0 (the
    official code gives NaN) and no gradient. Negative sums divide as the official code does."""
    total = weight.sum()
    return torch.where(total != 0, 1.0 / torch.where(total != 0, total, 1.0), 0.0)


def _state_like(pred, mask, dtype, all_patches):
    """The saved state's tensors: residual ``[N*L, P]`` (empty), mean and rstd ``[N*L]``
    (zeros: 0 where a patch is not read), and each patch's MSE (empty; ``[N*L]`` with
    all_patches, else ``[0]``)."""
    rows, pixels = mask.numel(), pred.shape[-1]
    return (
        pred.new_empty(rows, pixels, dtype=dtype),
        pred.new_zeros(rows, dtype=dtype),
        pred.new_zeros(rows, dtype=dtype),
        pred.new_empty(rows if all_patches else 0, dtype=dtype),
    )


@torch.library.custom_op("fastmae::masked_pixel_loss", mutates_args=())
def masked_pixel_loss_op(
    imgs: Tensor,
    pred: Tensor,
    mask: Tensor,
    frames: Optional[Tensor],
    patch_size: IntList,
    norm_pix: bool,
    all_patches: bool,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss 0-dim in the promotion of the three dtypes, as the official code gives; then
    the state its backward keeps, in the accumulation dtype: the loss again, the mask's weights
    ``[N*L]``, the weighted residual ``mask * (pred - target)`` ``[N*L, P]`` (0 where the
    weight is 0), the target's mean and rstd ``[N*L]`` (where read, with norm_pix; else 0),
    and each patch's MSE ``[N*L]`` with ``all_patches`` (``[0]`` without), which the mask's
    gradient needs). Both backends give the same outputs.

    imgs ``[N, C, H, W]`` with patch_size ``(ph, pw)``, or a video ``[N, C, F, H, W]`` with
    ``(u, ph, pw)`` and optionally ``frames``, the int64 frame of each tubelet frame."""
    video, patch_size = as_video(imgs.contiguous(), patch_size)
    dtype = accumulation_dtype(imgs, pred, mask)
    weight = mask.reshape(-1).to(dtype, copy=True)
    state = _state_like(pred, mask, dtype, all_patches)
    path = _loss_forward_triton if use_triton else _loss_forward_torch
    total = path(video, frames, pred, weight, patch_size, norm_pix, all_patches, state)
    loss_state = total * _inverse_mask_sum(weight)
    loss = loss_state.to(promoted_dtype(pred, imgs, mask), copy=True)
    return loss, loss_state, weight, *state


@masked_pixel_loss_op.register_fake
def _(imgs, pred, mask, frames, patch_size, norm_pix, all_patches, use_triton):
    dtype = accumulation_dtype(imgs, pred, mask)
    loss = pred.new_empty((), dtype=promoted_dtype(pred, imgs, mask))
    weight = pred.new_empty(mask.numel(), dtype=dtype)
    return (
        loss,
        pred.new_empty((), dtype=dtype),
        weight,
        *_state_like(pred, mask, dtype, all_patches),
    )


@torch.library.custom_op("fastmae::masked_pixel_loss_backward", mutates_args=())
def masked_pixel_loss_backward_op(
    scale: Tensor,
    residual: Tensor,
    weight: Tensor,
    imgs: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    frames: Optional[Tensor],
    imgs_shape: IntList,
    length: int,
    patch_size: IntList,
    norm_pix: bool,
    pred_dtype: torch.dtype,
    use_triton: bool,
) -> tuple[Tensor, Tensor]:
    """scale ``[1]`` = 2 * grad_loss / (P * sum(mask)) and the forward's state -> (grad_imgs
    ``imgs_shape``, or an empty tensor when ``imgs`` is None; grad_pred ``[N, L, P]``
    contiguous, in ``pred_dtype``)."""
    video = None if imgs is None else as_video(imgs.contiguous(), patch_size)[0]
    video_shape, patch_size = video_geometry(imgs_shape, patch_size)
    grad_pred = residual.new_empty(imgs_shape[0], length, residual.shape[1], dtype=pred_dtype)
    geometry = (video_shape, length, patch_size, norm_pix)
    path = _loss_backward_triton if use_triton else _loss_backward_torch
    grad_source = path(scale, residual, weight, video, mean, rstd, frames, grad_pred, geometry)
    if grad_source is None:
        return residual.new_empty(0, dtype=pred_dtype), grad_pred
    if frames is not None:  # a frame named twice gets both gradients
        grad_source = torch.zeros_like(video).index_add_(2, frames, grad_source)
    return grad_source.view(imgs_shape), grad_pred


@masked_pixel_loss_backward_op.register_fake
def _(scale, residual, weight, imgs, mean, rstd, frames, imgs_shape, length, *rest):
    pred_dtype = rest[-2]
    grad_imgs = residual.new_empty(0, dtype=pred_dtype) if imgs is None else torch.empty_like(imgs)
    return grad_imgs, residual.new_empty(imgs_shape[0], length, residual.shape[1], dtype=pred_dtype)


def _read_patch_bytes(imgs, pred, mask, all_patches) -> int:
    """Pixels and predictions of the patches a loss kernel reads, plus the mask."""
    read = mask.numel() if all_patches else int(torch.count_nonzero(mask))
    pixels = pred.shape[-1]
    return read * pixels * (imgs.element_size() + pred.element_size()) + nbytes(mask)


@fused_op("fastmae::masked_pixel_loss", kernels=[_masked_loss_fwd_kernel])
def _loss_bytes(imgs, pred, mask, frames, patch_size, norm_pix, all_patches, use_triton, outputs):
    _, _, weight, residual, mean, rstd, patch_mse = outputs
    stats = nbytes(mean) + nbytes(rstd) if norm_pix else 0
    per_patch = mask.numel() * 4  # the per-patch losses, summed by torch
    written = nbytes(weight) + nbytes(residual) + stats + per_patch + nbytes(patch_mse)
    return _read_patch_bytes(imgs, pred, mask, all_patches) + written


@fused_op("fastmae::masked_pixel_loss_backward", kernels=[_masked_loss_bwd_kernel])
def _loss_backward_bytes(*args, outputs):
    _, residual, weight, imgs, mean, rstd, *_ = args  # the backward op's args
    grad_imgs_out, grad_pred = outputs
    weighted_rows = int(torch.count_nonzero(weight))
    read = weighted_rows * residual.shape[1] * residual.element_size() + nbytes(weight)
    if imgs is not None:  # target pixels and statistics; grad_imgs: zero fill + writes
        read += weighted_rows * residual.shape[1] * imgs.element_size()
        read += nbytes(mean) + nbytes(rstd) + nbytes(grad_imgs_out)
    return read + nbytes(grad_pred) + nbytes(grad_imgs_out)


def _setup_loss(ctx, inputs, output):
    imgs, pred, mask, frames, ctx.patch_size, ctx.norm_pix, _, ctx.use_triton = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero gradients for the saved-state outputs
    ctx.imgs_shape, ctx.pred_shape, ctx.dtypes = (
        list(imgs.shape),
        pred.shape,
        (pred.dtype, mask.dtype),
    )
    # Nothing the caller holds: not the loss, pred or mask (they may be changed in place before
    # the backward), only the state the forward made; the images only for their own gradient.
    kept_imgs = imgs if ctx.needs_input_grad[0] else None
    ctx.save_for_backward(kept_imgs, frames, *output[1:])


def _backward_loss(ctx, grad_loss, *_grad_state):
    no_grads = (None,) * 8
    if grad_loss is None:  # only the non-differentiable state outputs were used
        return no_grads
    imgs, frames, loss_state, weight, residual, mean, rstd, patch_mse = ctx.saved_tensors
    pred_dtype, mask_dtype = ctx.dtypes
    needs = ctx.needs_input_grad
    grad_loss = grad_loss.to(weight.dtype)
    inverse_sum = _inverse_mask_sum(weight)
    grad_imgs, grad_pred = None, None
    if needs[0] or needs[1]:
        scale = (2.0 * grad_loss * inverse_sum / ctx.pred_shape[-1]).reshape(1)
        grad_imgs, grad_pred = masked_pixel_loss_backward_op(
            scale,
            residual,
            weight,
            imgs,
            mean,
            rstd,
            frames,
            ctx.imgs_shape,
            ctx.pred_shape[1],
            ctx.patch_size,
            ctx.norm_pix,
            pred_dtype,
            ctx.use_triton,
        )
    grad_mask = None
    if needs[2]:
        # loss = sum(mask * mse) / sum(mask): d loss / d mask = (mse - loss) / sum(mask).
        delta = patch_mse - loss_state
        grad_mask = (grad_loss * inverse_sum * delta).to(mask_dtype).view(ctx.pred_shape[:2])
    grad_imgs = grad_imgs if needs[0] else None
    grad_pred = grad_pred if needs[1] else None
    return grad_imgs, grad_pred, grad_mask, *no_grads[3:]


masked_pixel_loss_op.register_autograd(_backward_loss, setup_context=_setup_loss)
