"""Decode attention over a KV cache split across ranks equals attention over the whole cache (fp32)."""
from __future__ import annotations

import torch

from tests.distributed import run_world


def _keys(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 1, 4, 8, generator=g)
    k = torch.randn(2, 11, 2, 8, generator=g)  # GQA: 4 query heads, 2 KV heads
    v = torch.randn(2, 11, 2, 8, generator=g)
    return q, k, v


def _full(q, k, v):
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sharded(rank: int, splits: list[list[int]]):
    import torch.distributed as dist

    from lvita.infer.sharded_kv import sharded_decode_attention

    dist.init_process_group("gloo")
    q, k, v = _keys()
    idx = torch.tensor(splits[rank], dtype=torch.long)
    return sharded_decode_attention(q, k[:, idx], v[:, idx], dist.group.WORLD)


def test_sharded_decode_attention_matches_full_cache():
    q, k, v = _keys()
    want = _full(q, k, v)
    # interleaved shards (zigzag-like and round-robin new tokens), and one rank holding nothing
    for splits in ([[0, 1, 2, 9, 10], [3, 4, 5, 6, 7, 8]], [list(range(11)), []]):
        for got in run_world(_sharded, 2, splits):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
