"""Loading official, encoder-only, bare and Hugging Face weights; saving in the official format."""

import argparse
import collections
import re
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmae
from fastmae import reference
from fastmae.checkpoint import load_checkpoint, save_checkpoint
from tests.configs import TINY, TINY_VITMAE
from tests.helpers import assert_close

CONFIG = dict(img_size=8, patch_size=2, in_chans=3, **TINY)


def assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_official_format_round_trip(tmp_path):
    trained = fastmae.MaskedAutoencoderViT(**CONFIG)
    optimizer = torch.optim.AdamW(trained.parameters())
    trained(torch.randn(2, 3, 8, 8))[0].backward()
    optimizer.step()
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, lr=None)
    path = tmp_path / "checkpoint-3.pth"
    save_checkpoint(
        trained,
        path,
        optimizer=optimizer.state_dict(),
        epoch=3,
        scaler={"scale": 65536.0, "growth_tracker": 0},
        args=args,
    )
    # The official code loads it with a plain torch.load and load_state_dict.
    official = reference.MaskedAutoencoderViT(**CONFIG)
    official.load_state_dict(torch.load(path, weights_only=False)["model"], strict=True)
    assert_same_weights(official, trained)
    # ... and an official file loads into fastmae, safely.
    save_checkpoint(official, tmp_path / "official.pth", epoch=4, args=args)
    back = fastmae.MaskedAutoencoderViT(**CONFIG)
    result = load_checkpoint(back, tmp_path / "official.pth")
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_weights(back, trained)


def test_bare_and_ddp_state_dicts():
    source = fastmae.MaskedAutoencoderViT(**CONFIG)
    for state in (source.state_dict(), {f"module.{k}": v for k, v in source.state_dict().items()}):
        target = fastmae.MaskedAutoencoderViT(**CONFIG)
        load_checkpoint(target, state)
        assert_same_weights(target, source)


def test_encoder_only_reports_decoder_keys_missing():
    source = fastmae.MaskedAutoencoderViT(**CONFIG)
    encoder = {
        k: v
        for k, v in source.state_dict().items()
        if not k.startswith("decoder") and k != "mask_token"
    }
    target = fastmae.MaskedAutoencoderViT(**CONFIG)
    result = load_checkpoint(target, {"model": encoder})
    decoder_keys = {k for k in source.state_dict() if k not in encoder}
    assert set(result.missing_keys) == decoder_keys and "mask_token" in decoder_keys
    assert not result.unexpected_keys
    for key, value in encoder.items():
        assert torch.equal(target.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="Missing key"):
        load_checkpoint(target, encoder, strict=True)


def test_missing_encoder_key_raises():
    state = fastmae.MaskedAutoencoderViT(**CONFIG).state_dict()
    del state["blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing \['blocks.0.attn.qkv.weight'\]"):
        load_checkpoint(fastmae.MaskedAutoencoderViT(**CONFIG), state)


def test_shape_mismatch_names_key_and_shapes():
    state = fastmae.MaskedAutoencoderViT(**CONFIG).state_dict()
    state["decoder_pred.weight"] = torch.zeros(10, 24)
    with pytest.raises(
        ValueError, match=r"decoder_pred.weight: checkpoint \[10, 24\], model \[12, 24\]"
    ):
        load_checkpoint(fastmae.MaskedAutoencoderViT(**CONFIG), state)


def test_position_embedding_is_interpolated_to_a_new_grid():
    small = fastmae.MaskedAutoencoderViT(**CONFIG)  # 4x4 grid
    large = fastmae.MaskedAutoencoderViT(**{**CONFIG, "img_size": (12, 8)})  # 6x4 grid
    with pytest.warns(UserWarning, match=r"pos_embed: interpolating .* 4x4 to a 6x4"):
        load_checkpoint(large, small.state_dict())
    grid = small.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 4), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 24, -1)
    assert torch.allclose(large.pos_embed[:, 1:], expected, atol=1e-6)
    assert torch.equal(large.pos_embed[:, 0], small.pos_embed[:, 0])
    assert large.decoder_pos_embed.shape == (1, 25, TINY["decoder_embed_dim"])


# -- Hugging Face ---------------------------------------------------------------------------------

HF4 = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
HF5 = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
QKV4 = ["attention.attention.query", "attention.attention.key", "attention.attention.value"]
QKV5 = ["attention.q_proj", "attention.k_proj", "attention.v_proj"]


