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

Kernels for packed rows (:func:`packed_kernels` says which this process has, best first): on CUDA
in bf16/fp16 one varlen flash call, flash-attn's ``flash_attn_varlen_func`` when it imports, else
torch's ``torch.nn.attention.varlen.varlen_attn`` when it takes ``scale`` and ``window_size``
(torch >= 2.11; ``enable_gqa`` is passed where it exists, 2.12+); otherwise (CPU, fp32, older
torch) SDPA once per packed sample ("sdpa"): exact, but a Python loop. Validation
(lvita.config.validate) refuses packed stages when none is available, naming the torch version.
The longest sample (``max_seqlen``, a device sync) and the sample bounds are computed once per
``cu_seqlens`` tensor, which every layer of a forward pass (and its recompute) shares.
Tested with torch 2.6 to 2.13 signatures (faked on CPU); the CUDA kernels need a GPU run.
"""
from __future__ import annotations

import functools
import inspect
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


def _flash_attn_varlen(qf, kf, vf, cu, longest: int, scale):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(qf, kf, vf, cu, cu, longest, longest, softmax_scale=scale, causal=True)


def _torch_varlen(qf, kf, vf, cu, longest: int, scale):
    from torch.nn.attention.varlen import varlen_attn

    extra = {"enable_gqa": kf.shape[1] != qf.shape[1]} if "enable_gqa" in _varlen_params() else {}
    return varlen_attn(qf, kf, vf, cu, cu, longest, longest, scale=scale, window_size=(-1, 0), **extra)


def _varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return _parameters(varlen_attn)


@functools.lru_cache(maxsize=8)
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _has_flash_attn() -> bool:
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # noqa: BLE001 - a build with the wrong ABI raises ImportError or OSError
        return False
    return True


def _has_torch_varlen() -> bool:
    """torch's varlen_attn with the keyword arguments lvita passes: scale, window_size (torch >= 2.11;
    2.10's takes is_causal and no scale, before 2.10 there is none)."""
    try:
        return {"scale", "window_size"} <= _varlen_params()
    except ImportError:
        return False


def _has_sdpa() -> bool:
    return hasattr(F, "scaled_dot_product_attention")


# name -> (probe, kernel on flattened packed tokens, CUDA only)
_PACKED = {"flash_attn": (_has_flash_attn, _flash_attn_varlen, True),
           "torch_varlen": (_has_torch_varlen, _torch_varlen, True),
           "sdpa": (_has_sdpa, None, False)}


@functools.lru_cache(maxsize=None)
def packed_kernels() -> tuple[str, ...]:
    """Kernels that keep packed samples apart in this process, best first: a subset of
    ("flash_attn", "torch_varlen", "sdpa"); the first two are CUDA bf16/fp16 only."""
    return tuple(name for name, (probe, _, _) in _PACKED.items() if probe())


_LONGEST, _BOUNDS = TensorCache(), TensorCache()


def max_seqlen(cu_seqlens: torch.Tensor) -> int:
    """Longest sample of ``cu_seqlens``: one device sync per cu_seqlens tensor, not per layer."""
    return _LONGEST.get(cu_seqlens, lambda: int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))


def packed_attention(qf, kf, vf, cu_seqlens: torch.Tensor, scale: float | None, kernel: str) -> torch.Tensor:
    """(T, Hq, D), (T, Hkv, D) flattened packed tokens -> (T, Hq, D), causal within each sample."""
    if kernel == "sdpa":
        bounds = _BOUNDS.get(cu_seqlens, cu_seqlens.tolist)
        return torch.cat([_sdpa(qf[a:b].unsqueeze(0), kf[a:b].unsqueeze(0), vf[a:b].unsqueeze(0), scale).squeeze(0)
                          for a, b in zip(bounds[:-1], bounds[1:])])
    cu = cu_seqlens.to(device=qf.device, dtype=torch.int32)
    return _PACKED[kernel][1](qf, kf, vf, cu, max_seqlen(cu_seqlens), scale)


_told: list[str] = []


def _packed_kernel(q: torch.Tensor) -> str:
    fused = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    for name in packed_kernels():
        if fused or not _PACKED[name][2]:
            if fused and name == "sdpa" and not _told:
                _told.append(name)
                print(f"lvita: packed samples on CUDA run one SDPA call per sample: torch {torch.__version__} has no "
                      f"varlen_attn with scale/window_size (torch >= 2.11) and flash-attn does not import", flush=True)
            return name
    raise RuntimeError(f"no attention kernel keeps packed samples apart with torch {torch.__version__} on "
                       f"{q.device.type} {q.dtype}: install flash-attn or torch >= 2.11, or set "
                       f"data.reset_position_ids=false")


def local_attention(q, k, v, *, cu_seqlens: torch.Tensor | None = None, scale: float | None = None,
                    position_ids: torch.Tensor | None = None):
    """Causal attention on one device; with cu_seqlens, each packed sample attends only to itself."""
    B, S = q.shape[:2]
    if cu_seqlens is None or cu_seqlens.numel() - 1 == B:
        return _sdpa(q, k, v, scale)
    qf, kf, vf = (t.reshape(B * S, *t.shape[2:]) for t in (q, k, v))
    return packed_attention(qf, kf, vf, cu_seqlens, scale, _packed_kernel(q)).reshape(q.shape)


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
