"""The video drop-in against the video reference (mae_st's op sequence): same weights and
seed, same mask, loss, pred and parameter gradients, on both fused-op backends, for every
sep_pos_embed/cls_embed combination and both norm_pix settings."""

import itertools

import pytest
import torch

import fastmae
from fastmae import video
from fastmae.kernels import launch_counts
from fastmae.kernels._triton import fused_kernel_names
from fastmae.layers import PatchEmbed3d
from fastmae.video import reference
from tests.configs import TINY_CLIP, TINY_VIDEO
from tests.helpers import assert_close, assert_tensors_match, run_step

SHAPES = {
    # img_size, patch, in_chans, num_frames, t_patch_size, pred_t_dim
    "rgb": dict(TINY_CLIP, in_chans=3),
    "gray-nonsquare-u2": dict(
        img_size=(8, 12), patch_size=4, in_chans=1, num_frames=8, t_patch_size=2, pred_t_dim=8
    ),
    "rgb-t4": dict(
        img_size=8, patch_size=2, in_chans=3, num_frames=8, t_patch_size=4, pred_t_dim=4
    ),
    # mae_st's default pred_t_dim 8 on a 4-frame clip: linspace repeats target frames.
    "repeated-frames": dict(
        img_size=8, patch_size=4, in_chans=3, num_frames=4, t_patch_size=2, pred_t_dim=8
    ),
}
LAYOUTS = list(itertools.product([False, True], [False, True]))


def twins(shape="rgb", sep=False, cls=False, norm_pix=False, **extra):
    config = dict(**SHAPES[shape], **TINY_VIDEO, sep_pos_embed=sep, cls_embed=cls, **extra)
    torch.manual_seed(0)
    ref = reference.MaskedAutoencoderViT(**config, norm_pix_loss=norm_pix)
    torch.manual_seed(0)
    fused = video.MaskedAutoencoderViT(**config, norm_pix_loss=norm_pix)
    return ref, fused


def clip(model, batch=3):
    embed = model.patch_embed
    return torch.randn(batch, model.in_chans, embed.frames, *embed.img_size)


def assert_same(fused_out, ref_out):
    assert torch.equal(fused_out[2], ref_out[2])
    assert_close(fused_out[0], ref_out[0])
    assert_close(fused_out[1], ref_out[1])
    assert "mask_token" in ref_out[3]
    assert_tensors_match(fused_out[3], ref_out[3])


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("sep,cls", LAYOUTS, ids=lambda v: str(v))
def test_drop_in_matches_reference(backend, sep, cls, norm_pix, fresh_seed):
    ref, fused = twins("rgb", sep, cls, norm_pix)
    for a, b in zip(ref.state_dict().items(), fused.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]  # same keys, order, init
    imgs = clip(ref, batch=3)
    assert_same(run_step(fused, imgs, 0.75, fresh_seed), run_step(ref, imgs, 0.75, fresh_seed))
    if backend == "triton":
        assert fused_kernel_names() <= set(launch_counts())
    else:
        assert launch_counts() == {}


@pytest.mark.parametrize("shape", ["gray-nonsquare-u2", "rgb-t4", "repeated-frames"])
@pytest.mark.parametrize("sep,cls", [(True, False), (False, True)], ids=lambda v: str(v))
def test_other_shapes_match_reference(backend, shape, sep, cls, fresh_seed):
    ref, fused = twins(shape, sep, cls, norm_pix=True)
    imgs = clip(ref, batch=5)
    assert_same(run_step(fused, imgs, 0.9, fresh_seed), run_step(ref, imgs, 0.9, fresh_seed))


def test_explicit_noise_and_trunc_init(backend):
    ref, fused = twins("rgb", True, True, trunc_init=True, no_qkv_bias=True)
    assert "blocks.0.attn.q.bias" not in fused.state_dict()
    for a, b in zip(ref.state_dict().values(), fused.state_dict().values()):
        assert torch.equal(a, b)
    imgs, noise = clip(ref, 2), torch.rand(2, ref.patch_embed.num_patches)
    got, expected = fused(imgs, 0.5, noise=noise), ref(imgs, 0.5, noise=noise)
    assert torch.equal(got[2], expected[2])
    assert_close(got[0], expected[0])
    assert_close(got[1], expected[1])