def to_hf(state, version, prefix="vit."):
    """Rename a fastmae state_dict the way transformers 4.x or 5.x stores ViTMAE."""
    names, qkv_names = (HF4, QKV4) if version == 4 else (HF5, QKV5)
    layers = f"{prefix}encoder.layer" if version == 4 else f"{prefix}layers"
    top = {
        "cls_token": f"{prefix}embeddings.cls_token",
        "pos_embed": f"{prefix}embeddings.position_embeddings",
        "patch_embed.proj.weight": f"{prefix}embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": f"{prefix}embeddings.patch_embeddings.projection.bias",
        "norm.weight": f"{prefix}layernorm.weight",
        "norm.bias": f"{prefix}layernorm.bias",
        "mask_token": "decoder.mask_token",
        "decoder_pos_embed": "decoder.decoder_pos_embed",
    }
    out = collections.OrderedDict()
    for key, value in state.items():
        match = re.match(r"(decoder_blocks|blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if key in top:
            out[top[key]] = value
        elif match:
            blocks, index, sub, kind = match.groups()
            base = (
                f"decoder.decoder_layers.{index}"
                if blocks == "decoder_blocks"
                else f"{layers}.{index}"
            )
            if sub == "attn.qkv":
                for name, part in zip(qkv_names, value.chunk(3)):
                    out[f"{base}.{name}.{kind}"] = part
            else:
                out[f"{base}.{names[sub]}.{kind}"] = value
        else:
            out[f"decoder.{key}"] = value  # decoder_embed, decoder_norm, decoder_pred
    return out


@pytest.mark.parametrize("version", [4, 5])
def test_hugging_face_names_load(version):
    source = fastmae.MaskedAutoencoderViT(**CONFIG)
    target = fastmae.MaskedAutoencoderViT(**CONFIG)
    result = load_checkpoint(target, to_hf(source.state_dict(), version))
    assert not result.missing_keys
    assert_same_weights(target, source)


@pytest.mark.parametrize("version", [4, 5])
def test_hugging_face_encoder_model_loads(version):
    source = fastmae.MaskedAutoencoderViT(**CONFIG)
    encoder = {
        k: v
        for k, v in to_hf(source.state_dict(), version, prefix="").items()
        if not k.startswith("decoder.")
    }  # ViTMAEModel: no "vit." prefix, no decoder
    target = fastmae.MaskedAutoencoderViT(**CONFIG)
    result = load_checkpoint(target, encoder)
    assert result.missing_keys and all(
        k.startswith("decoder") or k == "mask_token" for k in result.missing_keys
    )
    assert torch.equal(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_directory_with_safetensors_or_bin(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    source = fastmae.MaskedAutoencoderViT(**CONFIG)
    hf = {k: v.contiguous() for k, v in to_hf(source.state_dict(), 5).items()}
    (tmp_path / "st").mkdir()
    safetensors.save_file(hf, tmp_path / "st" / "model.safetensors")
    (tmp_path / "bin").mkdir()
    torch.save(to_hf(source.state_dict(), 4), tmp_path / "bin" / "pytorch_model.bin")
    for folder in ("st", "bin"):
        target = fastmae.MaskedAutoencoderViT(**CONFIG)
        load_checkpoint(target, tmp_path / folder)
        assert_same_weights(target, source)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        load_checkpoint(target, tmp_path)


class NotAWeight:
    pass


def test_unsafe_pickle_is_refused_in_one_line(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "payload": NotAWeight()}, path)
    with pytest.raises(ValueError) as error:
        load_checkpoint(fastmae.MaskedAutoencoderViT(**CONFIG), path)
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    assert f"{path} holds a pickled tests.test_checkpoint.NotAWeight" in message
    assert "weights_only=False), which runs code from the file" in message


def truncated_zip(path):
    torch.save({"model": fastmae.MaskedAutoencoderViT(**CONFIG).state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncated_legacy(path):
    state = {"model": fastmae.MaskedAutoencoderViT(**CONFIG).state_dict()}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "write,message",
    [
        (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\), not a checkpoint"),
        (
            lambda p: p.write_text("epoch 3, loss 0.41\n"),
            r"not a checkpoint: .* starts with b'epoc'",
        ),
        (
            lambda p: p.write_bytes(b"\x17" + bytes(range(256)) * 4),
            r"not a checkpoint: neither a zip archive nor a pickle",
        ),
        (lambda p: p.write_bytes(b"\x80" + bytes(range(255, 0, -1)) * 4), r"corrupt or truncated"),
        (truncated_zip, r"corrupt or truncated: (RuntimeError|OSError): "),
        (truncated_legacy, r"corrupt or truncated: (RuntimeError: unexpected EOF|UnpicklingError)"),
        (lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"), r"safetensors"),
    ],
    ids=[
        "empty",
        "text",
        "random-bytes",
        "pickle-garbage",
        "truncated-zip",
        "truncated-legacy",
        "bad-safetensors",
    ],
)
def test_files_that_are_not_checkpoints(tmp_path, write, message):
    suffix = ".safetensors" if "safetensors" in message else ".pth"
    path = tmp_path / f"file{suffix}"
    write(path)
    with pytest.raises(ValueError, match=message) as error:
        load_checkpoint(fastmae.MaskedAutoencoderViT(**CONFIG), path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_against_transformers_vitmae(norm_pix):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTMAEConfig(
        **TINY_VITMAE,
        image_size=8,
        patch_size=2,
        num_channels=3,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        norm_pix_loss=norm_pix,
        mask_ratio=0.75,
        attn_implementation="eager",
    )
    hf = transformers.ViTMAEForPreTraining(config).eval()
    ours = fastmae.MaskedAutoencoderViT(
        **CONFIG, norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=norm_pix
    )
    load_checkpoint(ours, hf.state_dict())
    imgs, noise = torch.randn(3, 3, 8, 8), torch.rand(3, 16)
    expected = hf(pixel_values=imgs, noise=noise)
    loss, pred, mask = ours(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask, expected.mask)
    assert_close(pred, expected.logits)
    assert_close(loss, expected.loss)
