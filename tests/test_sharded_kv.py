"""Decode attention over a KV cache split across ranks equals attention over the whole cache (fp32);
the grouped-head partial reads the cache in its own dtype (no fp32 copy, no per-head expansion);
the preallocated cache appends in place; shard ownership is arithmetic and equals shard_indices."""
from __future__ import annotations

import pytest
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

    from lvita.infer.sharded_kv import ShardedKVCache, sharded_decode_attention

    dist.init_process_group("gloo")
    q, k, v = _keys()
    idx = torch.tensor(splits[rank], dtype=torch.long)
    cache = ShardedKVCache(1, rank, 2, reserve=0)
    cache.append(0, k[:, idx[:2]], v[:, idx[:2]])  # two appends: the second one grows the buffer
    cache.append(0, k[:, idx[2:]], v[:, idx[2:]])
    return sharded_decode_attention(q, cache.keys(0), cache.values(0), dist.group.WORLD)


def test_sharded_decode_attention_matches_full_cache():
    q, k, v = _keys()
    want = _full(q, k, v)
    # interleaved shards (zigzag-like and round-robin new tokens), and one rank holding nothing
    for splits in ([[0, 1, 2, 9, 10], [3, 4, 5, 6, 7, 8]], [list(range(11)), []]):
        for got in run_world(_sharded, 2, splits):
            # noise: per-rank partials merged by log-sum-exp, fp32, ~1e-7 (outputs ~1); bug: a rank's keys
            # or an empty rank's -inf partial mishandled: ~1e-1 or NaN
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_reads_the_cache_in_its_dtype_without_expanding_it(dtype, monkeypatch):
    """Grouped heads: every matmul gets the cache tensors themselves (same storage, same dtype,
    KV head count), and the partial out/LSE are fp32 and equal the fp32 reference within dtype."""
    from lvita.infer import sharded_kv

    q, k, v = _keys()
    kh, vh = k.to(dtype).transpose(1, 2).contiguous(), v.to(dtype).transpose(1, 2).contiguous()  # (B, Hkv, S, D)
    seen = []
    real = torch.matmul

    def spy(a, b):
        seen.append(b)
        return real(a, b)

    monkeypatch.setattr(sharded_kv.torch, "matmul", spy)
    out, lse = sharded_kv.local_partial(q, kh, vh, 8 ** -0.5)
    monkeypatch.undo()
    assert len(seen) == 2 and seen[0].untyped_storage().data_ptr() == kh.untyped_storage().data_ptr()
    assert seen[1] is vh and all(t.dtype == dtype and t.shape[1] == 2 for t in seen)
    assert out.dtype == lse.dtype == torch.float32
    kf, vf = kh.float().transpose(1, 2), vh.float().transpose(1, 2)
    # noise: fp32 ~1e-7; bf16 inputs against an fp32 reference of the same bf16 values: the products are
    # exact in fp32, so ~1e-6, but the partial must stay fp32 (a bf16 partial: ~4e-3, one bf16 ulp);
    # bug: a wrong scale or group mapping ~1e-1. 2e-2 for bf16 also allows a bf16 matmul's accumulation.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, _full(q.to(dtype).float(), kf, vf), **tol)
    scores = torch.einsum("bqhd,bshd->bqhs", q.to(dtype).float(), kf.repeat_interleave(2, 2)) * 8 ** -0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), **tol)


def test_cache_appends_in_place_into_its_preallocated_buffer():
    from lvita.infer.sharded_kv import ShardedKVCache

    q, k, v = _keys()
    cache = ShardedKVCache(1, 1, 2, reserve=6)  # this rank's share of 6 new tokens: 3
    cache.append(0, k[:, :5], v[:, :5])
    buf = cache.k[0]
    assert buf.shape == (2, 2, 5 + 3, 8)
    for t in range(3):
        cache.append(0, k[:, 5 + t:6 + t], v[:, 5 + t:6 + t])
        assert cache.k[0] is buf  # no reallocation, no copy of the cache
    # torch's defaults: copies, so noise none; bug: a wrong slot or order, values ~1 apart
    torch.testing.assert_close(cache.keys(0), k[:, :8].transpose(1, 2))
    torch.testing.assert_close(cache.values(0), v[:, :8].transpose(1, 2))
    assert cache.local_tokens() == 8 and cache.keys(0).data_ptr() == buf.data_ptr()
    cache.append(0, k[:, 8:], v[:, 8:])  # past the reserve: grows, keeps the contents
    torch.testing.assert_close(cache.keys(0), k.transpose(1, 2))


@pytest.mark.parametrize("ulysses,ring", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (3, 2), (1, 4)])
def test_shard_owner_is_the_rank_whose_shard_indices_hold_the_position(ulysses, ring):
    from lvita.parallel.sequence import shard_indices, shard_owner

    S = 2 * ulysses * ring * 5
    want = torch.empty(S, dtype=torch.long)
    for r in range(ulysses * ring):
        want[shard_indices(S, r, ulysses, ring)] = r
    assert [shard_owner(S, p, ulysses, ring) for p in range(S)] == want.tolist()
