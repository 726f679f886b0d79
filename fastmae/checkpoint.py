"""Load MAE weights from wherever they come from; save them in the official format.

:func:`load_checkpoint` takes official training checkpoints (``{'model': ..., 'optimizer',
'epoch', 'scaler', 'args'}``), the released encoder-only ``mae_pretrain_vit_*.pth``, bare
state_dicts (DDP's ``module.`` prefix too), and Hugging Face ``ViTMAEForPreTraining`` /
``ViTMAEModel`` weights in the transformers 4.x and 5.x names, as a dict, a file or a directory
holding ``model.safetensors`` or ``pytorch_model.bin``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import warnings

import torch
import torch.nn.functional as F

__all__ = ["load_checkpoint", "save_checkpoint", "convert_hf_state_dict", "read_checkpoint"]

# Hugging Face layer sub-module names -> timm's, in transformers 4.x and 5.x.
_HF_LAYER_NAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",  # 4.x
    "attention.o_proj": "attn.proj",  # 5.x
    "intermediate.dense": "mlp.fc1",  # 4.x
    "output.dense": "mlp.fc2",  # 4.x
    "mlp.fc1": "mlp.fc1",  # 5.x
    "mlp.fc2": "mlp.fc2",  # 5.x
}
_HF_QKV = {  # the three projections stacked into timm's qkv, in this order
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
}
_HF_LAYER = re.compile(
    r"^(?:encoder\.layer|layers|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$"
)


def _is_hf(state: dict) -> bool:
    return any(
        k.startswith(
            ("vit.", "embeddings.", "encoder.layer.", "layers.", "decoder.decoder_layers.")
        )
        for k in state
    )


def convert_hf_state_dict(state: dict) -> dict:
    """Hugging Face ViTMAE weights (transformers 4.x or 5.x names) -> fastmae/official names.

    ``query``/``key``/``value`` (4.x) or ``q_proj``/``k_proj``/``v_proj`` (5.x) are stacked into
    ``qkv``. Keys that have no counterpart raise a ValueError naming them.
    """
    out, qkv, unknown = {}, {}, []
    for key, value in state.items():
        name = key.removeprefix("vit.")
        if name in _HF_TOP:
            out[_HF_TOP[name]] = value
        elif name.startswith("decoder.decoder_") and not name.startswith("decoder.decoder_layers"):
            out[name.removeprefix("decoder.")] = value  # decoder_embed, decoder_norm, decoder_pred
        elif match := _HF_LAYER.match(name):
            index, sub, kind = match.groups()
            blocks = "decoder_blocks" if name.startswith("decoder.") else "blocks"
            if sub in _HF_QKV:
                qkv.setdefault(f"{blocks}.{index}.attn.qkv.{kind}", [None] * 3)[_HF_QKV[sub]] = (
                    value
                )
            elif sub in _HF_LAYER_NAMES:
                out[f"{blocks}.{index}.{_HF_LAYER_NAMES[sub]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for key, parts in qkv.items():
        if any(part is None for part in parts):
            raise ValueError(f"Hugging Face checkpoint lacks one of query/key/value for {key}")
        out[key] = torch.cat(parts, dim=0)
    if unknown:
        raise ValueError(f"no MAE counterpart for these Hugging Face keys: {unknown[:8]}")
    return out


def read_checkpoint(source) -> dict:
    """A state_dict from a path (file or Hugging Face directory) or a dict, unwrapped and renamed
    to fastmae's keys. Pickled files load with ``weights_only=True``."""
    if isinstance(source, (str, os.PathLike)):
        source = load_file(os.fspath(source))
    if not isinstance(source, dict):
        raise TypeError(f"source must be a path or a dict, got {type(source).__name__}")
    state = source.get("model", source.get("state_dict", source))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the checkpoint holds no state_dict of tensors (looked under 'model' too)")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return convert_hf_state_dict(state) if _is_hf(state) else dict(state)


def training_args(source) -> dict:
    """The training arguments an official training checkpoint saved beside its weights (its
    ``args``: an argparse Namespace, or a dict), as a dict; ``{}`` where there are none (the
    released weights, Hugging Face files). ``source`` is a path or a loaded dict."""
    if isinstance(source, (str, os.PathLike)):
        source = load_file(os.fspath(source))
    saved = source.get("args") if isinstance(source, dict) else None
    if isinstance(saved, argparse.Namespace):
        return dict(vars(saved))
    return dict(saved) if isinstance(saved, dict) else {}


