"""Packed samples stay apart, checked against attention written out by hand (not through
lvita.model.attention): several rows, a length-1 sample, a row that starts mid-sample, and under
Ulysses 2 a sample that ends exactly at the shard edge with a length-1 sample right after it.

The reference knows the sample lengths the test packed; it never looks at position ids, so a wrong
boundary rule in ``cu_seqlens_from_position_ids`` (which both sides of the Ulysses reset-packing
equivalence test share) fails here.
"""
from __future__ import annotations

import torch

from lvita.model.attention import cu_seqlens_from_position_ids, local_attention
from lvita.model.longvita import LongVita
from tests.distributed import run_world
from tests.synthetic import IMG

S = 16
# Row 0: three samples, the middle one a single token. Row 1: one sample over the whole row.
# Row 2: a row that starts in the middle of a sample (positions 7..), then a length-1 sample, then one more.
ROWS = [[5, 1, 10], [16], [9, 1, 6]]
FIRST_POSITION = [0, 0, 7]
# Ulysses 2 over S = 16: shards [0, 8) and [8, 16). The second sample ends exactly at 8 and a
# length-1 sample starts there.
ULYSSES_ROW = [3, 5, 1, 7]


def positions(lengths: list[int], first: int = 0) -> torch.Tensor:
    parts = [torch.arange(n) for n in lengths]
    parts[0] = parts[0] + first
    return torch.cat(parts)


def reference(q, k, v, rows: list[list[int]]) -> torch.Tensor:
    """Causal attention per packed sample, by hand in float64: q (B,S,Hq,D), k/v (B,S,Hkv,D)."""
    q, k, v = q.double(), k.double(), v.double()
    B, _, Hq, D = q.shape
    rep = Hq // k.shape[2]
    out = torch.zeros_like(q)
    for b, lengths in enumerate(rows):
        a = 0
        for n in lengths:
            for h in range(Hq):
                qs, ks, vs = q[b, a:a + n, h], k[b, a:a + n, h // rep], v[b, a:a + n, h // rep]
                scores = qs @ ks.T / D ** 0.5
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
                out[b, a:a + n, h] = torch.softmax(scores, -1) @ vs
            a += n
        assert a == q.shape[1]
    return out.float()


def qkv(B: int, seed: int = 0, hq: int = 4, hkv: int = 2, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, hq, d, generator=g), torch.randn(B, S, hkv, d, generator=g),
            torch.randn(B, S, hkv, d, generator=g))


def test_cu_seqlens_mark_every_sample_of_every_row():
    pos = torch.stack([positions(r, f) for r, f in zip(ROWS, FIRST_POSITION)])
    # flattened B*S = 48 tokens: row 0 at 0, 5, 6; row 1 at 16; row 2 at 32 (mid-sample start), 41, 42
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 5, 6, 16, 32, 41, 42, 48]
    assert cu_seqlens_from_position_ids(positions(ULYSSES_ROW)[None]).tolist() == [0, 3, 8, 9, 16]
    assert cu_seqlens_from_position_ids(torch.tensor([[9]])).tolist() == [0, 1]  # one decode step


def test_local_attention_keeps_packed_samples_apart():
    pos = torch.stack([positions(r, f) for r, f in zip(ROWS, FIRST_POSITION)])
    q, k, v = qkv(len(ROWS))
    got = local_attention(q, k, v, cu_seqlens=cu_seqlens_from_position_ids(pos))
    # noise: varlen/per-sample attention vs masked softmax, fp32, ~1e-7 (outputs ~1); bug: one sample
    # attending to its neighbour changes its outputs by ~1e-1 (test_model's 0.42 through the layers)
    torch.testing.assert_close(got, reference(q, k, v, ROWS), rtol=1e-5, atol=1e-6)


def test_decoder_layers_see_each_packed_sample_alone():
    """Several rows through the model's layers equal each sample run on its own."""
    model = LongVita("tiny", IMG, seed=0).eval()
    rows = [[5, 1, 10], [16], [1, 15]]
    torch.manual_seed(0)
    ids = torch.randint(10, 900, (len(rows), S))
    pos = torch.stack([positions(r) for r in rows])
    empty = torch.zeros(0, 3, 112, 112)
    with torch.no_grad():
        h = model.embed(ids, empty)
        for layer in model.layers:
            h = layer(h, pos)
        for b, lengths in enumerate(rows):
            a = 0
            for n in lengths:
                alone = model.embed(ids[b:b + 1, a:a + n], empty)
                for layer in model.layers:
                    alone = layer(alone, torch.arange(n)[None])
                torch.testing.assert_close(h[b:b + 1, a:a + n], alone, rtol=1e-5, atol=1e-5)  # as above
                a += n


def _ulysses_shard(rank):
    from lvita.parallel.topology import build_topology, init_distributed
    from lvita.parallel.ulysses import UlyssesAttention

    init_distributed()
    topo = build_topology(1, 2, 1)
    q, k, v = qkv(1, seed=1)
    pos = positions(ULYSSES_ROW)[None]
    shard = slice(rank * S // 2, (rank + 1) * S // 2)
    return UlyssesAttention(topo.sequence_group, 2)(q[:, shard], k[:, shard], v[:, shard],
                                                    position_ids=pos[:, shard].clone())


def test_ulysses_keeps_samples_apart_at_the_shard_edge():
    q, k, v = qkv(1, seed=1)
    want = reference(q, k, v, [ULYSSES_ROW])
    got = torch.cat(run_world(_ulysses_shard, 2), dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # noise and bug as in the first test
