"""The InternViT vision tower of the released Long-VITA layout, written by lvita.

Owns ``InternVisionModel`` and its blocks under the parameter names of OpenGVLab's InternViT (the
names a released Long-VITA state dict holds under ``model.vision_model.``):
``embeddings.{class_embedding, patch_embedding, position_embedding}``, per layer
``encoder.layers.N.{attn.qkv (q, k, v fused by rows), attn.proj, attn.q_norm/k_norm (with
qk_normalization), mlp.fc1, mlp.fc2, norm1, norm2, ls1, ls2}``. No final norm: the output is the
last layer's hidden states, CLS token first (Long-VITA drops it).

Pre-norm blocks: ``x + ls1 * attn(norm1(x))`` then ``x + ls2 * mlp(norm2(x))``; attention is
bidirectional, through torch's ``scaled_dot_product_attention`` (flash kernels on GPU when they
apply; the same maths as InternViT's eager and flash-attn paths). Dropout and drop-path are
identities at the released rates (0). A tile whose patch grid differs from the configured one gets
the position embeddings resized bicubically, as InternViT does.

Self-contained: imports torch and transformers only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_intern_vit import InternVisionConfig


class InternRMSNorm(nn.Module):
    """RMSNorm in float32 (InternViT's ``rms_norm`` norm type and its q/k normalisation)."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _norm(config: InternVisionConfig, size: int) -> nn.Module:
    if config.norm_type == "rms_norm":
        return InternRMSNorm(size, config.layer_norm_eps)
    return nn.LayerNorm(size, eps=config.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    """Patch convolution, a learned CLS token and learned positions (CLS position first)."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.dim, self.patch_size = config.hidden_size, config.patch_size
        self.grid = config.image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, self.dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, self.dim, kernel_size=self.patch_size,
                                         stride=self.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, self.dim))

    def _patch_positions(self, height: int, width: int) -> torch.Tensor:
        pos = self.position_embedding[:, 1:]
        if (height, width) == (self.grid, self.grid):
            return pos
        grid = pos.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, height * width).permute(0, 2, 1).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (n, dim, h, w)
        n, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(n, 1, -1).to(dtype)
        pos = torch.cat([self.position_embedding[:, :1], self._patch_positions(height, width)], dim=1)
        return torch.cat([cls, patches], dim=1) + pos.to(dtype)


class InternAttention(nn.Module):
    """Bidirectional multi-head attention with a fused qkv projection."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.dim, self.heads = config.hidden_size, config.num_attention_heads
        if self.dim % self.heads:
            raise ValueError(f"InternViT: hidden_size {self.dim} is not divisible by num_attention_heads {self.heads}")
        self.qkv = nn.Linear(self.dim, 3 * self.dim, bias=config.qkv_bias)
        self.qk_normalization = bool(config.qk_normalization)
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.dim, config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.dim, config.layer_norm_eps)
        self.proj = nn.Linear(self.dim, self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, s, 3, self.dim).unbind(2)  # each (n, s, dim), heads inside
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(n, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head dim), no mask
        return self.proj(out.transpose(1, 2).reshape(n, s, self.dim))


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.attn, self.mlp = InternAttention(config), InternMLP(config)
        self.norm1, self.norm2 = _norm(config, config.hidden_size), _norm(config, config.hidden_size)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class InternVisionModel(nn.Module):
    """``pixel_values`` (tiles, 3, H, W) -> ``last_hidden_state`` (tiles, 1 + patches, hidden), CLS first."""

    main_input_name = "pixel_values"

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, **_) -> BaseModelOutputWithPooling:
        if pixel_values.dim() != 4:
            raise ValueError(f"InternViT: pixel_values must be (tiles, channels, height, width), "
                             f"got {tuple(pixel_values.shape)}")
        hidden = self.encoder(self.embeddings(pixel_values))
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=hidden[:, 0])