def load_file(path: str) -> dict:
    """What a checkpoint file (or a Hugging Face folder) holds, as a dict; pickled files load
    with ``weights_only=True`` (official training checkpoints' argparse Namespace allowed)."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                return load_file(os.path.join(path, name))
        raise FileNotFoundError(
            f"{path} holds neither model.safetensors nor pytorch_model.bin; it holds "
            f"{sorted(os.listdir(path))}"
        )
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a checkpoint")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file as load_safetensors
        except ImportError as error:
            raise ImportError(f"reading {path} needs the safetensors package") from error
        try:
            return load_safetensors(path)
        except Exception as error:  # safetensors' own error type differs between versions
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
    with open(path, "rb") as file:
        head = file.read(4)
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol 2+).
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise ValueError(
            f"{path} is not a checkpoint: neither a zip archive nor a pickle as torch.save "
            f"writes (it starts with {head!r})"
        )
    # Official training checkpoints pickle an argparse.Namespace: allow exactly that.
    with _allow_namespace():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            refused = _REFUSED_GLOBAL.search(str(error))
            if refused is None:
                raise ValueError(f"{path} is corrupt or truncated: {_first_line(error)}") from None
            raise ValueError(
                f"{path} holds a pickled {refused.group(1)}, which load_checkpoint refuses to "
                "unpickle; only if you trust the file, load it with torch.load(path, "
                "weights_only=False), which runs code from the file, and pass the dict here"
            ) from None
        except (RuntimeError, OSError, EOFError, KeyError, ValueError) as error:
            raise ValueError(f"{path} is corrupt or truncated: {_first_line(error)}") from None


def _allow_namespace():
    """A context allowing argparse.Namespace in weights_only loads; torch 2.4 has no context
    manager for it, only the process-wide allow-list, which then gets that one class."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])
    return contextlib.nullcontext()


# torch's refusal of a global: "Unsupported global: GLOBAL a.b ..." (torch <= 2.12) or
# "Trying to load unsupported GLOBAL a.b whose module ..." (torch 2.13).
_REFUSED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else 'no detail'}"


def _is_decoder_key(key: str) -> bool:
    return key.startswith("decoder") or key == "mask_token"


def _fit_position_embedding(key: str, value: torch.Tensor, model) -> torch.Tensor:
    """Bicubic interpolation of a square patch grid to the model's grid, as official fine-tuning."""
    target = getattr(model, key)
    rows, cols = model.patch_embed.grid_size
    source_tokens = value.shape[1] - 1
    side = int(round(source_tokens**0.5))
    if value.dim() != 3 or value.shape[2] != target.shape[2] or side * side != source_tokens:
        raise ValueError(
            f"cannot fit {key} of shape {list(value.shape)} to the model's {list(target.shape)}"
        )
    warnings.warn(
        f"{key}: interpolating the position embedding from a {side}x{side} to a {rows}x{cols} "
        "patch grid (bicubic)",
        stacklevel=3,
    )
    grid = value[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(value.dtype)
    return torch.cat([value[:, :1], grid], dim=1)


def load_checkpoint(model, source, strict: bool | None = None):
    """Load MAE weights into ``model`` (fastmae or reference, image or video); returns torch's
    ``(missing_keys, unexpected_keys)``. Video weights are mae_st's ``{'model': state_dict}``.

    ``strict=None`` (default) loads a full checkpoint strictly and an encoder-only one (the
    released ``mae_pretrain_vit_*.pth``) with its decoder keys reported as missing; any other
    missing or unexpected key raises. A position embedding trained on another square grid is
    interpolated (with a warning; image models only); any other shape mismatch raises a
    ValueError naming the key.
    """
    state = read_checkpoint(source)
    expected = model.state_dict()
    image_model = isinstance(getattr(model.patch_embed, "proj", None), torch.nn.Conv2d)
    for key in ("pos_embed", "decoder_pos_embed") if image_model else ():
        if key in state and key in expected and state[key].shape != expected[key].shape:
            state[key] = _fit_position_embedding(key, state[key], model)
    for key, value in state.items():
        if key in expected and value.shape != expected[key].shape:
            raise ValueError(
                f"shape mismatch for {key}: checkpoint {list(value.shape)}, "
                f"model {list(expected[key].shape)}"
            )
    result = model.load_state_dict(state, strict=bool(strict))
    if strict is None:
        missing = [k for k in result.missing_keys if not _is_decoder_key(k)]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"checkpoint does not fit the model: missing {missing[:8]}, "
                f"unexpected {result.unexpected_keys[:8]} (pass strict=False to load anyway)"
            )
    return result


def save_checkpoint(model, path, **extra) -> None:
    """Save as the official training script does, ``{'model': state_dict, **extra}`` (extra:
    ``optimizer=..., epoch=..., scaler=..., args=...``), loadable by facebookresearch/mae."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    torch.save({"model": model.state_dict(), **extra}, path)
