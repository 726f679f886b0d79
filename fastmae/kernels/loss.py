"""Masked pixel loss read straight from the images or videos, forward and backward.

    target = patch of imgs[n], pixel order (u, i, j, c)          (no patchified copy)
    target = target * std[c] + mean[c]      with ``unnormalise`` (VideoMAE's labels)
    norm "patch":   target = (target - mean) / sqrt(var + 1e-6)   over the patch's P values (MAE)
    norm "channel": target = (target - mean_c) / (std_c + 1e-6)   per channel over its P/C
                                                                  values (HF VideoMAE)
    loss   = sum_{n,r} mask[n,r] * mean_P (pred[n,r] - target)^2 / sum(mask)

Variances are unbiased. Row r of ``pred [N, R, P]`` predicts patch r (R = L), or patch
``pred_ids[n, r]`` with ``pred_ids`` (HF VideoMAE's logits cover the masked tubelets only, in
their order). An image is a video of one frame and its patches tubelets of one frame. For a
video, frame u of the tubelets at temporal index t is ``frames[t*U + u]`` (the frames the video
MAE predicts, read in place: no ``index_select`` copy; a frame may be named twice), or
``t*U + u`` without a frame table. Videos are read with their strides: HF's clips
``[N, F, C, H, W]`` are read as the permuted view ``[N, C, F, H, W]``, without a copy.

Only rows with a nonzero mask are read; the others cost one mask load. Statistics and
accumulation are fp32 whatever the dtype of ``pred``, so fp16 predictions cannot overflow.
The per-row losses land in an ``[N*R]`` buffer summed by torch: deterministic, no atomics,
and no host synchronisation (an all-zero mask gives 0 through ``where``, not a branch).

The backward needs neither ``pred`` nor ``mask`` nor the loss, all of which the caller holds and
may change in place (the official training loop divides the loss in place): the forward keeps
the weighted residual ``mask * (pred - target)`` and a copy of the mask's weights instead, as
the official loss keeps ``pred - target``. The images are kept only when they need a gradient,
which the MAE targets (no ``pred_ids``, norm "none" or "patch", no ``unnormalise``) give; HF
builds VideoMAE's labels under ``no_grad``, and the op refuses a gradient through them.
"""

from typing import NamedTuple, Optional

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
from .patchify import as_video, gather_patches, patch_view, scatter_patches, video_geometry

MAX_PATCH_PIXELS = 1 << 16  # one patch is one block of a program
# The target normalisations, by name; the kernels take the index as the NORM constexpr.
NORMS = ("none", "patch", "channel")


