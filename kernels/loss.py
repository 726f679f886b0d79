"""Masked (normalized-)pixel loss read straight from the images, forward and backward.

    target = patch l of imgs[n], pixel order (i, j, c)           (no patchified copy)
    target = (target - mean) / sqrt(var + 1e-6)  with norm_pix   (var unbiased, divisor P-1)
    loss   = sum_{n,l} mask[n,l] * mean_P (pred - target)^2 / sum(mask)

Only patches with a nonzero mask are read; kept patches cost one mask load. Statistics and
accumulation are fp32 whatever the dtype of ``pred``, so fp16 predictions cannot overflow.
The per-patch losses land in an ``[N, L]`` buffer summed by torch: deterministic, no atomics,
and no host synchronisation (an all-kept mask gives 0 through ``where``, not a branch).
"""

import torch

from ._triton import block_size, launch, tl, triton, warps_for
from .patchify import _patch_corner, _patch_offsets, gather_patches, scatter_patches

EPS = 1e-6
MAX_PATCH_PIXELS = 1 << 16  # one patch is one block of a program


def _patch_block(pixels: int) -> int:
    if pixels > MAX_PATCH_PIXELS:
        raise ValueError(
            f"the fused loss kernels hold a patch in one block, at most {MAX_PATCH_PIXELS} "
            f"pixels; got {pixels} (use FASTMAE_BACKEND=torch for such patches)"
        )
    return block_size(pixels, MAX_PATCH_PIXELS)


