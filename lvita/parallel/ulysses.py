"""Ulysses sequence parallelism: attention over a sequence split across a group of ranks.

Each rank holds a contiguous shard of the sequence. DeepSpeed's ``DistributedAttention``
all-to-alls q/k/v from (B, S/sp, H, D) to (B, S, H/sp, D), the local kernel attends over the whole
sequence for its heads, and a last all-to-all returns (B, S/sp, H, D). Packed samples stay apart:
the shard's position ids are all-gathered and the sample boundaries (cu_seqlens) rebuilt from them.
KV heads fewer than the degree are replicated first (Qwen2.5-14B has 8 KV heads; yunchang does
not replicate), so every rank gets the KV head its query heads use.

    set_attention(model, UlyssesAttention(topology.sequence_group, sp))
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.sequence.layer import DistributedAttention

from lvita.model.attention import TensorCache, cu_seqlens_from_position_ids, local_attention


def _local(q, k, v, cu_seqlens=None, scale=None):
    return local_attention(q, k, v, cu_seqlens=cu_seqlens, scale=scale)


def replicate_kv(k: torch.Tensor, v: torch.Tensor, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, Hkv, D) with Hkv < degree -> (B, S, degree, D): each KV head repeated so that, after
    the head scatter, every rank holds the KV head its query heads use. Unchanged otherwise."""
    hkv = k.shape[2]
    if hkv >= degree:
        return k, v
    return k.repeat_interleave(degree // hkv, dim=2), v.repeat_interleave(degree // hkv, dim=2)


class UlyssesAttention:
    def __init__(self, group, degree: int):
        self.group, self.degree = group, degree
        self.attn = DistributedAttention(_local, group, scatter_idx=2, gather_idx=1)
        self._boundaries = TensorCache()  # one all-gather per forward pass, not one per layer

    def gather_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(B, S/sp) on each rank of the group -> (B, S), shards in rank order."""
        parts = [torch.empty_like(position_ids) for _ in range(self.degree)]
        dist.all_gather(parts, position_ids.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def __call__(self, q, k, v, *, cu_seqlens=None, scale=None, position_ids=None):
        # q (B, S/sp, Hq, D), k/v (B, S/sp, Hkv, D) -> (B, S/sp, Hq, D); group: the sequence group.
        if position_ids is None:
            raise ValueError("Ulysses attention needs position_ids to find packed-sample boundaries")
        k, v = replicate_kv(k, v, self.degree)
        cu = self._boundaries.get(position_ids,
                                  lambda: cu_seqlens_from_position_ids(self.gather_positions(position_ids)))
        return self.attn(q.contiguous(), k.contiguous(), v.contiguous(), 0, None, cu_seqlens=cu, scale=scale)
