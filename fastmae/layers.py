"""Vision Transformer building blocks shared by the reference MAE and the fused drop-in.

Parameter names follow timm (``patch_embed.proj``, ``blocks.i.attn.qkv``, ``mlp.fc1``...) so that
state_dicts are interchangeable with facebookresearch/mae. Sub-modules are created in timm's
order, so that the same seed consumes the random stream the same way as the official model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastmae import _checks, _unchecked
from fastmae._checks import to_2tuple


def project_patches(conv, imgs, ids_keep=None, cls_token=None, pos_embed=None):
    """The forward of a patch embedding's convolution (kernel = stride = the patch), and its
    fused form.

    - ``ids_keep`` None: the convolution, ``[N, C, (T,) H, W]`` -> ``[N, D, (t,) h, w]``.
    - ``ids_keep [N, K]``: only the kept patches, embedded by one gather + GEMM, plus their
      positions ``pos_embed[S + id]``, after the cls token (``cls_token`` + ``pos_embed[0]``,
      S = 1) when ``cls_token`` is given: ``[N, S+K, D]``. ``pos_embed`` is ``[1, S+L, D]`` or
      ``[S+L, D]``.

    The kernel reads the weight here, in the convolution's own forward, because a wrapper that
    acts around a module's forward (FSDP2 gathers sharded parameters there) only makes the
    weight whole for that forward.
    """
    if ids_keep is None:
        return conv._conv_forward(imgs, conv.weight, conv.bias)
    _checks.check_dtype_matches(imgs, conv.weight)
    return _unchecked.embed_visible_patches(
        imgs, ids_keep, conv.weight, conv.bias, cls_token, pos_embed
    )


class PatchConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state_dict) whose forward also takes the fused form
    of :func:`project_patches`."""

    forward = project_patches


class PatchConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose forward also takes the fused form of :func:`project_patches`."""

    forward = project_patches


def takes_kept_patches(patch_embed: nn.Module) -> bool:
    """Whether ``patch_embed(imgs, ids_keep, ...)`` runs the fused form: a fastmae
    :class:`PatchEmbed`/:class:`PatchEmbed3d` (or the class FSDP2 derives from one) with its
    own forward and projection, not a custom patch embedding."""
    return type(patch_embed).forward in (PatchEmbed.forward, PatchEmbed3d.forward) and (
        type(getattr(patch_embed, "proj", None)).forward is project_patches
    )


class PatchEmbed(nn.Module):
    """Image to patch tokens: a stride-``p`` convolution, flattened to ``[N, L, D]``.

    Accepts an int or ``(H, W)`` for ``img_size`` and ``patch_size``; every side must divide.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = to_2tuple(img_size, "img_size")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        for side, (size, patch) in zip(("height", "width"), zip(self.img_size, self.patch_size)):
            if size % patch:
                raise ValueError(
                    f"image {side} {size} is not divisible by the patch {side} {patch} "
                    f"(img_size={self.img_size}, patch_size={self.patch_size})"
                )
        self.grid_size = (
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = PatchConv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )

    def forward(self, imgs, ids_keep=None, cls_token=None, pos_embed=None) -> torch.Tensor:
        """imgs ``[N, C, H, W]`` -> tokens ``[N, L, D]`` in row-major patch order; with
        ``ids_keep``, the kept patches' encoder input ``[N, 1+K, D]`` (see
        :func:`project_patches`)."""
        if ids_keep is not None:
            return self.proj(imgs, ids_keep, cls_token, pos_embed)
        return self.proj(imgs).flatten(2).transpose(1, 2)