@triton.jit
def _target_offsets(
    frames_ptr,
    image,
    patch,
    C,
    H,
    grid_w,
    P,
    stride_n,
    stride_c,
    stride_f,
    stride_h,
    stride_w,
    U: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    FRAME_TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Offsets of patch ``patch`` of sample ``image``'s pixels, in (u, i, j, c) order, in the
    strided video ``[N, C, F, H, W]`` (frame ``frames[t*U + u]`` with FRAME_TABLE, else
    ``t*U + u``), their channels, and their validity."""
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
    offsets = image * stride_n + channel * stride_c + frame * stride_f
    return offsets + row * stride_h + col * stride_w, channel, valid


@triton.jit
def _row_patch(ids_ptr, pred_row, R, PRED_IDS: tl.constexpr):
    """(sample, patch) that row ``pred_row`` (= n*R + r) of pred predicts: ``pred_ids[n, r]``
    with PRED_IDS, else r."""
    image = pred_row // R
    if PRED_IDS:
        return image, tl.load(ids_ptr + pred_row).to(tl.int64)
    return image, pred_row % R


@triton.jit
def _normalise_per_channel(target, channel, valid, stats_row, mean_ptr, rstd_ptr, C, P, eps):
    """HF VideoMAE's normalisation of one patch's target: each channel over its ``P / C``
    values, ``(x - mean) / (std + eps)`` with the unbiased std; stores each channel's mean and
    ``1 / (std + eps)`` at ``stats_row * C + c``."""
    count = P // C
    mean_each = tl.zeros_like(target)
    rstd_each = tl.zeros_like(target)
    for c in range(0, C):
        in_channel = valid & (channel == c)
        mean = tl.sum(tl.where(in_channel, target, 0.0), axis=0) / count
        centered = tl.where(in_channel, target - mean, 0.0)
        rstd = 1.0 / (tl.sqrt(tl.sum(centered * centered, axis=0) / (count - 1)) + eps)
        tl.store(mean_ptr + stats_row * C + c, mean)
        tl.store(rstd_ptr + stats_row * C + c, rstd)
        mean_each = tl.where(in_channel, mean, mean_each)
        rstd_each = tl.where(in_channel, rstd, rstd_each)
    return tl.where(valid, (target - mean_each) * rstd_each, 0.0)


@triton.jit
def _pred_row(pred_ptr, patch_row, L, stride_n, stride_l, stride_p, BLOCK: tl.constexpr):
    """Pointers to the P values of patch ``patch_row`` (= n*L + l) of a strided pred: the
    model's pred is the slice ``x[:, 1:]`` of the decoder output, read without a copy."""
    image, patch = patch_row // L, patch_row % L
    return pred_ptr + image * stride_n + patch * stride_l + tl.arange(0, BLOCK) * stride_p


@triton.jit
def _masked_loss_fwd_kernel(
    patch_loss_ptr,  # [N*R] fp32 out: mask * mean squared error of each row (0 where mask 0)
    residual_ptr,  # [N*R, P] fp32 out: mask * (pred - target), 0 where mask 0
    patch_mse_ptr,  # [N*R] fp32 out: mean squared error of every row (only if ALL_PATCHES)
    mean_ptr,  # [N*R*G] fp32 out: target mean (where the row is read and NORM; G = C for
    rstd_ptr,  # [N*R*G] fp32 out: its reciprocal scale          "channel", else 1)
    pred_ptr,  # [N, R, P] with strides (stride_n, stride_l, stride_p)
    imgs_ptr,  # [N, C, F, H, W] strided (an image: F = 1)
    mask_ptr,  # [N*R] fp32 mask weights
    ids_ptr,  # [N*R] int64 patch of each pred row (read with PRED_IDS)
    frames_ptr,  # [L / (h*w) * U] int64 frame of each tubelet frame (read with FRAME_TABLE)
    unnormalise_ptr,  # [2, C] fp32 (std, mean) (read with UNNORMALISE)
    R,
    C,
    H,
    grid_w,
    P,
    stride_n,
    stride_l,
    stride_p,
    video_stride_n,
    video_stride_c,
    video_stride_f,
    video_stride_h,
    video_stride_w,
    eps,
    U: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    FRAME_TABLE: tl.constexpr,
    PRED_IDS: tl.constexpr,
    UNNORMALISE: tl.constexpr,
    NORM: tl.constexpr,
    ALL_PATCHES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid ``(N*R,)``: one pred row per program, all P pixels in one block. Reads the rows whose
    weight is nonzero, or every row with ALL_PATCHES (the mask's gradient needs each MSE)."""
    pred_row = tl.program_id(0).to(tl.int64)
    weight = tl.load(mask_ptr + pred_row)
    element = tl.arange(0, BLOCK)
    residual_row = residual_ptr + pred_row * P + element
    if (weight != 0) | ALL_PATCHES:
        image, patch = _row_patch(ids_ptr, pred_row, R, PRED_IDS)
        offsets, channel, valid = _target_offsets(
            frames_ptr,
            image,
            patch,
            C,
            H,
            grid_w,
            P,
            video_stride_n,
            video_stride_c,
            video_stride_f,
            video_stride_h,
            video_stride_w,
            U,
            PH,
            PW,
            FRAME_TABLE,
            BLOCK,
        )
        target = tl.load(imgs_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        if UNNORMALISE:
            std = tl.load(unnormalise_ptr + channel, mask=valid, other=0.0)
            target = target * std + tl.load(unnormalise_ptr + C + channel, mask=valid, other=0.0)
        if NORM == 1:
            mean = tl.sum(target, axis=0) / P
            centered = tl.where(valid, target - mean, 0.0)
            var = tl.sum(centered * centered, axis=0) / (P - 1)
            rstd = 1.0 / tl.sqrt(var + eps)
            target = centered * rstd
            tl.store(mean_ptr + pred_row, mean)
            tl.store(rstd_ptr + pred_row, rstd)
        elif NORM == 2:
            target = _normalise_per_channel(
                target, channel, valid, pred_row, mean_ptr, rstd_ptr, C, P, eps
            )
        pred = tl.load(
            _pred_row(pred_ptr, pred_row, R, stride_n, stride_l, stride_p, BLOCK),
            mask=valid,
            other=0.0,
        )
        diff = tl.where(valid, pred.to(tl.float32) - target, 0.0)
        mse = tl.sum(diff * diff, axis=0) / P
        if ALL_PATCHES:
            tl.store(patch_mse_ptr + pred_row, mse)
        # A row of weight 0 adds 0 even when its MSE is not finite: it is not part of the loss.
        is_weighted = weight != 0
        tl.store(patch_loss_ptr + pred_row, tl.where(is_weighted, weight * mse, 0.0))
        tl.store(residual_row, tl.where(is_weighted, weight * diff, 0.0), mask=valid)
    else:
        tl.store(patch_loss_ptr + pred_row, 0.0)
        tl.store(residual_row, tl.zeros([BLOCK], dtype=tl.float32), mask=element < P)


@triton.jit
def _masked_loss_bwd_kernel(
    grad_pred_ptr,  # [N, R, P] out, contiguous: zeros at rows of weight 0
    grad_imgs_ptr,  # [N, C, F', H, W] out, contiguous, zero-initialised (only when GRAD_IMGS)
    scale_ptr,  # [1] fp32: 2 * grad_loss / (P * sum(mask)), 0 when sum(mask) is 0
    residual_ptr,  # [N*R, P] fp32 from the forward: mask * (pred - target)
    mask_ptr,  # [N*R] fp32 mask weights from the forward
    imgs_ptr,  # [N, C, F, H, W] strided (read only when GRAD_IMGS)
    mean_ptr,  # [N*R] fp32 from the forward
    rstd_ptr,  # [N*R] fp32 from the forward
    frames_ptr,  # [F'] int64 frame of each tubelet frame (read with FRAME_TABLE)
    R,
    C,
    H,
    W,
    grid_w,
    P,
    video_stride_n,
    video_stride_c,
    video_stride_f,
    video_stride_h,
    video_stride_w,
    U: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    FRAME_TABLE: tl.constexpr,
    NORM: tl.constexpr,
    GRAD_IMGS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid ``(N*R,)``: d loss / d pred = scale * residual, and optionally (the MAE targets:
    row r predicts patch r, NORM 0 or 1) the gradient through the target into the pixels of
    the target frames ``[N, C, F', H, W]`` (F' = F without a frame table; each pixel there
    belongs to one patch, so every store is its own)."""
    pred_row = tl.program_id(0).to(tl.int64)
    weight = tl.load(mask_ptr + pred_row)
    element = tl.arange(0, BLOCK)
    grad_row = grad_pred_ptr + pred_row * P + element
    if weight != 0:
        valid = element < P
        residual = tl.load(residual_ptr + pred_row * P + element, mask=valid, other=0.0)
        grad = tl.load(scale_ptr) * residual
        tl.store(grad_row, grad.to(grad_pred_ptr.dtype.element_ty), mask=valid)
        if GRAD_IMGS:
            image, patch = pred_row // R, pred_row % R
            grad_target = -grad
            if NORM == 1:
                # Backward of (x - mean) * rstd with the unbiased variance inside rstd.
                offsets, _, _ = _target_offsets(
                    frames_ptr,
                    image,
                    patch,
                    C,
                    H,
                    grid_w,
                    P,
                    video_stride_n,
                    video_stride_c,
                    video_stride_f,
                    video_stride_h,
                    video_stride_w,
                    U,
                    PH,
                    PW,
                    FRAME_TABLE,
                    BLOCK,
                )
                pixels = tl.load(imgs_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_ptr + pred_row)
                target = tl.where(valid, (pixels - tl.load(mean_ptr + pred_row)) * rstd, 0.0)
                mean_grad = tl.sum(grad_target, axis=0) / P
                dot = tl.sum(grad_target * target, axis=0) / (P - 1)
                grad_target = rstd * (grad_target - mean_grad - target * dot)
            selected_frames = R // ((H // PH) * grid_w) * U
            frame_size = H * W
            grad_offsets, _, _ = _target_offsets(
                frames_ptr,
                image,
                patch,
                C,
                H,
                grid_w,
                P,
                C * selected_frames * frame_size,
                selected_frames * frame_size,
                frame_size,
                W,
                1,
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


class Targets(NamedTuple):
    """What the loss compares pred with (see the module docstring): the video ``[N, C, F, H,
    W]`` (strided; an image is one frame), the tubelet ``(u, ph, pw)``, the frame table, the
    patch of each pred row (None: row r is patch r), the ``[2, C]`` (std, mean) that
    un-normalises the pixels, and the normalisation's name in :data:`NORMS`."""

    video: Tensor
    patch_size: tuple
    frames: Optional[Tensor]
    pred_ids: Optional[Tensor]
    unnormalise: Optional[Tensor]
    norm: str

    @property
    def mae_style(self) -> bool:
        """Row r predicts patch r, the pixels as they are, no per-channel statistics: the
        targets whose gradient into the pixels the backward computes."""
        return self.pred_ids is None and self.unnormalise is None and self.norm != "channel"

    def stats_per_row(self) -> int:
        """Statistics kept per row: one per channel for "channel", else one."""
        return self.video.shape[1] if self.norm == "channel" else 1


def _geometry(video_shape, video_strides, patch_size, frames, rows, pixels) -> dict:
    """The keyword arguments both loss kernels take after their tensors: the video's and the
    patches' geometry, the constexprs and the launch parameters."""
    _, c, _, height, width = video_shape
    u, ph, pw = patch_size
    strides = ("video_stride_n", "video_stride_c", "video_stride_f", "video_stride_h")
    sizes = dict(R=rows, C=c, H=height, grid_w=width // pw, P=pixels)
    sizes.update(zip((*strides, "video_stride_w"), video_strides))
    constants = dict(U=u, PH=ph, PW=pw, FRAME_TABLE=frames is not None)
    return dict(**sizes, **constants, **launch_config(pixels))


def _loss_forward_triton(targets, pred, weight, all_patches, state):
    """Fills the state (residual; mean and rstd with a norm; mse with all_patches); returns
    the sum over rows of mask * MSE."""
    residual, mean, rstd, patch_mse = state
    video = targets.video
    patch_loss = torch.empty(weight.numel(), dtype=torch.float32, device=pred.device)
    if patch_loss.numel():
        rows, pixels = pred.shape[1], pred.shape[2]
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
            # Any pointer for a table that is absent:
            *(video if t is None else t for t in (targets.pred_ids, targets.frames)),
            video if targets.unnormalise is None else targets.unnormalise,
            stride_n=pred.stride(0),
            stride_l=pred.stride(1),
            stride_p=pred.stride(2),
            eps=NORM_PIX_EPS,
            PRED_IDS=targets.pred_ids is not None,
            UNNORMALISE=targets.unnormalise is not None,
            NORM=NORMS.index(targets.norm),
            ALL_PATCHES=all_patches,
            **_geometry(
                video.shape, video.stride(), targets.patch_size, targets.frames, rows, pixels
            ),
        )
    return patch_loss.sum()


def _read_rows(targets, weight, rows_per_sample, pixels, all_patches):
    """The pred rows the loss reads (flat indices over N*R: weight nonzero, or all), and their
    targets in the weights' dtype, un-normalised where asked, before any normalisation. The
    torch path selects rows with ``nonzero``, which costs nothing on the CPU; it patchifies the
    whole video in one sequential copy and then picks rows, which on the CPU beats indexing
    the strided video row by row (measured on a 16 x 224 px clip's 1411 rows: 4.1 against
    12.8 ms)."""
    if all_patches:
        rows = torch.arange(weight.numel(), device=weight.device)
    else:
        rows = torch.nonzero(weight).squeeze(1)
    video = targets.video
    if targets.frames is not None:
        video = video.index_select(2, targets.frames)
    patches = gather_patches(video, None, targets.patch_size, True, False)
    if targets.pred_ids is None:
        patch = rows % rows_per_sample
    else:
        patch = targets.pred_ids.reshape(-1).index_select(0, rows)
    patch_rows = (rows // rows_per_sample) * patches.shape[1] + patch
    target = patches.view(-1, pixels).index_select(0, patch_rows).to(weight.dtype)
    if targets.unnormalise is not None:
        std, mean = targets.unnormalise.to(weight.dtype)
        channels = video.shape[1]
        target = target.view(len(rows), pixels // channels, channels) * std + mean
        target = target.view(-1, pixels)
    return rows, target


def _normalise_rows(target, pixels):
    """ "patch": -> (target rows normalised by their mean and unbiased variance + eps, mean,
    rstd ``[rows, 1]``)."""
    target_mean = target.mean(-1, keepdim=True)
    target = target - target_mean
    # Two passes over the centred rows: torch.var is several times slower on the CPU.
    var = torch.linalg.vector_norm(target, dim=-1, keepdim=True).square() / (pixels - 1)
    target_rstd = torch.rsqrt(var + NORM_PIX_EPS)
    return target * target_rstd, target_mean, target_rstd


def _normalise_channels(target, channels):
    """ "channel": -> (target rows normalised per channel, ``(x - mean) / (std + eps)`` with the
    unbiased std, mean, and ``1 / (std + eps)`` ``[rows, C]``)."""
    rows, pixels = target.shape
    by_channel = target.view(rows, pixels // channels, channels)
    target_mean = by_channel.mean(1, keepdim=True)
    centered = by_channel - target_mean
    std = (centered.square().sum(1, keepdim=True) / (pixels // channels - 1)).sqrt()
    target_rstd = 1.0 / (std + NORM_PIX_EPS)
    return (centered * target_rstd).view(rows, pixels), target_mean[:, 0], target_rstd[:, 0]


def _loss_forward_torch(targets, pred, weight, all_patches, state):
    """The torch path on the rows read only; fills the same state as the kernel."""
    residual = state[0]
    in_place = torch.promote_types(pred.dtype, targets.video.dtype) == residual.dtype
    if targets.norm == "none" and targets.pred_ids is None and in_place:
        return _loss_forward_every_row(targets, pred, weight, all_patches, state)
    residual, mean, rstd, patch_mse = state
    rows_per_sample, pixels = pred.shape[1], pred.shape[2]
    rows, target = _read_rows(targets, weight, rows_per_sample, pixels, all_patches)
    if targets.norm != "none" and rows.numel():
        if targets.norm == "patch":
            target, target_mean, target_rstd = _normalise_rows(target, pixels)
        else:
            target, target_mean, target_rstd = _normalise_channels(target, mean.shape[1])
        mean.index_copy_(0, rows, target_mean)
        rstd.index_copy_(0, rows, target_rstd)
    # The strided pred's rows gathered (no full copy), then in place: every pass counts.
    diff = pred[rows // rows_per_sample, rows % rows_per_sample].to(target.dtype).sub_(target)
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


def _loss_forward_every_row(targets, pred, weight, all_patches, state):
    """The torch path without normalisation, rows in patch order: every row at once, in
    whole-tensor passes that read the (strided) images in place, where gathering the weighted
    rows (most of them, at MAE's ratios) would cost more passes than the rows it skips; a
    weight-0 row, NaN included, is still kept out of the loss and the residual."""
    residual, _, _, patch_mse = state
    video = targets.video
    if targets.frames is not None:
        video = video.index_select(2, targets.frames)
    patches = patch_view(video, targets.patch_size)  # [N, t, h, w, u, ph, pw, C], a view
    diff = residual.view(patches.shape)
    torch.sub(pred.view(patches.shape), patches, out=diff)
    mse = torch.linalg.vector_norm(residual, dim=-1).square_().div_(residual.shape[1])
    if all_patches:
        patch_mse.copy_(mse)
    is_weighted = weight != 0
    residual.mul_(weight[:, None]).masked_fill_(is_weighted.logical_not()[:, None], 0.0)
    return torch.where(is_weighted, mse * weight, 0.0).sum()


def _selected_shape(video_shape, length, patch_size):
    """The shape ``[N, C, F', H, W]`` of the target frames: F' = t * u for t tubelets in time."""
    n, c, _, height, width = video_shape
    u, ph, pw = patch_size
    return [n, c, length // ((height // ph) * (width // pw)) * u, height, width]


def _loss_backward_triton(scale, residual, weight, targets, mean, rstd, grad_pred, geometry):
    """Fills grad_pred ``[N, R, P]``; returns the gradient of the target frames
    ``[N, C, F', H, W]`` when ``targets`` (MAE-style) is given, else None."""
    video_shape, patch_size, rows = geometry
    video = None if targets is None else targets.video
    frames = None if targets is None else targets.frames
    grad_source = None
    if video is not None:
        grad_source = video.new_zeros(_selected_shape(video_shape, rows, patch_size))
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
            W=video_shape[-1],
            NORM=NORMS.index("none" if targets is None else targets.norm),
            GRAD_IMGS=video is not None,
            **_geometry(
                video_shape,
                [0] * 5 if video is None else video.stride(),
                patch_size,
                frames,
                rows,
                pixels,
            ),
        )
    return grad_source


def _loss_backward_torch(scale, residual, weight, targets, mean, rstd, grad_pred, geometry):
    """The torch path of :func:`_loss_backward_triton`: grad_pred is one multiply, and the
    target frames' gradient goes back through the (normalised) target."""
    video_shape, _, rows_per_sample = geometry
    grad_pred.view(-1, residual.shape[1]).copy_(residual * scale)
    if targets is None:
        return None
    pixels = residual.shape[1]
    rows, target = _read_rows(targets, weight, rows_per_sample, pixels, False)
    grad_target = -(residual.index_select(0, rows) * scale)
    if targets.norm == "patch":  # backward of (x - mean) * rstd, the unbiased variance inside
        patch_rstd = rstd.index_select(0, rows)
        target = (target - mean.index_select(0, rows)) * patch_rstd
        grad_target = patch_rstd * (
            grad_target
            - grad_target.mean(-1, keepdim=True)
            - target * (grad_target * target).sum(-1, keepdim=True) / (pixels - 1)
        )
    selected_shape = _selected_shape(video_shape, rows_per_sample, targets.patch_size)
    grad_patches = targets.video.new_zeros(selected_shape[0], rows_per_sample, pixels)
    grad_patches.view(-1, pixels).index_copy_(0, rows, grad_target.to(targets.video.dtype))
    return scatter_patches(grad_patches, None, targets.patch_size, selected_shape, True, False)


def _inverse_mask_sum(weight: torch.Tensor) -> torch.Tensor:
    """1 / sum(mask), or 0 when the sum is exactly 0, so that such a mask gives loss 0 (the
    official code gives NaN) and no gradient. Negative sums divide as the official code does."""
    total = weight.sum()
    return torch.where(total != 0, 1.0 / torch.where(total != 0, total, 1.0), 0.0)


def _state_like(pred, mask, dtype, stats_per_row, all_patches):
    """The saved state's tensors: residual ``[N*R, P]`` (empty), mean and rstd ``[N*R, G]``
    (zeros: 0 where a row is not read), and each row's MSE (empty; ``[N*R]`` with
    all_patches, else ``[0]``)."""
    rows, pixels = mask.numel(), pred.shape[-1]
    return (
        pred.new_empty(rows, pixels, dtype=dtype),
        pred.new_zeros(rows, stats_per_row, dtype=dtype),
        pred.new_zeros(rows, stats_per_row, dtype=dtype),
        pred.new_empty(rows if all_patches else 0, dtype=dtype),
    )


def _targets(imgs, patch_size, frames, pred_ids, unnormalise, norm) -> Targets:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    video, patch_size = as_video(imgs, patch_size)
    # The kernels index the tables as contiguous, and read the un-normalisation as fp32.
    pred_ids = None if pred_ids is None else pred_ids.contiguous()
    unnormalise = None if unnormalise is None else unnormalise.float().contiguous()
    return Targets(video, patch_size, frames, pred_ids, unnormalise, norm)


@torch.library.custom_op("fastmae::masked_pixel_loss", mutates_args=())
def masked_pixel_loss_op(
    imgs: Tensor,
    pred: Tensor,
    mask: Tensor,
    pred_ids: Optional[Tensor],
    frames: Optional[Tensor],
    unnormalise: Optional[Tensor],
    patch_size: IntList,
    norm: str,
    all_patches: bool,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss 0-dim in the promotion of the three dtypes, as the official code gives; then
    the state its backward keeps, in the accumulation dtype: the loss again, the mask's weights
    ``[N*R]``, the weighted residual ``mask * (pred - target)`` ``[N*R, P]`` (0 where the
    weight is 0), the target's mean and reciprocal scale ``[N*R, G]`` (where read, with a
    norm; else 0), and each row's MSE ``[N*R]`` with ``all_patches`` (``[0]`` without), which
    the mask's gradient needs). Both backends give the same outputs.

    imgs ``[N, C, H, W]`` with patch_size ``(ph, pw)``, or a video ``[N, C, F, H, W]`` (any
    strides) with ``(u, ph, pw)`` and optionally ``frames``, the int64 frame of each tubelet
    frame; pred ``[N, R, P]`` and mask ``[N, R]``, row r of pred predicting patch r (R = L), or
    patch ``pred_ids[n, r]`` (int64 ``[N, R]``, distinct in each sample); ``unnormalise``
    ``[2, C]`` fp32 (std, mean) or None; ``norm`` one of :data:`NORMS`."""
    targets = _targets(imgs, patch_size, frames, pred_ids, unnormalise, norm)
    dtype = accumulation_dtype(imgs, pred, mask)
    weight = mask.reshape(-1).to(dtype, copy=True)
    state = _state_like(pred, mask, dtype, targets.stats_per_row(), all_patches)
    path = _loss_forward_triton if use_triton else _loss_forward_torch
    total = path(targets, pred, weight, all_patches, state)
    loss_state = total * _inverse_mask_sum(weight)
    loss = loss_state.to(promoted_dtype(pred, imgs, mask), copy=True)
    return loss, loss_state, weight, *state


@masked_pixel_loss_op.register_fake
def _(imgs, pred, mask, pred_ids, frames, unnormalise, patch_size, norm, all_patches, use_triton):
    dtype = accumulation_dtype(imgs, pred, mask)
    loss = pred.new_empty((), dtype=promoted_dtype(pred, imgs, mask))
    weight = pred.new_empty(mask.numel(), dtype=dtype)
    targets = _targets(imgs, patch_size, frames, pred_ids, unnormalise, norm)
    return (
        loss,
        pred.new_empty((), dtype=dtype),
        weight,
        *_state_like(pred, mask, dtype, targets.stats_per_row(), all_patches),
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
    rows: int,
    patch_size: IntList,
    norm_pix: bool,
    pred_dtype: torch.dtype,
    use_triton: bool,
) -> tuple[Tensor, Tensor]:
    """scale ``[1]`` = 2 * grad_loss / (P * sum(mask)) and the forward's state -> (grad_imgs
    ``imgs_shape``, or an empty tensor when ``imgs`` is None; grad_pred ``[N, R, P]``
    contiguous, in ``pred_dtype``). ``imgs`` is given only for MAE-style targets."""
    targets = None
    if imgs is not None:
        targets = _targets(imgs, patch_size, frames, None, None, "patch" if norm_pix else "none")
    video_shape, patch_size = video_geometry(imgs_shape, patch_size)
    grad_pred = residual.new_empty(imgs_shape[0], rows, residual.shape[1], dtype=pred_dtype)
    geometry = (video_shape, patch_size, rows)
    path = _loss_backward_triton if use_triton else _loss_backward_torch
    grad_source = path(scale, residual, weight, targets, mean, rstd, grad_pred, geometry)
    if grad_source is None:
        return residual.new_empty(0, dtype=pred_dtype), grad_pred
    if frames is not None:  # a frame named twice gets both gradients
        grad_frames = grad_source
        grad_source = grad_frames.new_zeros(video_shape).index_add_(2, frames, grad_frames)
    return grad_source.view(imgs_shape), grad_pred


@masked_pixel_loss_backward_op.register_fake
def _(scale, residual, weight, imgs, mean, rstd, frames, imgs_shape, rows, *rest):
    pred_dtype = rest[-2]
    no_imgs = imgs is None
    grad_imgs = residual.new_empty(0, dtype=pred_dtype) if no_imgs else imgs.new_empty(imgs_shape)
    return grad_imgs, residual.new_empty(imgs_shape[0], rows, residual.shape[1], dtype=pred_dtype)


def _read_patch_bytes(imgs, pred, mask, all_patches) -> int:
    """Pixels and predictions of the patches a loss kernel reads, plus the mask."""
    read = mask.numel() if all_patches else int(torch.count_nonzero(mask))
    pixels = pred.shape[-1]
    return read * pixels * (imgs.element_size() + pred.element_size()) + nbytes(mask)


@fused_op("fastmae::masked_pixel_loss", kernels=[_masked_loss_fwd_kernel])
def _loss_bytes(
    imgs,
    pred,
    mask,
    pred_ids,
    frames,
    unnormalise,
    patch_size,
    norm,
    all_patches,
    use_triton,
    outputs,
):
    _, _, weight, residual, mean, rstd, patch_mse = outputs
    stats = nbytes(mean) + nbytes(rstd) if norm != "none" else 0
    per_patch = mask.numel() * 4  # the per-row losses, summed by torch
    ids = 0 if pred_ids is None else nbytes(pred_ids)
    written = nbytes(weight) + nbytes(residual) + stats + per_patch + nbytes(patch_mse)
    return _read_patch_bytes(imgs, pred, mask, all_patches) + ids + written


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
    imgs, pred, mask, pred_ids, frames, unnormalise, patch_size, norm, _, use_triton = inputs
    targets = Targets(imgs, patch_size, frames, pred_ids, unnormalise, norm)
    if ctx.needs_input_grad[0] and not targets.mae_style:
        raise NotImplementedError(
            "masked_pixel_loss: imgs needs a gradient, but targets taken by pred_ids, "
            "un-normalised or with norm='channel' (Hugging Face VideoMAE's labels, which it "
            "builds under no_grad) give none; pass imgs.detach()"
        )
    ctx.patch_size, ctx.norm_pix, ctx.use_triton = patch_size, norm == "patch", use_triton
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
    no_grads = (None,) * 10
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
