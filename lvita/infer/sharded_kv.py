"""Decoding against a KV cache sharded over the sequence-parallel ranks (context-parallel generation).

Owns the communication of one decode step and which rank stores what. After a context-parallel
prefill every rank keeps the keys and values of its own shard of the prompt (any order: attention
over a set of keys does not care); each new token's key/value is stored by one rank, round robin,
so the cache stays evenly spread and no rank ever holds the whole context. For a new token every
rank computes

    partial_r = softmax(q K_r^T) V_r   and   lse_r = logsumexp(q K_r^T)     over its own keys,

then the ranks all-gather ``(partial_r, lse_r)`` and merge them exactly:

    out = sum_r exp(lse_r - logsumexp_r(lse_r)) * partial_r

which is attention over the union of the shards (the flash-attention / ring-attention merge).

    out = sharded_decode_attention(q, k_local, v_local, group)    # q (B, 1, Hq, D)

Memory traffic per layer and token is one read of the local K and V in the cache's dtype: the
query heads are grouped per KV head (q viewed as (B, Hkv, group x Tq, D)), never the cache
expanded or converted; the cache is stored head-major, (B, Hkv, capacity, D), preallocated, so a
new token is written in place and the attention reads a view. Only the scores (B, Hkv, G, S_r)
and the partial output/LSE are fp32 (the merge is exact in fp32).
Trade-off: one all-gather of (B, 1, Hq, D + 1) per layer and token instead of moving keys; on the
paper's 1M-token prompts the alternative (gathering the cache) would not fit on one device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def local_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Tq, Hq, D), k/v (B, Hkv, S, D) head-major, every key visible
    -> (out (B, Tq, Hq, D) fp32, lse (B, Tq, Hq) fp32).

    Query head h reads KV head h // (Hq / Hkv) (as repeat_interleave would). An empty shard
    (S = 0) gives out 0 and lse -inf, which the merge weighs as nothing."""
    B, Tq, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if S == 0:
        return q.new_zeros(B, Tq, Hq, D, dtype=torch.float32), q.new_full((B, Tq, Hq), float("-inf"),
                                                                          dtype=torch.float32)
    G = Hq // Hkv
    qg = q.to(k.dtype).reshape(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Tq, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, Hkv, G*Tq, S) fp32
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hkv, G*Tq)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype)
    out = torch.matmul(probs, v).float()  # (B, Hkv, G*Tq, D)
    out = out.reshape(B, Hkv, G, Tq, D).permute(0, 3, 1, 2, 4).reshape(B, Tq, Hq, D)
    return out, lse.reshape(B, Hkv, G, Tq).permute(0, 3, 1, 2).reshape(B, Tq, Hq)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """outs (R, B, Tq, H, D), lses (R, B, Tq, H) fp32 from R disjoint key sets -> (B, Tq, H, D) fp32."""
    total = torch.logsumexp(lses, dim=0)  # (B, Tq, H)
    weights = torch.exp(lses - total).nan_to_num(0.0)  # an all-empty set would give nan
    return (weights.unsqueeze(-1) * outs).sum(0)


def sharded_decode_attention(q: torch.Tensor, k_local: torch.Tensor, v_local: torch.Tensor, group,
                             scale: float | None = None) -> torch.Tensor:
    """Attention of replicated queries over a key/value set split across ``group``.

    q (B, Tq, Hq, D) the same on every rank of ``group`` (the sequence-parallel group);
    k_local / v_local (B, Hkv, S_r, D) head-major, this rank's keys/values (all earlier than the
    queries; :meth:`ShardedKVCache.keys`). Returns (B, Tq, Hq, D) in q's dtype, the same on every rank."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = local_partial(q, k_local, v_local, scale)
    packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1)  # (B, Tq, Hq, D + 1) fp32
    gathered = torch.empty((dist.get_world_size(group), *packed.shape), dtype=packed.dtype, device=packed.device)
    if packed.is_cuda:
        dist.all_gather_into_tensor(gathered, packed, group=group)
    else:  # gloo: into views of the one buffer
        dist.all_gather(list(gathered.unbind(0)), packed, group=group)
    return merge_partials(gathered[..., :-1], gathered[..., -1]).to(q.dtype)


class ShardedKVCache:
    """Per layer, this rank's keys and values: the prompt shard, then every ``world``-th new token.

    Stored head-major in preallocated buffers (B, Hkv, capacity, D); :meth:`keys` / :meth:`values`
    return views (B, Hkv, S_r, D). ``reserve``: new tokens to leave room for beyond the first
    append (the prompt shard); the buffer doubles if it is exceeded. ``owns(t)`` says whether
    generated token t (0-based, counting from the first generated token) is stored here."""

    def __init__(self, n_layers: int, rank: int, world: int, reserve: int = 0):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = [0] * n_layers
        self.rank, self.world = rank, world
        self.reserve = -(-reserve // world)  # this rank's share of the new tokens

    def owns(self, generated_index: int) -> bool:
        return generated_index % self.world == self.rank

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, T, Hkv, D) written in place at this layer's end."""
        n, T = self.length[layer], k.shape[1]
        if self.k[layer] is None or n + T > self.k[layer].shape[2]:
            cap = n + T + self.reserve if self.k[layer] is None else max(2 * self.k[layer].shape[2], n + T)
            B, _, H, D = k.shape
            for buf in (self.k, self.v):
                new = k.new_empty(B, H, cap, D)
                if buf[layer] is not None:
                    new[:, :, :n] = buf[layer][:, :, :n]
                buf[layer] = new
        self.k[layer][:, :, n:n + T] = k.transpose(1, 2)
        self.v[layer][:, :, n:n + T] = v.transpose(1, 2)
        self.length[layer] = n + T

    def keys(self, layer: int) -> torch.Tensor:
        """(B, Hkv, S_r, D) view of this layer's keys (filled by at least one append)."""
        return self.k[layer][:, :, :self.length[layer]]

    def values(self, layer: int) -> torch.Tensor:
        return self.v[layer][:, :, :self.length[layer]]

    def local_tokens(self) -> int:
        return self.length[0]