class PatchEmbed3d(nn.Module):
    """Video to tubelet tokens, as facebookresearch/mae_st's ``video_vit.PatchEmbed``: a Conv3d
    of kernel and stride ``(t_patch_size, p, p)``; ``[N, C, T, H, W]`` -> ``[N, T/u, h*w, D]``.

    Its attributes are mae_st's: ``input_size (t, h, w)``, ``img_size``, ``patch_size``,
    ``frames``, ``t_patch_size``, ``num_patches``, ``grid_size`` (h), ``t_grid_size``.
    """

    def __init__(
        self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, frames=32, t_patch_size=4
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size, "img_size")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        for name, value in (("in_chans", in_chans), ("frames", frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(t_patch_size, bool) or not isinstance(t_patch_size, int) or t_patch_size < 1:
            raise ValueError(f"t_patch_size must be a positive int, got {t_patch_size!r}")
        if frames % t_patch_size:
            raise ValueError(f"num_frames {frames} is not divisible by t_patch_size {t_patch_size}")
        for side, (size, patch) in zip(("height", "width"), zip(self.img_size, self.patch_size)):
            if size % patch:
                raise ValueError(
                    f"image {side} {size} is not divisible by the patch {side} {patch}"
                )
        grid_h, grid_w = (size // patch for size, patch in zip(self.img_size, self.patch_size))
        self.input_size = (frames // t_patch_size, grid_h, grid_w)
        self.frames, self.t_patch_size, self.in_chans = frames, t_patch_size, in_chans
        self.num_patches = self.input_size[0] * grid_h * grid_w
        self.grid_size = grid_h
        self.t_grid_size = self.input_size[0]
        kernel = (t_patch_size, *self.patch_size)
        self.proj = PatchConv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x, ids_keep=None, cls_token=None, pos_embed=None) -> torch.Tensor:
        """x ``[N, C, T, H, W]`` -> tokens ``[N, T/u, h*w, D]``; with ``ids_keep``, the kept
        tubelets' encoder input ``[N, S+K, D]`` (see :func:`project_patches`)."""
        if ids_keep is not None:
            return self.proj(x, ids_keep, cls_token, pos_embed)
        return self.proj(x).flatten(3).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (qkv bias on), as timm's; or, with
    ``separate_qkv``, three projections ``q``, ``k``, ``v`` as mae_st's video blocks.

    ``fused_attn`` (default True) computes softmax(q kᵀ · scale) v with
    ``F.scaled_dot_product_attention``; False spells it out as the official timm 0.3.2 block
    does (``(q @ k.transpose(-2, -1)) * scale``, softmax, ``@ v``), materialising the
    ``[N, heads, T, T]`` scores. Same function, same parameters; see :func:`set_fused_attn`.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, separate_qkv=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        self.separate_qkv = separate_qkv
        if separate_qkv:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.k = nn.Linear(dim, dim, bias=qkv_bias)
            self.v = nn.Linear(dim, dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, T, D]`` -> ``[N, T, D]``; softmax scale ``head_dim**-0.5``."""
        batch, tokens, width = x.shape
        if self.separate_qkv:
            heads = (batch, tokens, self.num_heads, self.head_dim)
            q, k, v = (f(x).reshape(heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        else:
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, width))


def set_fused_attn(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch every :class:`Attention` in ``model`` between SDPA (True, the default) and the
    official timm 0.3.2 arithmetic (False), as timm's ``fused_attn`` flag; returns ``model``."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = bool(enabled)
    return model


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_layer=nn.LayerNorm,
        qkv_bias: bool = True,
        separate_qkv: bool = False,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, separate_qkv)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """``[M]`` positions -> ``[M, embed_dim]`` float64: sines then cosines, omega in float64."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even width, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int], cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos embedding for a ``(rows, cols)`` patch grid, as MAE's util/pos_embed.

    Returns ``[rows*cols (+1), embed_dim]`` float64; the first half of the channels encodes the
    column index, the second half the row index; the optional cls row is zeros.
    """
    if embed_dim % 4:
        raise ValueError(
            f"2-D sin-cos position embedding needs a width divisible by 4, got {embed_dim}"
        )
    rows, cols = grid_size
    grid_cols, grid_rows = np.meshgrid(
        np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32)
    )
    emb = np.concatenate(
        [sincos_1d(embed_dim // 2, grid_cols), sincos_1d(embed_dim // 2, grid_rows)], axis=1
    )
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb
