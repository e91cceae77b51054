"""Attention blocks that return their log-sum-exp: one forward/backward pair per device backend.

Owns every call of torch's private SDPA ops for the ring kernel (lvita.parallel.ring), so that the
ring's code stays device-free and a signature slip is confined to, and tested in, one place:

- ``cpu``: ``_scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``);
- ``cuda-flash``: ``_scaled_dot_product_flash_attention`` (+ ``_backward``), fp16/bf16 on sm80+,
  head_dim a multiple of 8 up to 256;
- ``cuda-efficient``: ``_scaled_dot_product_efficient_attention`` (+ ``_backward``), any other
  CUDA case (fp32, older GPUs). Its LSE is padded to a multiple of 32 queries on CUDA (not on
  ROCm); :func:`_efficient_fwd` cuts it to S_q and :func:`_efficient_bwd` pads it back.

Every pair works on (B, H, S, D) contiguous tensors with as many K/V heads as query heads:

    out, lse, state = kernel.fwd(q, k, v, causal, scale)   # out (B, H, Sq, D) q's dtype, lse (B, H, Sq) fp32
    dq, dk, dv = kernel.bwd(dout, q, k, v, out, lse, state, causal, scale)

``bwd`` takes any (out, lse) of the rows of q, in particular the ring's merged output and merged
LSE, which makes per-block gradients exact. ``state`` is the forward's RNG state; dropout is
always 0 here, so any block's state serves every block's backward. The schemas (argument order
and arity) are those of torch 2.6 to 2.13 (unchanged positions; 2.7 renamed the flash RNG outputs
only); tests/test_ring_cuda.py checks the CUDA calls against the ops' meta kernels on CPU.
Trade-off: private aten ops, not a public API; the price of exact ring backward without flash-attn.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

aten = torch.ops.aten  # looked up at call time, so that a test can route the calls


class Kernel(NamedTuple):
    name: str
    fwd: Callable
    bwd: Callable


def _cpu_fwd(q, k, v, causal: bool, scale: float):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse, None


def _cpu_bwd(dout, q, k, v, out, lse, state, causal: bool, scale: float):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal,
                                                                     scale=scale)


def _flash_fwd(q, k, v, causal: bool, scale: float):
    # -> (out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug_attn_mask)
    r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return r[0], r[1], (r[6], r[7])


def _flash_bwd(dout, q, k, v, out, lse, state, causal: bool, scale: float):
    # dense inputs: no cum_seq tensors; max_q / max_k are the block's lengths
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, state[0], state[1], scale=scale)
    return dq, dk, dv


def _lse_rows(s_q: int) -> int:
    """Rows of the memory-efficient kernel's LSE for s_q queries: padded to 32 on CUDA, not on ROCm."""
    return s_q if torch.version.hip else -(-s_q // 32) * 32


def _efficient_fwd(q, k, v, causal: bool, scale: float):
    # -> (out, log_sumexp (B, H, rows), philox_seed, philox_offset)
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                          scale=scale)
    return out, lse[..., : q.shape[2]], (seed, offset)


def _efficient_bwd(dout, q, k, v, out, lse, state, causal: bool, scale: float):
    padded = lse.new_zeros(*lse.shape[:2], _lse_rows(q.shape[2]))
    padded[..., : q.shape[2]] = lse
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, padded, state[0], state[1], 0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv


CPU = Kernel("cpu", _cpu_fwd, _cpu_bwd)
CUDA_FLASH = Kernel("cuda-flash", _flash_fwd, _flash_bwd)
CUDA_EFFICIENT = Kernel("cuda-efficient", _efficient_fwd, _efficient_bwd)


def flash_fits(dtype: torch.dtype, head_dim: int, capability: tuple[int, int]) -> bool:
    """Whether torch's CUDA flash kernel takes these inputs (else the memory-efficient one)."""
    return dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256 and capability >= (8, 0)


def kernel_for(q: torch.Tensor) -> Kernel:
    """The pair for q's device, dtype and head size (B, H, S, D)."""
    if q.device.type == "cpu":
        return CPU
    if q.device.type != "cuda":
        raise NotImplementedError(f"no log-sum-exp attention kernel for device {q.device.type}")
    return CUDA_FLASH if flash_fits(q.dtype, q.shape[-1], torch.cuda.get_device_capability(q.device)) \
        else CUDA_EFFICIENT