@triton.jit
def _load_target(
    imgs_ptr,
    patch_row,
    L,
    C,
    H,
    W,
    grid_w,
    P,
    PH: tl.constexpr,
    PW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One patch's pixels in (i, j, c) order as fp32, their offsets in imgs and validity."""
    corner = _patch_corner(patch_row, imgs_ptr, L, C, H, W, grid_w, PH, PW, False)
    element = tl.arange(0, BLOCK)
    valid = element < P
    offsets = corner + _patch_offsets(element, C, H, W, PH, PW, True)
    target = tl.load(imgs_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    return target, offsets, valid


@triton.jit
def _masked_loss_fwd_kernel(
    patch_loss_ptr,  # [N*L] fp32 out: mask * mean squared error of each patch
    mean_ptr,  # [N*L] fp32 out: target mean (written where mask != 0 and NORM_PIX)
    rstd_ptr,  # [N*L] fp32 out: 1 / sqrt(var + eps)
    pred_ptr,  # [N, L, P]
    imgs_ptr,  # [N, C, H, W]
    mask_ptr,  # [N, L]
    L,
    C,
    H,
    W,
    grid_w,
    P,
    eps,
    PH: tl.constexpr,
    PW: tl.constexpr,
    NORM_PIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid ``(N*L,)``: one patch per program, all P pixels in one block."""
    patch_row = tl.program_id(0).to(tl.int64)
    weight = tl.load(mask_ptr + patch_row).to(tl.float32)
    if weight != 0:
        target, _, valid = _load_target(imgs_ptr, patch_row, L, C, H, W, grid_w, P, PH, PW, BLOCK)
        if NORM_PIX:
            mean = tl.sum(target, axis=0) / P
            centered = tl.where(valid, target - mean, 0.0)
            var = tl.sum(centered * centered, axis=0) / (P - 1)
            rstd = 1.0 / tl.sqrt(var + eps)
            target = centered * rstd
            tl.store(mean_ptr + patch_row, mean)
            tl.store(rstd_ptr + patch_row, rstd)
        pred = tl.load(pred_ptr + patch_row * P + tl.arange(0, BLOCK), mask=valid, other=0.0)
        diff = tl.where(valid, pred.to(tl.float32) - target, 0.0)
        tl.store(patch_loss_ptr + patch_row, weight * (tl.sum(diff * diff, axis=0) / P))
    else:
        tl.store(patch_loss_ptr + patch_row, 0.0)


@triton.jit
def _masked_loss_bwd_kernel(
    grad_pred_ptr,  # [N, L, P] out: zeros at kept patches
    grad_imgs_ptr,  # [N, C, H, W] out, zero-initialised (written only when GRAD_IMGS)
    scale_ptr,  # [1] fp32: 2 * grad_loss / (P * sum(mask)), sum(mask) taken as 1 when 0
    pred_ptr,  # [N, L, P]
    imgs_ptr,  # [N, C, H, W]
    mask_ptr,  # [N, L]
    mean_ptr,  # [N*L] fp32 from the forward
    rstd_ptr,  # [N*L] fp32 from the forward
    L,
    C,
    H,
    W,
    grid_w,
    P,
    PH: tl.constexpr,
    PW: tl.constexpr,
    NORM_PIX: tl.constexpr,
    GRAD_IMGS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid ``(N*L,)``: d loss / d pred = scale * mask * (pred - target), and optionally the
    gradient through the target into the image pixels."""
    patch_row = tl.program_id(0).to(tl.int64)
    weight = tl.load(mask_ptr + patch_row).to(tl.float32)
    element = tl.arange(0, BLOCK)
    pred_row = pred_ptr + patch_row * P + element
    grad_row = grad_pred_ptr + patch_row * P + element
    if weight != 0:
        target, pixel_offsets, valid = _load_target(
            imgs_ptr, patch_row, L, C, H, W, grid_w, P, PH, PW, BLOCK
        )
        if NORM_PIX:
            rstd = tl.load(rstd_ptr + patch_row)
            target = tl.where(valid, (target - tl.load(mean_ptr + patch_row)) * rstd, 0.0)
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


def _mask_denominator(mask: torch.Tensor) -> torch.Tensor:
    """sum(mask) as fp32, replaced by 1 when it is 0 so that an all-kept mask gives loss 0."""
    total = mask.sum(dtype=torch.float32)
    return torch.where(total > 0, total, torch.ones_like(total))


def _removed_targets(imgs, mask, pixels, patch_size):
    """The removed patches (flat indices over N*L, weights) and their target pixels in fp32.
    The torch path selects rows with ``nonzero``, which costs nothing on the CPU."""
    removed = torch.nonzero(mask.reshape(-1)).squeeze(1)
    patches = gather_patches(imgs, None, patch_size, True, False).reshape(-1, pixels)
    weight = mask.reshape(-1).index_select(0, removed).float()
    return removed, weight, patches.index_select(0, removed).float()


def _loss_forward(imgs, pred, mask, patch_size, norm_pix, use_triton):
    """-> (sum over patches of mask * MSE, fp32 0-dim; target mean and rstd ``[N*L]`` fp32,
    meaningful at removed patches with norm_pix)."""
    imgs, pred, mask = imgs.contiguous(), pred.contiguous(), mask.contiguous()
    n, c, height, width = imgs.shape
    ph, pw = patch_size
    length, pixels = pred.shape[1], pred.shape[2]
    mean = torch.zeros(n * length, dtype=torch.float32, device=pred.device)
    rstd = torch.zeros_like(mean)
    if not use_triton:
        return _loss_forward_torch(imgs, pred, mask, patch_size, norm_pix, mean, rstd)
    patch_loss = torch.empty(n * length, dtype=torch.float32, device=pred.device)
    if patch_loss.numel():
        block = _patch_block(pixels)
        launch(
            _masked_loss_fwd_kernel,
            (n * length,),
            patch_loss,
            mean,
            rstd,
            pred,
            imgs,
            mask,
            length,
            c,
            height,
            width,
            width // pw,
            pixels,
            EPS,
            PH=ph,
            PW=pw,
            NORM_PIX=norm_pix,
            BLOCK=block,
            num_warps=warps_for(block),
        )
    return patch_loss.sum(), mean, rstd, pred.new_empty(0, 0, dtype=torch.float32)


def _loss_forward_torch(imgs, pred, mask, patch_size, norm_pix, mean, rstd):
    """The torch path on the removed rows only; also returns the weighted residual
    ``mask * (pred - target)`` as ``[N*L, P]`` fp32, so that its backward is one multiply."""
    pixels = pred.shape[-1]
    removed, weight, target = _removed_targets(imgs, mask, pixels, patch_size)
    if norm_pix and removed.numel():
        target_mean = target.mean(-1, keepdim=True)
        target = target - target_mean
        # Two passes over the centred rows: torch.var is several times slower on the CPU.
        var = torch.linalg.vector_norm(target, dim=-1, keepdim=True).square() / (pixels - 1)
        target_rstd = torch.rsqrt(var + EPS)
        target = target * target_rstd
        mean.index_copy_(0, removed, target_mean[:, 0])
        rstd.index_copy_(0, removed, target_rstd[:, 0])
    # In place on the freshly gathered rows: every pass counts on the CPU.
    diff = pred.reshape(-1, pixels).index_select(0, removed).float().sub_(target)
    total = (torch.linalg.vector_norm(diff, dim=-1).square() * weight).sum() / pixels
    residual = torch.empty(pred.shape[0] * pred.shape[1], pixels, device=pred.device)
    residual.index_fill_(0, torch.nonzero(mask.reshape(-1) == 0).squeeze(1), 0.0)  # kept rows
    residual.index_copy_(0, removed, diff.mul_(weight[:, None]))
    return total, mean, rstd, residual


def _loss_backward(
    scale,
    imgs,
    pred,
    mask,
    mean,
    rstd,
    residual,
    patch_size,
    norm_pix,
    grad_imgs_needed,
    use_triton,
):
    """scale ``[1]`` fp32 = 2 * grad_loss / (P * sum(mask)) -> (grad_imgs or an empty tensor,
    grad_pred). ``residual`` is the torch path's forward residual (empty on the Triton path)."""
    imgs, pred, mask = imgs.contiguous(), pred.contiguous(), mask.contiguous()
    n, c, height, width = imgs.shape
    ph, pw = patch_size
    length, pixels = pred.shape[1], pred.shape[2]
    if use_triton:
        grad_pred = torch.empty_like(pred)
        grad_imgs = torch.zeros_like(imgs) if grad_imgs_needed else imgs.new_empty(0)
        if pred.numel():
            block = _patch_block(pixels)
            launch(
                _masked_loss_bwd_kernel,
                (n * length,),
                grad_pred,
                grad_imgs if grad_imgs_needed else imgs,
                scale,
                pred,
                imgs,
                mask,
                mean,
                rstd,
                length,
                c,
                height,
                width,
                width // pw,
                pixels,
                PH=ph,
                PW=pw,
                NORM_PIX=norm_pix,
                GRAD_IMGS=grad_imgs_needed,
                BLOCK=block,
                num_warps=warps_for(block),
            )
        return grad_imgs, grad_pred
    grad_pred = (residual * scale).to(pred.dtype).view_as(pred)
    if not grad_imgs_needed:
        return imgs.new_empty(0), grad_pred
    removed, _, target = _removed_targets(imgs, mask, pixels, patch_size)
    grad_target = -(residual.index_select(0, removed) * scale)
    if norm_pix:  # backward of (x - mean) * rstd, the unbiased variance inside rstd
        patch_rstd = rstd.index_select(0, removed)[:, None]
        target = (target - mean.index_select(0, removed)[:, None]) * patch_rstd
        grad_target = patch_rstd * (
            grad_target
            - grad_target.mean(-1, keepdim=True)
            - target * (grad_target * target).sum(-1, keepdim=True) / (pixels - 1)
        )
    grad_patches = torch.zeros(pred.shape, dtype=imgs.dtype, device=imgs.device)
    grad_patches.view(-1, pixels).index_copy_(0, removed, grad_target.to(imgs.dtype))
    grad_imgs = scatter_patches(grad_patches, None, patch_size, imgs.shape, True, False)
    return grad_imgs, grad_pred


@torch.library.custom_op("fastmae::masked_pixel_loss", mutates_args=())
def masked_pixel_loss_op(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: list[int],
    norm_pix: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss 0-dim in the promotion of pred's and imgs' dtypes, as the official code gives;
    target mean and rstd ``[N*L]`` fp32 and, on the torch path, the weighted residual
    ``[N*L, P]`` fp32 (``[0, 0]`` on the Triton path), kept for the backward)."""
    total, *saved = _loss_forward(imgs, pred, mask, tuple(patch_size), norm_pix, use_triton)
    loss = (total / _mask_denominator(mask)).to(torch.promote_types(pred.dtype, imgs.dtype))
    return (loss, *saved)


@masked_pixel_loss_op.register_fake
def _(imgs, pred, mask, patch_size, norm_pix, use_triton):
    stats = pred.new_empty(pred.shape[0] * pred.shape[1], dtype=torch.float32)
    loss_dtype = torch.promote_types(pred.dtype, imgs.dtype)
    rows = 0 if use_triton else stats.shape[0]
    residual = pred.new_empty(rows, pred.shape[2] if rows else 0, dtype=torch.float32)
    return pred.new_empty((), dtype=loss_dtype), stats, torch.empty_like(stats), residual


@torch.library.custom_op("fastmae::masked_pixel_loss_backward", mutates_args=())
def masked_pixel_loss_backward_op(
    scale: torch.Tensor,
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    residual: torch.Tensor,
    patch_size: list[int],
    norm_pix: bool,
    grad_imgs_needed: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _loss_backward(
        scale,
        imgs,
        pred,
        mask,
        mean,
        rstd,
        residual,
        tuple(patch_size),
        norm_pix,
        grad_imgs_needed,
        use_triton,
    )


@masked_pixel_loss_backward_op.register_fake
def _(
    scale,
    imgs,
    pred,
    mask,
    mean,
    rstd,
    residual,
    patch_size,
    norm_pix,
    grad_imgs_needed,
    use_triton,
):
    grad_imgs = torch.empty_like(imgs) if grad_imgs_needed else imgs.new_empty(0)
    return grad_imgs, torch.empty_like(pred)


def _setup_loss(ctx, inputs, output):
    imgs, pred, mask, ctx.patch_size, ctx.norm_pix, ctx.use_triton = inputs
    _, mean, rstd, residual = output
    ctx.mark_non_differentiable(mean, rstd, residual)
    ctx.set_materialize_grads(False)  # no zero gradients for the three saved-state outputs
    ctx.save_for_backward(imgs, pred, mask, mean, rstd, residual)


def _backward_loss(ctx, grad_loss, _grad_mean, _grad_rstd, _grad_residual):
    imgs, pred, mask, mean, rstd, residual = ctx.saved_tensors
    scale = (2.0 * grad_loss.float() / (pred.shape[-1] * _mask_denominator(mask))).reshape(1)
    grad_imgs_needed = ctx.needs_input_grad[0]
    grad_imgs, grad_pred = masked_pixel_loss_backward_op(
        scale,
        imgs,
        pred,
        mask,
        mean,
        rstd,
        residual,
        ctx.patch_size,
        ctx.norm_pix,
        grad_imgs_needed,
        ctx.use_triton,
    )
    return (grad_imgs if grad_imgs_needed else None), grad_pred, None, None, None, None


masked_pixel_loss_op.register_autograd(_backward_loss, setup_context=_setup_loss)


def masked_pixel_loss(imgs, pred, mask, patch_size, norm_pix: bool, use_triton: bool):
    """imgs ``[N, C, H, W]``, pred ``[N, L, ph*pw*C]``, mask ``[N, L]`` -> 0-dim loss."""
    return masked_pixel_loss_op(imgs, pred, mask, list(patch_size), norm_pix, use_triton)[0]
