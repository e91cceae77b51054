"""Sequence parallelism inside the pipeline: loss and every gradient equal the single-process
model's within fp32 tolerance (1e-5 relative to each tensor's largest entry). Ulysses for reset
(packed samples kept apart) and preserved position ids, zigzag ring and hybrid Ulysses x ring
for preserved ones (ring refuses reset packing), pipeline x Ulysses, images straddling shards."""
from __future__ import annotations

import pytest

from lvita.data.stream import rank_micro_batches
from lvita.model.presets import llm_config, tokens_per_tile
from tests.distributed import run_world
from tests.synthetic import IMG, packed_batch
from tests.test_pipeline import GLOBAL, LENGTH, SEED, GradCapture, _check, _reference_for, _sequence_reference


def _sp_loss_and_grads(rank, pp, ulysses, ring, reset, reduction="token", prepare=None):
    """One step of the pipeline engine (sequence parallel when ulysses x ring > 1): (loss, {plain name: gradient})
    of every parameter that has one. ``prepare(module)``: a module-level function applied after the build (the LoRA
    tests add adapters and freeze the rest with it)."""
    import deepspeed
    import torch.distributed as dist

    from lvita.model.attention import set_attention
    from lvita.parallel.pipeline import build_pipeline, plain_name
    from lvita.parallel.hybrid import sequence_attention
    from lvita.parallel.sequence import shard_micro_batch
    from lvita.parallel.topology import build_topology, init_distributed

    init_distributed()
    topo = build_topology(pp, ulysses, ring)
    module = build_pipeline("tiny", IMG, SEED, pp, topology=topo.deepspeed)
    if topo.sequence > 1:
        set_attention(module, sequence_attention(topo))
    if prepare is not None:
        prepare(module)
    opt = GradCapture([p for p in module.parameters() if p.requires_grad])
    width = dist.get_world_size() // pp
    gas = GLOBAL // topo.data
    cfg = {"train_batch_size": gas * width, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas,
           "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=cfg)
    batch = packed_batch(GLOBAL, LENGTH, seed=3, reset=reset)
    micro = rank_micro_batches(batch, topo.data_rank, topo.data, 1, reduction)
    if topo.sequence > 1:
        micro = [shard_micro_batch(m, topo.sequence_rank, ulysses, ring, IMG, tokens_per_tile("tiny")) for m in micro]
    loss = engine.train_batch(iter(micro))
    n_layers = llm_config("tiny").num_hidden_layers
    grads = {plain_name(n, n_layers): opt.grads[id(p)] for n, p in module.named_parameters() if id(p) in opt.grads}
    return float(loss), grads


@pytest.mark.parametrize("reset", [True, False])
def test_ulysses_2_matches_plain_model(reset):
    ref_loss, ref_grads = _reference_for(reset)
    _check(run_world(_sp_loss_and_grads, 2, 1, 2, 1, reset), ref_loss, ref_grads)


def test_ulysses_2_with_sequence_loss_reduction_matches_plain_model():
    """train.loss_reduction "sequence": each row's scale (of its whole sequence's labelled tokens) times sp on
    every shard still gives the mean of the sequences' token means."""
    ref_loss, ref_grads = _sequence_reference()
    _check(run_world(_sp_loss_and_grads, 2, 1, 2, 1, True, "sequence"), ref_loss, ref_grads)


def test_pipeline_2_x_ulysses_2_matches_plain_model():
    ref_loss, ref_grads = _reference_for(True)
    _check(run_world(_sp_loss_and_grads, 4, 2, 2, 1, True), ref_loss, ref_grads)


@pytest.mark.parametrize("world,pp,ulysses,ring", [(2, 1, 1, 2), (4, 1, 2, 2), (4, 2, 1, 2)])
def test_ring_and_hybrid_match_plain_model(world, pp, ulysses, ring):
    """Zigzag ring 2, yunchang's hybrid Ulysses 2 x ring 2, and pipeline 2 x ring 2 (preserved
    positions: one causal sequence)."""
    ref_loss, ref_grads = _reference_for(False)
    _check(run_world(_sp_loss_and_grads, world, pp, ulysses, ring, False), ref_loss, ref_grads)


def _ring_with_reset_positions(rank):
    import torch

    from lvita.parallel.hybrid import HybridAttention
    from lvita.parallel.topology import build_topology, init_distributed

    init_distributed()
    topo = build_topology(1, 1, 2)
    attn = HybridAttention(topo.ulysses_group, topo.ring_group, 1)
    q = torch.randn(1, 8, 2, 4)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])  # two packed samples in the shard
    try:
        attn(q, q, q, position_ids=pos)
    except ValueError as e:
        return str(e)
    return "no error"


def test_ring_refuses_packed_samples_at_run_time():
    for msg in run_world(_ring_with_reset_positions, 2):
        assert "reset position ids needs parallel.ring=1" in msg


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (4, 1), (1, 2), (1, 4), (2, 2), (3, 2)])
def test_shards_embed_exactly_like_the_full_sequence_with_straddling_images(ulysses, ring):
    import torch

    from lvita.model.longvita import MultimodalEmbedding
    from lvita.parallel.sequence import shard_indices, shard_micro_batch

    tpt = tokens_per_tile("tiny")
    S = 96
    ids = torch.full((1, S), 11)
    ids[0, 4:4 + tpt] = IMG  # tile 0
    ids[0, 22:22 + 2 * tpt] = IMG  # tiles 1-2 (one image of two tiles): straddles several shard edges
    ids[0, 70:70 + tpt] = IMG  # tile 3
    pix = torch.randn(4, 3, 112, 112)
    emb = MultimodalEmbedding("tiny", IMG).eval()
    sp = ulysses * ring
    spans = [(4, 4 + tpt), (22, 22 + tpt), (22 + tpt, 22 + 2 * tpt), (70, 70 + tpt)]  # tokens of tiles 0-3
    seen, needed = [], []
    with torch.no_grad():
        full = emb(ids, pix)
        micro = ((ids, torch.arange(S)[None], pix), (ids.clone(), torch.tensor(1.0)))
        for r in range(sp):
            idx = shard_indices(S, r, ulysses, ring)
            seen.append(idx)
            (sid, spos, spix, index), (targets, scale) = shard_micro_batch(micro, r, ulysses, ring, IMG, tpt)
            assert scale == sp
            assert torch.equal(spos[0], idx) and torch.equal(targets, ids[:, idx])
            want = [t for t, (a, b) in enumerate(spans) if any(a <= int(i) < b for i in idx)]
            assert torch.equal(spix, pix[want]), (r, want)  # exactly the tiles this shard needs, in order
            needed.append(want)
            # torch's fp32 defaults (1.3e-6 relative + 1e-5): noise none (the same rows computed,
            # bit-identical); bug: another tile's features in a run, ~1 apart
            torch.testing.assert_close(emb(sid, spix, index), full[:, idx])
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(S))
    if (ulysses, ring) == (2, 1):  # contiguous halves [0, 48) and [48, 96): tile 2 (38-53) straddles them
        assert needed == [[0, 1, 2], [2, 3]]
    if (ulysses, ring) == (1, 2):  # zigzag chunks of 24: rank 0 [0, 24) + [72, 96), rank 1 [24, 72)
        assert needed == [[0, 1, 3], [1, 2, 3]]
    if ring > 1:  # zigzag: ring rank 0 holds the first and the last chunk
        c = S // (2 * ring)
        first = torch.cat([shard_indices(S, u, ulysses, ring) for u in range(ulysses)])
        assert torch.equal(first, torch.cat([torch.arange(c), torch.arange(S - c, S)]))
