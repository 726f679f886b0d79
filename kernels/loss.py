"""Masked (normalized-)pixel loss read straight from the images or videos, forward and backward.

    target = patch l of imgs[n], pixel order (u, i, j, c)        (no patchified copy)
    target = (target - mean) / sqrt(var + 1e-6)  with norm_pix   (var unbiased, divisor P-1)
    loss   = sum_{n,l} mask[n,l] * mean_P (pred - target)^2 / sum(mask)

An image is a video of one frame and its patches tubelets of one frame. For a video, frame u of
the tubelets at temporal index t is ``frames[t*U + u]`` (the frames the video MAE predicts,
read in place: no ``index_select`` copy), or ``t*U + u`` without a frame table.

Only patches with a nonzero mask are read; kept patches cost one mask load. Statistics and
accumulation are fp32 whatever the dtype of ``pred``, so fp16 predictions cannot overflow.
The per-patch losses land in an ``[N, L]`` buffer summed by torch: deterministic, no atomics,
and no host synchronisation (an all-kept mask gives 0 through ``where``, not a branch).
"""

from typing import Optional

import torch
from torch import Tensor

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
from .patchify import as_video, gather_patches, scatter_patches

EPS = 1e-6
MAX_PATCH_PIXELS = 1 << 16  # one patch is one block of a program


