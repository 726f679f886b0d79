"""Parity on a CUDA GPU with the compiled Triton kernels (skipped where there is no GPU).

Low precision uses a three-way check (as flash-attention's tests do): fastmae's error against
a float64 oracle must be within twice the error of the reference model run in the same dtype,
since bf16/fp16 results cannot match an fp32 one bit for bit."""

import pytest
import torch

import fastmae
import fastmae.video
from fastmae import reference
from fastmae.kernels import launch_counts, reset_launch_counts
from fastmae.video import reference as video_reference
from tests.configs import SMALL_VIDEO, SMALL_VIT
from tests.helpers import assert_as_accurate, assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


FAMILIES = {  # classes, config, input shape (batch 13, a prime), mask ratio
    "image": (reference, fastmae, SMALL_VIT, (13, 3, 224, 224), 0.75),
    "video": (video_reference, fastmae.video, SMALL_VIDEO, (13, 3, 8, 112, 112), 0.9),
}


def outputs(model, imgs, noise, dtype, ratio):
    model.zero_grad()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss, pred, mask = model(imgs, mask_ratio=ratio, noise=noise)
    loss.backward()
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    return [loss.double(), pred.double(), *grads], mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_parity_on_cuda(dtype, norm_pix, family):
    oracle_module, fused_module, config, shape, ratio = FAMILIES[family]
    config = dict(config, norm_pix_loss=norm_pix)
    ref = oracle_module.MaskedAutoencoderViT(**config).cuda()
    fused = fused_module.MaskedAutoencoderViT(**config).cuda()
    fused.load_state_dict(ref.state_dict())
    oracle = oracle_module.MaskedAutoencoderViT(**config).cuda().double()
    oracle.load_state_dict(ref.state_dict())
    imgs = torch.randn(shape, device="cuda")
    noise = torch.rand(shape[0], ref.patch_embed.num_patches, device="cuda")
    expected, expected_mask = outputs(oracle, imgs.double(), noise, torch.float32, ratio)
    same_dtype, _ = outputs(ref, imgs, noise, dtype, ratio)
    reset_launch_counts()
    got, mask = outputs(fused, imgs, noise, dtype, ratio)
    assert {"_masking_kernel", "_masked_loss_bwd_kernel", "_unshuffle_bwd_kernel"} <= set(
        launch_counts()
    )
    assert torch.equal(mask, expected_mask)
    for index, (a, b, c) in enumerate(zip(got, same_dtype, expected)):
        assert_as_accurate(a, b, c, dtype, f"output {index}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_low_precision_pred_on_cuda(dtype):
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    pred = (torch.randn(8, 196, 768, device="cuda") * 200).to(dtype).requires_grad_()
    mask = (torch.rand(8, 196, device="cuda") < 0.75).float()
    loss = fastmae.functional.masked_pixel_loss(imgs, pred, mask, 16, True)
    oracle = reference.masked_pixel_loss(imgs.double(), pred.detach().double(), mask, 16, True)
    assert torch.isfinite(loss)
    assert_close(loss, oracle)
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
        assert_close(got, expected)


def test_no_synchronisation_on_cuda():
    model = fastmae.MaskedAutoencoderViT(**SMALL_VIT).cuda()
    imgs = torch.randn(4, 3, 224, 224, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(imgs)[0].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _videomae_twins(norm_pix: bool):
    """HF VideoMAE (16 frames of 112 px, tubelets of 2, two narrow layers each side) and a
    patched copy, and its float64 copy as the oracle."""
    import copy

    transformers = pytest.importorskip("transformers")
    import fastmae.hf

    config = transformers.VideoMAEConfig(
        image_size=112,
        hidden_size=192,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=384,
        decoder_hidden_size=128,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=256,
        norm_pix_loss=norm_pix,
    )
    hf = transformers.VideoMAEForPreTraining(config).cuda()
    fused = fastmae.hf.apply_fastmae(copy.deepcopy(hf))
    return hf, fused, copy.deepcopy(hf).double()


def _videomae_outputs(model, pixel_values, mask, dtype):
    model.zero_grad()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = model(pixel_values, bool_masked_pos=mask)
    out.loss.backward()
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    return [out.loss.double(), out.logits.double(), *grads]


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_videomae_parity_on_cuda(dtype, norm_pix):
    """HF VideoMAE patched, against the unpatched model in the same dtype and float64, with
    90% tube masking of a batch of 13 clips."""
    hf, fused, oracle = _videomae_twins(norm_pix)
    pixel_values = torch.randn(13, 16, 3, 112, 112, device="cuda")
    spatial = torch.rand(13, 49, device="cuda").argsort(1).argsort(1) < int(0.9 * 49)
    mask = spatial.repeat(1, 8)
    expected = _videomae_outputs(oracle, pixel_values.double(), mask, torch.float32)
    same_dtype = _videomae_outputs(hf, pixel_values, mask, dtype)
    reset_launch_counts()
    got = _videomae_outputs(fused, pixel_values, mask, dtype)
    assert {"_copy_patches_kernel", "_unshuffle_fwd_kernel", "_masked_loss_bwd_kernel"} <= set(
        launch_counts()
    )
    for index, (a, b, c) in enumerate(zip(got, same_dtype, expected)):
        assert_as_accurate(a, b, c, dtype, f"output {index}")


def test_videomae_synchronises_the_host_less_than_hf():
    """HF's step synchronises the host at each boolean index (four), the patched step where it
    reads the mask's counts (twice); both copy the same host tables. Counted with CUDA's sync
    debug mode (a warning per synchronising call)."""
    import warnings

    hf, fused, _ = _videomae_twins(True)
    pixel_values = torch.randn(4, 16, 3, 112, 112, device="cuda")
    mask = (torch.rand(4, 49, device="cuda").argsort(1).argsort(1) < 44).repeat(1, 8)
    counts = {}
    for name, model in (("hf", hf), ("fused", fused)):
        model(pixel_values, bool_masked_pos=mask).loss.backward()  # warm-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(pixel_values, bool_masked_pos=mask).loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[name] = sum("synchroniz" in str(w.message) for w in caught)
    assert counts["fused"] < counts["hf"], counts
