"""Attention as an injected function: the one place the decoder layers' attention runs.

transformers' Qwen2 layers look their attention kernel up by ``config._attn_implementation``;
our presets set it to ``"lvita"``, registered here. That entry calls ``module.lvita_attention``
when a parallel wrapper has set one (Ulysses, ring, ...) and :func:`local_attention` otherwise,
so the model stays single-device and sequence parallelism swaps the call from outside
(:func:`set_attention`).

Shapes: every attention function takes q (B, S, Hq, D), k and v (B, S, Hkv, D) and returns
(B, S, Hq, D). ``cu_seqlens`` (int32, over the flattened B*S tokens) marks packed samples that
must not attend to each other; None means plain causal attention per row. ``position_ids``
(B, S) come along for functions that see only a shard and must rebuild the boundaries.

Kernels: on CUDA in bf16/fp16, packed rows go through one varlen flash call (flash-attn's
``flash_attn_varlen_func`` when installed, else torch's ``torch.nn.attention.varlen.varlen_attn``);
elsewhere (CPU, fp32) SDPA runs once per packed sample: exact, but a Python loop and
O(max s_i^2) memory per sample. The CUDA branch has not yet been run on a GPU by the test suite.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

AttentionFn = Callable[..., torch.Tensor]


class TensorCache:
    """One value derived from one tensor, reused while that very tensor lives unmodified.

    The decoder layers of a forward pass share one ``position_ids`` tensor; what is derived from
    it (sample boundaries, rotary tables, gathered positions) is computed once, not per layer.
    Keyed by identity (a weak reference), in-place version and an extra key; never by address.
    """

    def __init__(self):
        self._ref, self._key, self._value = None, None, None

    def get(self, tensor: torch.Tensor, compute: Callable, extra=None):
        key = (tensor._version, extra)
        if self._ref is not None and self._ref() is tensor and self._key == key:
            return self._value
        self._value = compute()
        self._ref, self._key = weakref.ref(tensor), key
        return self._value


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Sample boundaries of packed rows: a sample starts wherever the position id is 0.

    position_ids (B, S) -> cu_seqlens (n_samples + 1,) int32 over the flattened B*S tokens.
    Rows always start a new sample, so preserved packing (0..S-1) gives one sample per row.
    """
    flat = position_ids.reshape(-1)
    starts = flat == 0
    starts[:: position_ids.shape[-1]] = True
    idx = torch.nonzero(starts).flatten().to(torch.int32)
    end = torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)
    return torch.cat([idx, end])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    # (B, S, H, D) -> SDPA's (B, H, S, D); GQA by repeating KV heads.
    rep = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.transpose(1, 2)


def _varlen_flash(qf, kf, vf, cu_seqlens: torch.Tensor, scale: float | None) -> torch.Tensor:
    # (T, Hq, D), (T, Hkv, D) flattened packed tokens -> (T, Hq, D), causal within each sample (CUDA).
    cu = cu_seqlens.to(device=qf.device, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(qf, kf, vf, cu, cu, longest, longest, scale=scale, window_size=(-1, 0),
                           enable_gqa=kf.shape[1] != qf.shape[1])
    return flash_attn_varlen_func(qf, kf, vf, cu, cu, longest, longest, softmax_scale=scale, causal=True)


def local_attention(q, k, v, *, cu_seqlens: torch.Tensor | None = None, scale: float | None = None,
                    position_ids: torch.Tensor | None = None):
    """Causal attention on one device; with cu_seqlens, each packed sample attends only to itself."""
    B, S = q.shape[:2]
    if cu_seqlens is None or cu_seqlens.numel() - 1 == B:
        return _sdpa(q, k, v, scale)
    qf, kf, vf = (t.reshape(B * S, *t.shape[2:]) for t in (q, k, v))
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return _varlen_flash(qf, kf, vf, cu_seqlens, scale).reshape(q.shape)
    bounds = cu_seqlens.tolist()
    outs = [
        _sdpa(qf[a:b].unsqueeze(0), kf[a:b].unsqueeze(0), vf[a:b].unsqueeze(0), scale).squeeze(0)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs).reshape(q.shape)


def _lvita_attention(module: nn.Module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     sliding_window=None, **kwargs):
    """transformers AttentionInterface entry: (B, H, S, D) in, (B, S, H, D) out."""
    fn: AttentionFn = getattr(module, "lvita_attention", None) or local_attention
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return fn(q, k, v, cu_seqlens=kwargs.get("cu_seqlens"), scale=scaling,
              position_ids=kwargs.get("position_ids")), None


AttentionInterface.register("lvita", _lvita_attention)


def set_attention(model: nn.Module, fn: AttentionFn | None) -> int:
    """Inject ``fn`` into every Qwen2 attention module of ``model``; returns how many were set."""
    n = 0
    for m in model.modules():
        if type(m).__name__ == "Qwen2Attention":
            m.lvita_attention = fn
            n += 1
    return n