@triton.jit
def _load_target(
    imgs_ptr,
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
    """One patch's pixels in (u, i, j, c) order as fp32, their offsets in the video
    ``[N, C, F, H, W]`` and validity."""
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
    offsets = ((image * C + channel) * F + frame) * H * W + row * W + col
    target = tl.load(imgs_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    return target, offsets, valid


@triton.jit
def _pred_row(pred_ptr, patch_row, L, stride_n, stride_l, stride_p, BLOCK: tl.constexpr):
    """Pointers to the P values of patch ``patch_row`` (= n*L + l) of a strided pred: the
    model's pred is the slice ``x[:, 1:]`` of the decoder output, read without a copy."""
    image, patch = patch_row // L, patch_row % L
    return pred_ptr + image * stride_n + patch * stride_l + tl.arange(0, BLOCK) * stride_p


@triton.jit
def _masked_loss_fwd_kernel(
    patch_loss_ptr,  # [N*L] fp32 out: mask * mean squared error of each patch (0 where mask 0)
    patch_mse_ptr,  # [N*L] fp32 out: mean squared error of every patch (only if ALL_PATCHES)
    mean_ptr,  # [N*L] fp32 out: target mean (written where the patch is read and NORM_PIX)
    rstd_ptr,  # [N*L] fp32 out: 1 / sqrt(var + eps)
    pred_ptr,  # [N, L, P] with strides (stride_n, stride_l, stride_p)
    imgs_ptr,  # [N, C, F, H, W] (an image: F = 1)
    mask_ptr,  # [N, L]
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
    weight = tl.load(mask_ptr + patch_row).to(tl.float32)
    if (weight != 0) | ALL_PATCHES:
        target, _, valid = _load_target(
            imgs_ptr, frames_ptr, patch_row, L, C, F, H, W, grid_w, P, U, PH, PW, FRAME_TABLE, BLOCK
        )
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
        tl.store(patch_loss_ptr + patch_row, tl.where(weight != 0, weight * mse, 0.0))
    else:
        tl.store(patch_loss_ptr + patch_row, 0.0)


@triton.jit
def _masked_loss_bwd_kernel(
    grad_pred_ptr,  # [N, L, P] out, contiguous: zeros at kept patches
    grad_imgs_ptr,  # [N, C, H, W] out, zero-initialised (written only when GRAD_IMGS)
    scale_ptr,  # [1] fp32: 2 * grad_loss / (P * sum(mask)), 0 when sum(mask) is 0
    pred_ptr,  # [N, L, P] with strides (stride_n, stride_l, stride_p)
    imgs_ptr,  # [N, C, F, H, W] (an image: F = 1)
    mask_ptr,  # [N, L]
    mean_ptr,  # [N*L] fp32 from the forward
    rstd_ptr,  # [N*L] fp32 from the forward
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
    U: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    FRAME_TABLE: tl.constexpr,
    NORM_PIX: tl.constexpr,
    GRAD_IMGS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid ``(N*L,)``: d loss / d pred = scale * mask * (pred - target), and optionally the
    gradient through the target into the image pixels."""
    patch_row = tl.program_id(0).to(tl.int64)
    weight = tl.load(mask_ptr + patch_row).to(tl.float32)
    element = tl.arange(0, BLOCK)
    grad_row = grad_pred_ptr + patch_row * P + element
    if weight != 0:
        target, pixel_offsets, valid = _load_target(
            imgs_ptr, frames_ptr, patch_row, L, C, F, H, W, grid_w, P, U, PH, PW, FRAME_TABLE, BLOCK
        )
        if NORM_PIX:
            rstd = tl.load(rstd_ptr + patch_row)
            target = tl.where(valid, (target - tl.load(mean_ptr + patch_row)) * rstd, 0.0)
        pred_row = _pred_row(pred_ptr, patch_row, L, stride_n, stride_l, stride_p, BLOCK)
        pred = tl.load(pred_row, mask=valid, other=0.0).to(tl.float32)
        grad = tl.load(scale_ptr) * weight * tl.where(valid, pred - target, 0.0)
        tl.store(grad_row, grad.to(grad_pred_ptr.dtype.element_ty), mask=valid)
        if GRAD_IMGS:
            grad_target = -grad
            if NORM_PIX:
                # Backward of (x - mean) * rstd with the unbiased variance inside rstd.
                mean_grad = tl.sum(grad_target, axis=0) / P
                dot = tl.sum(grad_target * target, axis=0) / (P - 1)
                grad_target = rstd * (grad_target - mean_grad - target * dot)
            tl.store(
                grad_imgs_ptr + pixel_offsets,
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


# The arguments both loss kernels take by these names, filled by _patch_arguments.
_PATCH_ARGUMENTS = (
    "pred_ptr imgs_ptr mask_ptr frames_ptr L C F H W grid_w P stride_n stride_l stride_p".split()
)


def _patch_arguments(video, frames, pred, mask, patch_size, norm_pix) -> dict:
    """The keyword arguments both loss kernels take: pred, the video, mask, the frame table,
    their geometry (pred's strides included), the constexprs and the launch parameters."""
    _, c, num_frames, height, width = video.shape
    u, ph, pw = patch_size
    length, pixels = pred.shape[1], pred.shape[2]
    table = video if frames is None else frames  # any pointer without a table
    geometry = (length, c, num_frames, height, width, width // pw, pixels, *pred.stride())
    values = (pred, video, mask, table, *geometry)
    constants = dict(U=u, PH=ph, PW=pw, FRAME_TABLE=frames is not None, NORM_PIX=norm_pix)
    return dict(zip(_PATCH_ARGUMENTS, values), **constants, **launch_config(pixels))


def _loss_forward_triton(
    video, frames, pred, mask, patch_size, norm_pix, all_patches, mean, rstd, mse
):
    """Fills mean, rstd (with norm_pix) and mse (with all_patches) ``[N*L]``; returns the sum
    over patches of mask * MSE and an empty residual (the kernels need none)."""
    patch_loss = torch.empty(mask.numel(), dtype=torch.float32, device=pred.device)
    if patch_loss.numel():
        launch(
            _masked_loss_fwd_kernel,
            (patch_loss.numel(),),
            patch_loss,
            mse,
            mean,
            rstd,
            eps=EPS,
            ALL_PATCHES=all_patches,
            **_patch_arguments(video, frames, pred, mask, patch_size, norm_pix),
        )
    return patch_loss.sum(), pred.new_empty(0, 0, dtype=torch.float32)


def _loss_backward_triton(
    scale, video, frames, pred, mask, mean, rstd, residual, patch_size, norm_pix, grad_imgs
):
    """-> (grad of the video, or an empty tensor when not needed; grad_pred contiguous)."""
    grad_pred = pred.new_empty(pred.shape)
    grad_imgs_out = torch.zeros_like(video) if grad_imgs else video.new_empty(0)
    if pred.numel():
        launch(
            _masked_loss_bwd_kernel,
            (mask.numel(),),
            grad_pred,
            grad_imgs_out if grad_imgs else video,  # any pointer when GRAD_IMGS is off
            scale,
            mean_ptr=mean,
            rstd_ptr=rstd,
            GRAD_IMGS=grad_imgs,
            **_patch_arguments(video, frames, pred, mask, patch_size, norm_pix),
        )
    return grad_imgs_out, grad_pred


def _inverse_mask_sum(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / sum(mask), or 0 when the sum is exactly 0, so that such a mask gives loss 0 (the
    official code gives NaN) and no gradient. Negative sums divide as the official code does."""
    total = mask.sum(dtype=dtype)
    return torch.where(total != 0, 1.0 / torch.where(total != 0, total, 1.0), 0.0)


def _target_frames(video, frames):
    """The frames the targets come from: the video's, or those the frame table names."""
    return video if frames is None else video.index_select(2, frames)


def _read_rows(video, frames, pred, mask, patch_size, all_patches):
    """The patch rows the loss reads (flat indices over N*L: weight nonzero, or all), and their
    weights and targets in the accumulation dtype. The torch path selects rows with
    ``nonzero``, which costs nothing on the CPU."""
    dtype = accumulation_dtype(video, pred, mask)
    flat_mask = mask.reshape(-1)
    if all_patches:
        rows = torch.arange(flat_mask.numel(), device=mask.device)
    else:
        rows = torch.nonzero(flat_mask).squeeze(1)
    source = _target_frames(video, frames)
    patches = gather_patches(source, None, patch_size, True, False).reshape(-1, pred.shape[-1])
    target = patches.index_select(0, rows).to(dtype)
    return rows, flat_mask.index_select(0, rows).to(dtype), target


def _loss_forward_torch(
    video, frames, pred, mask, patch_size, norm_pix, all_patches, mean, rstd, mse_out
):
    """The torch path on the rows read only; returns the loss sum and the weighted residual
    ``mask * (pred - target)`` as ``[N*L, P]``, so that its backward is one multiply."""
    pixels = pred.shape[-1]
    rows, weight, target = _read_rows(video, frames, pred, mask, patch_size, all_patches)
    if norm_pix and rows.numel():
        target_mean = target.mean(-1, keepdim=True)
        target = target - target_mean
        # Two passes over the centred rows: torch.var is several times slower on the CPU.
        var = torch.linalg.vector_norm(target, dim=-1, keepdim=True).square() / (pixels - 1)
        target_rstd = torch.rsqrt(var + EPS)
        target = target * target_rstd
        mean.index_copy_(0, rows, target_mean[:, 0])
        rstd.index_copy_(0, rows, target_rstd[:, 0])
    # The strided pred's rows gathered (no full copy), then in place: every pass counts.
    length = pred.shape[1]
    diff = pred[rows // length, rows % length].to(target.dtype).sub_(target)
    mse = torch.linalg.vector_norm(diff, dim=-1).square() / pixels
    is_weighted = weight != 0
    total = torch.where(is_weighted, mse * weight, 0.0).sum()
    if all_patches:
        mse_out.copy_(mse)
        diff = torch.where(is_weighted[:, None], diff, 0.0)  # keep kept rows' gradient 0
    residual = pred.new_empty(pred.shape[0] * pred.shape[1], pixels, dtype=diff.dtype)
    if not all_patches:  # zero only the rows not read: every pass counts on the CPU
        residual.index_fill_(0, torch.nonzero(mask.reshape(-1) == 0).squeeze(1), 0.0)
    residual.index_copy_(0, rows, diff.mul_(weight[:, None]))
    return total, residual


def _loss_backward_torch(
    scale, video, frames, pred, mask, mean, rstd, residual, patch_size, norm_pix, grad_imgs
):
    """The backward from the forward's weighted residual: grad_pred is one multiply, and
    grad_imgs (if needed) goes back through the (normalised) target."""
    pixels = pred.shape[-1]
    grad_pred = (residual * scale).to(pred.dtype).view(pred.shape)
    if not grad_imgs:
        return video.new_empty(0), grad_pred
    rows, _, target = _read_rows(video, frames, pred, mask, patch_size, False)
    grad_target = -(residual.index_select(0, rows) * scale)
    if norm_pix:  # backward of (x - mean) * rstd, the unbiased variance inside rstd
        patch_rstd = rstd.index_select(0, rows)[:, None]
        target = (target - mean.index_select(0, rows)[:, None]) * patch_rstd
        grad_target = patch_rstd * (
            grad_target
            - grad_target.mean(-1, keepdim=True)
            - target * (grad_target * target).sum(-1, keepdim=True) / (pixels - 1)
        )
    grad_patches = torch.zeros(pred.shape, dtype=video.dtype, device=video.device)
    grad_patches.view(-1, pixels).index_copy_(0, rows, grad_target.to(video.dtype))
    source_shape = list(_target_frames(video, frames).shape)
    grad_source = scatter_patches(grad_patches, None, patch_size, source_shape, True, False)
    if frames is None:
        return grad_source, grad_pred
    return torch.zeros_like(video).index_copy_(2, frames, grad_source), grad_pred


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss 0-dim in the promotion of the three dtypes, as the official code gives; then,
    kept for the backward in the accumulation dtype: target mean and rstd ``[N*L]``, the torch
    path's weighted residual ``[N*L, P]`` (``[0, 0]`` on the Triton path), and each patch's MSE
    ``[N*L]`` with ``all_patches`` (``[0]`` without), which the mask's gradient needs).

    imgs ``[N, C, H, W]`` with patch_size ``(ph, pw)``, or a video ``[N, C, F, H, W]`` with
    ``(u, ph, pw)`` and optionally ``frames``, the int64 frame of each tubelet frame."""
    video, patch_size = as_video(imgs.contiguous(), patch_size)
    mask = mask.contiguous()
    dtype = accumulation_dtype(imgs, pred, mask)
    mean = torch.zeros(mask.numel(), dtype=dtype, device=pred.device)
    rstd = torch.zeros_like(mean)
    patch_mse = pred.new_empty(mask.numel() if all_patches else 0, dtype=dtype)
    path = _loss_forward_triton if use_triton else _loss_forward_torch
    total, residual = path(
        video, frames, pred, mask, patch_size, norm_pix, all_patches, mean, rstd, patch_mse
    )
    loss = (total * _inverse_mask_sum(mask, dtype)).to(promoted_dtype(pred, imgs, mask))
    return loss, mean, rstd, residual, patch_mse


@masked_pixel_loss_op.register_fake
def _(imgs, pred, mask, frames, patch_size, norm_pix, all_patches, use_triton):
    rows = pred.shape[0] * pred.shape[1]
    dtype = accumulation_dtype(imgs, pred, mask)
    stats = pred.new_empty(rows, dtype=dtype)
    residual_rows = 0 if use_triton else rows
    residual = pred.new_empty(
        residual_rows,
        pred.shape[2] if residual_rows else 0,
        dtype=torch.float32 if use_triton else dtype,
    )
    patch_mse = pred.new_empty(rows if all_patches else 0, dtype=dtype)
    loss = pred.new_empty((), dtype=promoted_dtype(pred, imgs, mask))
    return loss, stats, torch.empty_like(stats), residual, patch_mse


@torch.library.custom_op("fastmae::masked_pixel_loss_backward", mutates_args=())
def masked_pixel_loss_backward_op(
    scale: Tensor,
    imgs: Tensor,
    pred: Tensor,
    mask: Tensor,
    mean: Tensor,
    rstd: Tensor,
    residual: Tensor,
    frames: Optional[Tensor],
    patch_size: IntList,
    norm_pix: bool,
    grad_imgs_needed: bool,
    use_triton: bool,
) -> tuple[Tensor, Tensor]:
    """scale ``[1]`` = 2 * grad_loss / (P * sum(mask)) -> (grad_imgs, or an empty tensor when
    not needed; grad_pred contiguous). ``residual`` is the torch path's forward residual."""
    path = _loss_backward_triton if use_triton else _loss_backward_torch
    video, patch_size = as_video(imgs.contiguous(), patch_size)
    args = (video, frames, pred, mask.contiguous(), mean, rstd, residual, patch_size, norm_pix)
    grad_video, grad_pred = path(scale, *args, grad_imgs_needed)
    return (grad_video.view(imgs.shape) if grad_imgs_needed else grad_video), grad_pred


@masked_pixel_loss_backward_op.register_fake
def _(scale, imgs, pred, mask, mean, rstd, residual, frames, patch_size, norm_pix, grad_imgs, *_):
    grad_imgs = torch.empty_like(imgs) if grad_imgs else imgs.new_empty(0)
    return grad_imgs, pred.new_empty(pred.shape)


def _read_patch_bytes(imgs, pred, mask, all_patches) -> int:
    """Pixels and predictions of the patches a loss kernel reads, plus the mask."""
    read = mask.numel() if all_patches else int(torch.count_nonzero(mask))
    pixels = pred.shape[-1]
    return read * pixels * (imgs.element_size() + pred.element_size()) + nbytes(mask)


@fused_op("fastmae::masked_pixel_loss", kernels=[_masked_loss_fwd_kernel])
def _loss_bytes(imgs, pred, mask, frames, patch_size, norm_pix, all_patches, use_triton, outputs):
    _, mean, rstd, _, patch_mse = outputs
    stats = nbytes(mean) + nbytes(rstd) if norm_pix else 0
    per_patch = mask.numel() * 4  # the per-patch losses, summed by torch
    return _read_patch_bytes(imgs, pred, mask, all_patches) + stats + per_patch + nbytes(patch_mse)


@fused_op("fastmae::masked_pixel_loss_backward", kernels=[_masked_loss_bwd_kernel])
def _loss_backward_bytes(*args, outputs):
    _, imgs, pred, mask, mean, rstd, _, _, _, norm_pix = args[:10]  # the backward op's args
    grad_imgs_out, grad_pred = outputs
    stats = nbytes(mean) + nbytes(rstd) if norm_pix else 0
    written = nbytes(grad_pred) + 2 * nbytes(grad_imgs_out)  # grad_imgs: zero fill + writes
    return _read_patch_bytes(imgs, pred, mask, False) + stats + written


def _setup_loss(ctx, inputs, output):
    imgs, pred, mask, frames, ctx.patch_size, ctx.norm_pix, _, ctx.use_triton = inputs
    loss, mean, rstd, residual, patch_mse = output
    ctx.mark_non_differentiable(mean, rstd, residual, patch_mse)
    ctx.set_materialize_grads(False)  # no zero gradients for the saved-state outputs
    ctx.save_for_backward(imgs, pred, mask, frames, mean, rstd, residual, patch_mse, loss)


def _backward_loss(ctx, grad_loss, _grad_mean, _grad_rstd, _grad_residual, _grad_mse):
    no_grads = (None,) * 8
    if grad_loss is None:  # only the non-differentiable saved-state outputs were used
        return no_grads
    imgs, pred, mask, frames, mean, rstd, residual, patch_mse, loss = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dtype = mean.dtype
    inverse_sum = _inverse_mask_sum(mask, dtype)
    scale = (2.0 * grad_loss.to(dtype) * inverse_sum / pred.shape[-1]).reshape(1)
    saved = (mean, rstd, residual, frames, ctx.patch_size, ctx.norm_pix)
    grad_imgs, grad_pred = masked_pixel_loss_backward_op(
        scale, imgs, pred, mask, *saved, needs[0], ctx.use_triton
    )
    grad_mask = None
    if needs[2]:
        # loss = sum(mask * mse) / sum(mask): d loss / d mask = (mse - loss) / sum(mask).
        delta = patch_mse.view(mask.shape) - loss.to(dtype)
        grad_mask = (grad_loss.to(dtype) * inverse_sum * delta).to(mask.dtype)
    return (grad_imgs if needs[0] else None), grad_pred, grad_mask, *no_grads[3:]


masked_pixel_loss_op.register_autograd(_backward_loss, setup_context=_setup_loss)
