"""Hybrid Ulysses x ring sequence parallelism: yunchang's ``LongContextAttention`` (USP).

Each rank holds a zigzag shard (lvita.parallel.sequence). yunchang all-to-alls q/k/v inside the
Ulysses group, (B, S/sp, H, D) -> (B, S/ring, H/ulysses, D), runs zigzag ring attention over the
ring group on that ring part, and all-to-alls back. The ring kernel is yunchang's flash-attn zigzag
ring on GPUs where flash-attn imports (decided by importing the functions yunchang calls, so a
build with the wrong ABI counts as absent); everywhere else it is lvita's own (lvita.parallel.ring:
torch's CPU flash op on CPU, torch's CUDA flash or memory-efficient op on GPUs, exact backward,
fp32 log-sum-exp merge), registered in yunchang's kernel table so that CPU tests run the same
yunchang code path as GPUs. yunchang's own fallback (AttnType.TORCH_FLASH) has no backward.
The choice is printed once per process (rank 0) and kept in ``HybridAttention.kernel``.

Only one causal sequence per micro-batch: ring kernels here have no varlen path, so packing
with reset position ids is refused at validation (use Ulysses alone for reset-packed stages).
KV heads fewer than the Ulysses degree are replicated first, as in lvita.parallel.ulysses.

    topo = build_topology(pipeline, ulysses=2, ring=2)   # hands the subgroups to yunchang
    set_attention(model, HybridAttention(topo.ulysses_group, topo.ring_group, 2))
    set_attention(model, sequence_attention(topo))        # the same, chosen from the topology

:func:`sequence_attention` is where training and context-parallel generation pick their attention:
Ulysses alone (lvita.parallel.ulysses) when ring is 1, this hybrid otherwise.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from yunchang import LongContextAttention
from yunchang.hybrid.utils import RING_IMPL_DICT
from yunchang.kernels import AttnType

from lvita.model.attention import TensorCache
from lvita.parallel.internals import check
from lvita.parallel.ring import ring_attention
from lvita.parallel.sequence import shard_indices
from lvita.parallel.ulysses import UlyssesAttention, replicate_kv

LVITA_KERNEL = "lvita_zigzag"  # one kernel for CPU and CUDA tensors (lse_kernels picks by device)


def _lvita_zigzag_ring(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0,
                       alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                       attn_type=None, attn_processor=None):
    """yunchang's ring-kernel signature; q (B, S/ring, Hq', D), k/v (B, S/ring, Hkv', D) on ``group``."""
    if not causal or dropout_p or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("lvita's ring kernel does plain causal attention only")
    return ring_attention(q, k, v, group, softmax_scale)


RING_IMPL_DICT.setdefault(LVITA_KERNEL, _lvita_zigzag_ring)


def flash_attn_error() -> str | None:
    """None when flash-attn's ring functions import (as yunchang needs them), else why not."""
    try:
        from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward  # noqa: F401
        from yunchang.globals import HAS_FLASH_ATTN
    except Exception as e:  # noqa: BLE001 - a wrong-ABI build raises ImportError or OSError
        return f"{type(e).__name__}: {e}"
    return None if HAS_FLASH_ATTN else "yunchang could not import flash-attn"


def _kernel() -> tuple[str, AttnType | None, str]:
    """(yunchang ring_impl_type, attn_type, what to tell the user)."""
    if not torch.cuda.is_available():
        return LVITA_KERNEL, None, "lvita zigzag ring on torch's CPU flash op"
    why = flash_attn_error()
    if why is None:
        return "zigzag", AttnType.FA, "yunchang zigzag ring on flash-attn"
    return LVITA_KERNEL, None, f"lvita zigzag ring on torch's CUDA flash/memory-efficient ops (no flash-attn: {why})"


_told: set[str] = set()


class HybridAttention:
    def __init__(self, ulysses_group, ring_group, ulysses: int):
        impl, attn_type, self.kernel = _kernel()
        if self.kernel not in _told and dist.get_rank() == 0:
            print(f"lvita: ring attention kernel: {self.kernel}", flush=True)
            _told.add(self.kernel)
        self.ulysses, self.ring = ulysses, dist.get_world_size(ring_group)
        self.sequence_rank = dist.get_rank(ring_group) * ulysses + dist.get_rank(ulysses_group)
        self.attn = LongContextAttention(ring_impl_type=impl, attn_type=attn_type)
        check(self.attn, "yunchang_attention", "hybrid Ulysses x ring attention")  # set, not silently added
        self.attn.ulysses_pg, self.attn.ring_pg = ulysses_group, ring_group  # explicit, not the singleton
        self._checked = TensorCache()

    def _check_one_sequence(self, position_ids: torch.Tensor) -> bool:
        """Preserved packing gives position ids 0..S-1, so a shard's ids are its token indices."""
        n = position_ids.shape[1]
        want = shard_indices(n * self.ulysses * self.ring, self.sequence_rank, self.ulysses, self.ring)
        if position_ids.shape[0] != 1 or not torch.equal(position_ids[0].cpu(), want):
            raise ValueError("ring attention runs one causal sequence per micro-batch (position ids "
                             "0..S-1, zigzag-sharded); packing with reset position ids needs parallel.ring=1")
        return True

    def __call__(self, q, k, v, *, cu_seqlens=None, scale=None, position_ids=None):
        # q (B, S/sp, Hq, D), k/v (B, S/sp, Hkv, D) zigzag shards -> (B, S/sp, Hq, D).
        if position_ids is not None:  # never attend across packed samples silently
            self._checked.get(position_ids, lambda: self._check_one_sequence(position_ids))
        k, v = replicate_kv(k, v, self.ulysses)
        return self.attn(q.contiguous(), k.contiguous(), v.contiguous(), softmax_scale=scale, causal=True)


def sequence_attention(topology):
    """The attention function for ``set_attention``: Ulysses alone (DeepSpeed's all-to-all) when
    ring is 1, yunchang's hybrid Ulysses x zigzag ring otherwise; None without sequence parallelism."""
    if topology.ring > 1:
        return HybridAttention(topology.ulysses_group, topology.ring_group, topology.ulysses)
    if topology.ulysses > 1:
        return UlyssesAttention(topology.sequence_group, topology.ulysses)
    return None
