"""Decoding against a KV cache sharded over the sequence-parallel ranks (context-parallel generation).

Owns the communication of one decode step. After a context-parallel prefill every rank keeps the
keys and values of its own shard of the prompt (any order: attention over a set of keys does not
care); each new token's key/value is stored by one rank, round robin, so the cache stays evenly
spread and no rank ever holds the whole context. For a new token every rank computes

    partial_r = softmax(q K_r^T) V_r   and   lse_r = logsumexp(q K_r^T)     over its own keys,

then the ranks all-gather ``(partial_r, lse_r)`` and merge them exactly:

    out = sum_r exp(lse_r - logsumexp_r(lse_r)) * partial_r

which is attention over the union of the shards (the flash-attention / ring-attention merge).
A query is one token, so the scores are (B, H, 1, S_r): memory linear in the local cache.

    out = sharded_decode_attention(q, k_local, v_local, group)    # q (B, 1, Hq, D)

Trade-off: one all-gather of (B, 1, Hq, D + 1) per layer and token instead of moving keys; on the
paper's 1M-token prompts the alternative (gathering the cache) would not fit on one device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def local_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Tq, Hq, D), k/v (B, S, Hkv, D), every key visible -> (out (B, Tq, Hq, D) fp32, lse (B, Tq, Hq) fp32).

    An empty shard (S = 0) gives out 0 and lse -inf, which the merge weighs as nothing."""
    B, Tq, Hq, D = q.shape
    if k.shape[1] == 0:
        return q.new_zeros(B, Tq, Hq, D, dtype=torch.float32), q.new_full((B, Tq, Hq), float("-inf"),
                                                                          dtype=torch.float32)
    rep = Hq // k.shape[2]
    kf = k.float().repeat_interleave(rep, dim=2) if rep > 1 else k.float()
    vf = v.float().repeat_interleave(rep, dim=2) if rep > 1 else v.float()
    scores = torch.einsum("bqhd,bshd->bhqs", q.float(), kf) * scale  # (B, Hq, Tq, S)
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, Tq)
    out = torch.einsum("bhqs,bshd->bqhd", torch.softmax(scores, dim=-1), vf)
    return out, lse.transpose(1, 2)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """outs (R, B, Tq, H, D), lses (R, B, Tq, H) from R disjoint key sets -> (B, Tq, H, D)."""
    total = torch.logsumexp(lses, dim=0)  # (B, Tq, H)
    weights = torch.exp(lses - total).nan_to_num(0.0)  # an all-empty set would give nan
    return (weights.unsqueeze(-1) * outs).sum(0)


def sharded_decode_attention(q: torch.Tensor, k_local: torch.Tensor, v_local: torch.Tensor, group,
                             scale: float | None = None) -> torch.Tensor:
    """Attention of replicated queries over a key/value set split across ``group``.

    q (B, Tq, Hq, D) the same on every rank of ``group`` (the sequence-parallel group);
    k_local / v_local (B, S_r, Hkv, D) this rank's keys/values (all earlier than the queries).
    Returns (B, Tq, Hq, D) in q's dtype, the same on every rank."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = local_partial(q, k_local, v_local, scale)
    packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1)  # (B, Tq, Hq, D + 1)
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed.contiguous(), group=group)
    stacked = torch.stack(gathered)  # (R, B, Tq, Hq, D + 1)
    return merge_partials(stacked[..., :-1], stacked[..., -1]).to(q.dtype)


class ShardedKVCache:
    """Per layer, this rank's keys and values: the prompt shard, then every ``world``-th new token.

    k[layer] / v[layer]: (B, S_r, Hkv, D). ``owns(t)`` says whether generated token t (0-based,
    counting from the first generated token) is stored here."""

    def __init__(self, n_layers: int, rank: int, world: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.rank, self.world = rank, world

    def owns(self, generated_index: int) -> bool:
        return generated_index % self.world == self.rank

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=1)
            self.v[layer] = torch.cat([self.v[layer], v], dim=1)

    def local_tokens(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[1]
