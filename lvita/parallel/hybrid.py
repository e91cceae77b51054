"""Hybrid Ulysses x ring sequence parallelism: yunchang's ``LongContextAttention`` (USP).

Each rank holds a zigzag shard (lvita.parallel.sequence). yunchang all-to-alls q/k/v inside the
Ulysses group, (B, S/sp, H, D) -> (B, S/ring, H/ulysses, D), runs zigzag ring attention over the
ring group on that ring part, and all-to-alls back. The ring kernel is flash-attn's zigzag ring on
GPU when flash-attn is installed, else yunchang's zigzag ring on torch's CUDA flash op; on CPU it
is lvita's own (lvita.parallel.ring, on torch's CPU flash op with log-sum-exp), registered in
yunchang's kernel table so that CPU tests run the same yunchang code path as GPUs.

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
from lvita.parallel.ring import ring_attention
from lvita.parallel.sequence import shard_indices
from lvita.parallel.ulysses import UlyssesAttention, replicate_kv

CPU_KERNEL = "lvita_zigzag_cpu"


def _cpu_zigzag_ring(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0,
                     alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None, attn_type=None,
                     attn_processor=None):
    """yunchang's ring-kernel signature; q (B, S/ring, Hq', D), k/v (B, S/ring, Hkv', D) on ``group``."""
    if not causal or dropout_p or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("the CPU ring kernel does plain causal attention only")
    return ring_attention(q, k, v, group, softmax_scale)


RING_IMPL_DICT.setdefault(CPU_KERNEL, _cpu_zigzag_ring)


def _kernel() -> tuple[str, AttnType | None]:
    if not torch.cuda.is_available():
        return CPU_KERNEL, None
    try:
        import flash_attn  # noqa: F401

        return "zigzag", AttnType.FA
    except ImportError:
        return "zigzag", AttnType.TORCH_FLASH


class HybridAttention:
    def __init__(self, ulysses_group, ring_group, ulysses: int):
        impl, attn_type = _kernel()
        self.ulysses, self.ring = ulysses, dist.get_world_size(ring_group)
        self.sequence_rank = dist.get_rank(ring_group) * ulysses + dist.get_rank(ulysses_group)
        self.attn = LongContextAttention(ring_impl_type=impl, attn_type=attn_type)
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
