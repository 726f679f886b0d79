"""The reconstruction picture: CLI output and the un-normalisation it draws."""

import argparse

import pytest
import torch

import fastmae
from fastmae import visualize
from tests.configs import TINY, TINY_CLIP

Image = pytest.importorskip("PIL.Image")


@pytest.mark.parametrize("in_chans,mode", [(3, "RGB"), (1, "L")])
def test_cli_writes_a_png_grid(tmp_path, capsys, in_chans, mode):
    out = tmp_path / "grid.png"
    card = visualize.TEST_CARD
    code = visualize.main(
        [
            "--image",
            card,
            card,
            "--in-chans",
            str(in_chans),
            "--img-size",
            "64",
            "96",
            "--out",
            str(out),
            "--seed",
            "3",
        ]
    )
    assert code == 0
    assert "random weights" in capsys.readouterr().err
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.mode == mode
        assert picture.size == (4 * 96, 2 * 64)


def test_cli_default_image_and_checkpoint(tmp_path, capsys):
    model = fastmae.mae_vit_base_patch16(img_size=32)
    fastmae.save_checkpoint(model, tmp_path / "ckpt.pth", epoch=1)
    out = tmp_path / "card.png"
    visualize.main(
        ["--checkpoint", str(tmp_path / "ckpt.pth"), "--img-size", "32", "--out", str(out)]
    )
    assert "random weights" not in capsys.readouterr().err
    with Image.open(out) as picture:
        assert picture.size == (4 * 32, 32)


@pytest.mark.parametrize(
    "saved,flag,expected",
    [(True, [], True), (False, [], False), (None, [], False), (True, ["--no-norm-pix-loss"], False)]
    + [(False, ["--norm-pix-loss"], True)],
)
def test_cli_takes_norm_pix_loss_from_the_checkpoint_args(
    tmp_path, monkeypatch, saved, flag, expected
):
    """Official training checkpoints save their argparse args: norm_pix_loss comes from there
    unless the flag says otherwise."""
    model = fastmae.mae_vit_base_patch16(img_size=32)
    state = {"model": model.state_dict(), "epoch": 1}
    if saved is not None:
        state["args"] = argparse.Namespace(norm_pix_loss=saved, mask_ratio=0.75)
    torch.save(state, tmp_path / "ckpt.pth")
    seen = []
    load = fastmae.load_checkpoint
    monkeypatch.setattr(fastmae, "load_checkpoint", lambda m, w: seen.append(m) or load(m, w))
    out = str(tmp_path / "card.png")
    args = ["--checkpoint", str(tmp_path / "ckpt.pth"), "--img-size", "32", "--out", out]
    assert visualize.main([*args, *flag]) == 0
    assert [m.norm_pix_loss for m in seen] == [expected]


def perfect_prediction(patches, mask, norm_pix):
    """The prediction a perfect model makes; with norm_pix, normalised with the visible
    pixels' image-level statistics (the documented choice of the picture)."""
    if not norm_pix:
        return patches
    visible = (1 - mask)[..., None].expand_as(patches)
    count = visible.sum((1, 2))
    mean = (patches * visible).sum((1, 2)) / count
    var = (((patches - mean[:, None, None]) ** 2) * visible).sum((1, 2)) / (count - 1)
    return (patches - mean[:, None, None]) / (var + 1e-6).sqrt()[:, None, None]


@pytest.mark.parametrize("norm_pix", [False, True])
def test_perfect_prediction_reconstructs_the_image(norm_pix):
    model = fastmae.MaskedAutoencoderViT(img_size=8, patch_size=2, norm_pix_loss=norm_pix, **TINY)
    imgs = torch.randn(2, 3, 8, 8)
    patches = model.patchify(imgs)
    mask_holder = {}

    def perfect(latent, ids_restore):
        return perfect_prediction(patches, mask_holder["mask"], norm_pix)

    encoder = model._encoder

    def encode(*args, **kwargs):
        latent, mask, ids_restore = encoder(*args, **kwargs)
        mask_holder["mask"] = mask
        return latent, mask, ids_restore

    # The steps forward runs (and the official method names call): the place to customise.
    model._encoder, model._decoder = encode, perfect
    result = visualize.reconstruct(model, imgs, mask_ratio=0.5)
    assert torch.allclose(result["reconstruction"], imgs, atol=1e-5)
    assert torch.allclose(result["pasted"], imgs, atol=1e-5)
    removed = model.unpatchify(result["mask"][..., None].expand_as(patches).contiguous())
    assert torch.equal(result["masked"], imgs * (1 - removed))
    assert 0 < removed.mean() < 1


def test_cli_writes_an_animated_gif_for_a_video_model(tmp_path, capsys):
    out = tmp_path / "clip.gif"
    args = ["--video", "--img-size", "32", "--num-frames", "8", "--pred-t-dim", "4"]
    assert visualize.main([*args, "--out", str(out), "--seed", "1"]) == 0
    assert "random weights" in capsys.readouterr().err
    with Image.open(out) as animation:
        assert animation.format == "GIF" and animation.n_frames == 4  # one per predicted frame
        assert animation.size == (4 * 32, 32)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_perfect_video_prediction_reconstructs_the_predicted_frames(norm_pix):
    from fastmae import video

    config = dict(TINY_CLIP, pred_t_dim=4)  # every frame is a target
    model = video.MaskedAutoencoderViT(**config, **TINY, norm_pix_loss=norm_pix)
    clip = torch.randn(2, 3, 4, 8, 8)
    frames = model.target_frames(4, clip.device)
    patches = model.patchify(clip.index_select(2, frames))
    holder = {}
    encoder = model._encoder

    def encode(*args):
        latent, mask, ids_restore = encoder(*args)
        holder["mask"] = mask
        return latent, mask, ids_restore

    def perfect(latent, ids_restore):
        return perfect_prediction(patches, holder["mask"], norm_pix)

    model._encoder, model._decoder = encode, perfect
    result = visualize.reconstruct_video(model, clip, mask_ratio=0.5)
    target = clip.index_select(2, frames)
    assert torch.equal(result["frames"], frames) and result["original"].shape == (2, 3, 4, 8, 8)
    assert torch.allclose(result["reconstruction"], target, atol=1e-5)
    assert len(visualize.video_frames(result)) == 4


def test_test_clip_pans_the_card():
    clip = visualize.test_clip((16, 32), frames=4, in_chans=3)
    assert clip.shape == (3, 4, 16, 32)
    assert torch.equal(clip[:, 1], torch.roll(clip[:, 0], 8, dims=-1))
