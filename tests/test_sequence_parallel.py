"""Ulysses sequence parallelism inside the pipeline: loss and every gradient equal the
single-process model's within fp32 tolerance (1e-5 relative to each tensor's largest entry),
for reset (packed samples kept apart) and preserved position ids, with images straddling shards."""
from __future__ import annotations

import pytest

from lvita.data.packed import rank_micro_batches
from lvita.model.presets import llm_config, tokens_per_tile
from tests.distributed import run_world
from tests.synthetic import IMG, packed_batch
from tests.test_pipeline import GLOBAL, LENGTH, SEED, GradCapture, _check, _reference_for


def _sp_loss_and_grads(rank, pp, ulysses, reset):
    import deepspeed
    import torch.distributed as dist

    from lvita.model.attention import set_attention
    from lvita.parallel.pipeline import build_pipeline, plain_name
    from lvita.parallel.sequence import shard_micro_batch
    from lvita.parallel.topology import build_topology
    from lvita.parallel.ulysses import UlyssesAttention

    from lvita.parallel.topology import init_distributed

    init_distributed()
    topo = build_topology(pp, ulysses)
    module = build_pipeline("tiny", IMG, SEED, pp, topology=topo.deepspeed)
    set_attention(module, UlyssesAttention(topo.sequence_group, ulysses))
    opt = GradCapture(module.parameters())
    width = dist.get_world_size() // pp
    gas = GLOBAL // topo.data
    cfg = {"train_batch_size": gas * width, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas,
           "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=cfg)
    batch = packed_batch(GLOBAL, LENGTH, seed=3, reset=reset)
    micro = [shard_micro_batch(m, topo.sequence_rank, ulysses, IMG, tokens_per_tile("tiny"))
             for m in rank_micro_batches(batch, topo.data_rank, topo.data, 1)]
    loss = engine.train_batch(iter(micro))
    n_layers = llm_config("tiny").num_hidden_layers
    grads = {plain_name(n, n_layers): opt.grads[id(p)] for n, p in module.named_parameters() if id(p) in opt.grads}
    return float(loss), grads


@pytest.mark.parametrize("reset", [True, False])
def test_ulysses_2_matches_plain_model(reset):
    ref_loss, ref_grads = _reference_for(reset)
    _check(run_world(_sp_loss_and_grads, 2, 1, 2, reset), ref_loss, ref_grads)


def test_pipeline_2_x_ulysses_2_matches_plain_model():
    ref_loss, ref_grads = _reference_for(True)
    _check(run_world(_sp_loss_and_grads, 4, 2, 2, True), ref_loss, ref_grads)


def test_shards_embed_exactly_like_the_full_sequence_with_straddling_images():
    import torch

    from lvita.model.longvita import MultimodalEmbedding
    from lvita.parallel.sequence import shard_micro_batch

    tpt = tokens_per_tile("tiny")
    ids = torch.full((1, 64), 11)
    ids[0, 4:4 + tpt] = IMG  # tile 0
    ids[0, 24:24 + 2 * tpt] = IMG  # tiles 1-2 (one image of two tiles): straddles positions 32 and 48
    pix = torch.randn(3, 3, 112, 112)
    emb = MultimodalEmbedding("tiny", IMG).eval()
    with torch.no_grad():
        full = emb(ids, pix)
        micro = ((ids, torch.arange(64)[None], pix), (ids.clone(), torch.tensor(1.0)))
        for sp in (2, 4):
            for r in range(sp):
                (sid, _, spix, off), (_, scale) = shard_micro_batch(micro, r, sp, IMG, tpt)
                assert scale == sp
                assert spix.shape[0] <= 2
                torch.testing.assert_close(emb(sid, spix, off), full[:, r * 64 // sp:(r + 1) * 64 // sp])
