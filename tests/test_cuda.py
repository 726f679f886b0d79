"""Parity on a CUDA GPU with the compiled Triton kernels (skipped where there is no GPU).

Low precision uses a three-way check (as flash-attention's tests do): fastmae's error against
a float64 oracle must be within twice the error of the reference model run in the same dtype,
since bf16/fp16 results cannot match an fp32 one bit for bit."""

import pytest
import torch

import fastmae
from fastmae import reference
from fastmae.kernels import launch_counts, reset_launch_counts
from tests.helpers import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL_VIT = dict(
    img_size=224,
    patch_size=16,
    embed_dim=192,
    depth=2,
    num_heads=3,
    decoder_embed_dim=128,
    decoder_depth=1,
    decoder_num_heads=4,
)


def outputs(model, imgs, noise, dtype):
    model.zero_grad()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    return [loss.double(), pred.double(), *grads], mask


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_parity_on_cuda(dtype, norm_pix):
    config = dict(SMALL_VIT, norm_pix_loss=norm_pix)
    ref = reference.MaskedAutoencoderViT(**config).cuda()
    fused = fastmae.MaskedAutoencoderViT(**config).cuda()
    fused.load_state_dict(ref.state_dict())
    oracle = reference.MaskedAutoencoderViT(**config).cuda().double()
    oracle.load_state_dict(ref.state_dict())
    imgs, noise = torch.randn(13, 3, 224, 224, device="cuda"), torch.rand(13, 196, device="cuda")
    expected, expected_mask = outputs(oracle, imgs.double(), noise, torch.float32)
    same_dtype, _ = outputs(ref, imgs, noise, dtype)
    reset_launch_counts()
    got, mask = outputs(fused, imgs, noise, dtype)
    assert {"_masking_kernel", "_masked_loss_bwd_kernel", "_unshuffle_bwd_kernel"} <= set(
        launch_counts()
    )
    assert torch.equal(mask, expected_mask)
    for index, (a, b, c) in enumerate(zip(got, same_dtype, expected)):
        assert rel_err(a, c) <= 2 * rel_err(b, c) + 1e-6, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_low_precision_pred_on_cuda(dtype):
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    pred = (torch.randn(8, 196, 768, device="cuda") * 200).to(dtype).requires_grad_()
    mask = (torch.rand(8, 196, device="cuda") < 0.75).float()
    loss = fastmae.functional.masked_pixel_loss(imgs, pred, mask, 16, True)
    oracle = reference.masked_pixel_loss(imgs.double(), pred.detach().double(), mask, 16, True)
    assert torch.isfinite(loss) and rel_err(loss, oracle) <= 1e-5
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_training_step_captures_in_a_cuda_graph():
    """Forward+backward of the drop-in captured once, replayed on new data: same loss and
    gradients as eager. Capture fails on any host synchronisation."""
    model = fastmae.MaskedAutoencoderViT(**SMALL_VIT, norm_pix_loss=True).cuda()
    static_imgs = torch.randn(8, 3, 224, 224, device="cuda")
    static_noise = torch.rand(8, 196, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(static_imgs, noise=static_noise)[0].backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = model(static_imgs, noise=static_noise)[0]
        static_loss.backward()
    imgs, noise = torch.randn_like(static_imgs), torch.rand_like(static_noise)
    static_imgs.copy_(imgs)
    static_noise.copy_(noise)
    graph.replay()
    replayed = [static_loss.clone()] + [
        p.grad.clone() for p in model.parameters() if p.requires_grad
    ]
    model.zero_grad(set_to_none=True)
    eager_loss = model(imgs, noise=noise)[0]
    eager_loss.backward()
    eager = [eager_loss] + [p.grad for p in model.parameters() if p.requires_grad]
    for got, expected in zip(replayed, eager):
        assert rel_err(got, expected) <= 1e-5


def test_no_synchronisation_on_cuda():
    model = fastmae.MaskedAutoencoderViT(**SMALL_VIT).cuda()
    imgs = torch.randn(4, 3, 224, 224, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(imgs)[0].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