def test_state_dict_is_mae_st_shaped():
    """The keys and shapes mae_st's model has, for each layout."""
    for sep, cls in LAYOUTS:
        _, fused = twins("rgb", sep, cls)
        state = fused.state_dict()
        assert state["patch_embed.proj.weight"].shape == (16, 3, 2, 4, 4)  # Conv3d [D, C, u, p, p]
        assert state["decoder_pred.weight"].shape == (1 * 4 * 4 * 3, 8)  # u' = 2 * 2 // 4 = 1
        for key in ("blocks.0.attn.q.weight", "blocks.0.attn.k.bias", "blocks.0.mlp.fc2.bias"):
            assert key in state
        expected = {
            (True, False): {"pos_embed_spatial": (1, 4, 16), "pos_embed_temporal": (1, 2, 16)},
            (True, True): {"pos_embed_class": (1, 1, 16), "decoder_pos_embed_class": (1, 1, 8)},
            (False, False): {"pos_embed": (1, 8, 16), "decoder_pos_embed": (1, 8, 8)},
            (False, True): {"pos_embed": (1, 9, 16), "cls_token": (1, 1, 16)},
        }[(sep, cls)]
        for key, shape in expected.items():
            assert tuple(state[key].shape) == shape, key
        assert ("decoder_cls_token" in state) == cls and ("pos_embed" in state) == (not sep)


@pytest.mark.parametrize("sep,cls", LAYOUTS, ids=lambda v: str(v))
def test_mae_st_checkpoint_loads_strictly(tmp_path, sep, cls):
    ref, _ = twins("rgb", sep, cls)
    torch.save({"model": ref.state_dict(), "epoch": 3}, tmp_path / "checkpoint-00003.pth")
    torch.manual_seed(123)
    fresh = video.MaskedAutoencoderViT(
        **SHAPES["rgb"], **TINY_VIDEO, sep_pos_embed=sep, cls_embed=cls
    )
    result = fastmae.load_checkpoint(fresh, tmp_path / "checkpoint-00003.pth")
    assert not result.missing_keys and not result.unexpected_keys
    for a, b in zip(fresh.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_official_methods_match_reference(backend, fresh_seed):
    ref, fused = twins("gray-nonsquare-u2", True, True)
    imgs = clip(ref, 2)
    patches = ref.patchify(imgs)
    assert torch.equal(fused.patchify(imgs), patches)
    assert torch.equal(fused.unpatchify(patches), imgs) and torch.equal(
        ref.unpatchify(patches), imgs
    )
    tokens = torch.randn(2, ref.patch_embed.num_patches, 5)
    torch.manual_seed(fresh_seed)
    expected = ref.random_masking(tokens, 0.75)
    torch.manual_seed(fresh_seed)
    got = fused.random_masking(tokens, 0.75)
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    torch.manual_seed(fresh_seed)
    latent, mask, ids_restore = fused.forward_encoder(imgs, 0.75)
    torch.manual_seed(fresh_seed)
    ref_latent, ref_mask, ref_ids = ref.forward_encoder(imgs, 0.75)
    assert latent.shape == ref_latent.shape and torch.equal(ids_restore, ref_ids)
    assert_close(latent, ref_latent)
    pred = fused.forward_decoder(latent, ids_restore)
    assert_close(pred, ref.forward_decoder(ref_latent, ref_ids))
    assert_close(fused.forward_loss(imgs, pred, mask), ref.forward_loss(imgs, pred, mask))


def test_custom_patch_embed_class_runs_its_own_forward(backend, fresh_seed):
    calls = []

    class CountingPatchEmbed(PatchEmbed3d):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    ref, fused = twins("rgb", True, False, patch_embed=CountingPatchEmbed)
    imgs = clip(ref, 3)
    assert_same(run_step(fused, imgs, 0.75, fresh_seed), run_step(ref, imgs, 0.75, fresh_seed))
    assert len(calls) == 2  # once in each model


def test_factories_have_mae_st_hyperparameters():
    model = video.mae_vit_base_patch16(
        img_size=32, num_frames=4, t_patch_size=2, pred_t_dim=2, decoder_depth=1, depth=1
    )
    assert model.patch_embed.proj.weight.shape == (768, 3, 2, 16, 16)
    assert model.norm.eps == 1e-6 and model.decoder_embed.out_features == 512
    assert video.mae_vit_huge_patch14.__name__ == "mae_vit_huge_patch14"


@pytest.mark.parametrize(
    "config,message",
    [
        (dict(num_frames=6, t_patch_size=4), r"num_frames 6 is not divisible by t_patch_size 4"),
        (dict(num_frames=8, t_patch_size=2, pred_t_dim=3), r"pred_t_dim 3 does not fit"),
        (dict(num_frames=4, t_patch_size=2, pred_t_dim=3), r"pred_t_dim 3 does not fit"),
    ],
)
def test_constructor_refuses_incompatible_frames(config, message):
    with pytest.raises(ValueError, match=message):
        video.MaskedAutoencoderViT(img_size=8, patch_size=4, **TINY_VIDEO, **config)


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("shape", ["rgb", "repeated-frames"])
def test_loss_gradient_reaches_the_clip(backend, shape, norm_pix):
    """d loss / d imgs through the targets; a frame that linspace names twice gets both."""
    ref, fused = twins(shape, norm_pix=norm_pix)
    imgs = clip(ref, batch=2).requires_grad_()
    pred = torch.randn(2, ref.patch_embed.num_patches, ref.decoder_pred.out_features)
    mask = (torch.rand(2, ref.patch_embed.num_patches) < 0.6).float()
    grads = []
    for model in (fused, ref):
        (grad,) = torch.autograd.grad(model.forward_loss(imgs, pred, mask), imgs)
        grads.append(grad)
    assert grads[1].abs().sum() > 0
    assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    "model_class", [reference.MaskedAutoencoderViT, video.MaskedAutoencoderViT]
)
def test_bad_clips_are_refused(model_class):
    model = model_class(**SHAPES["rgb"], **TINY_VIDEO)
    with pytest.raises(ValueError, match=r"imgs must be \[N, C=3, T=4, H=8, W=8\], got shape"):
        model(torch.randn(2, 3, 8, 8))  # an image, not a clip
    with pytest.raises(ValueError, match=r"T=4, H=8, W=8\], got shape \(2, 3, 6, 8, 8\)"):
        model(torch.randn(2, 3, 6, 8, 8))
    with pytest.raises(TypeError, match=r"floating-point"):
        model(torch.zeros(2, 3, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"noise must have shape \[N, L\] = \[2, 8\]"):
        model(torch.randn(2, 3, 4, 8, 8), noise=torch.rand(2, 7))
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        model(torch.randn(2, 3, 4, 8, 8), mask_ratio=1.0)


def test_compile_fullgraph_matches_eager(backend):
    _, fused = twins("rgb", True, True, norm_pix=True)
    imgs, noise = clip(fused, 2), torch.rand(2, fused.patch_embed.num_patches)
    eager = fused(imgs, 0.75, noise=noise)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True)(imgs, 0.75, noise=noise)
    assert torch.equal(compiled[2], eager[2])
    assert_close(compiled[0], eager[0])
    assert_close(compiled[1], eager[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_clips_of_another_dtype_name_both_dtypes(dtype):
    model = video.MaskedAutoencoderViT(**SHAPES["rgb"], **TINY_VIDEO)
    imgs = clip(model, batch=2).to(dtype)
    with pytest.raises(TypeError, match=rf"imgs has dtype {dtype}, the model's parameters "):
        model(imgs)


@pytest.mark.parametrize("cls", [False, True], ids=["no-cls", "cls"])
def test_nothing_kept_matches_reference(backend, cls, fresh_seed):
    """mask_ratio 0.999 on a short clip keeps no token (K = 0), which the checks accept: the
    loss, pred and gradients are mae_st's, on both backends."""
    ref, fused = twins("rgb", cls=cls)
    imgs = clip(ref, batch=2)
    assert_same(run_step(fused, imgs, 0.999, fresh_seed), run_step(ref, imgs, 0.999, fresh_seed))
