"""The memory plan (lvita.config.memory_plan): its activation bytes equal what autograd keeps for the tiny
model, measured with saved-tensor hooks, at three lengths, two layouts, with and without activation
checkpointing and with the vision tower trainable or frozen (the issue asks 15%; the formulas are
exact on CPU, so the test holds them to 1%), and likewise with the LLM frozen under LoRA adapters or
without (0.25%: the adapters' own tensors are small); and every 14B stage file fits 80 GB GPUs by the plan."""
from __future__ import annotations

import weakref

import pytest
import torch

from lvita.model.flops import Shapes
from lvita.config.memory_plan import Micro, stage_activations
from tests.conftest import REPO


def _kept_bytes(blocks: range, trainable, checkpoint: bool, length: int, tiles: int,
                lora=None) -> tuple[int, int]:
    """Bytes of the tensors autograd keeps for backward after a forward of ``blocks`` (deduplicated by
    storage, parameters excluded), and the labelled tokens; ``lora``: adapters injected as the trainer does."""
    from lvita.model.longvita import LongVita
    from lvita.model.lora import add_adapters
    from lvita.training.optim import freeze

    model = LongVita("tiny", 5, checkpoint=checkpoint)
    every = [model.embed, *model.layers, model.head]
    add_adapters(dict(enumerate(every)), lora, seed=0)
    freeze(model, trainable, lora)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    holders = []

    class Held:  # the graph holds this; it dies with the graph, so only what backward keeps is counted
        def __init__(self, t):
            self.t = t

    def pack(t):
        h = Held(t)
        holders.append(weakref.ref(h))
        return h

    g = torch.Generator().manual_seed(length)
    ids = torch.randint(10, 1000, (1, length), generator=g)
    ids[0, 4:4 + 16 * tiles] = 5
    pos = torch.cat([torch.arange(length // 3), torch.arange(length - length // 3)]).unsqueeze(0)
    labels = ids.clone()
    labels[0, :length // 4] = -100
    out = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
        for b in blocks:
            if b == 0:
                out = every[0](ids, torch.randn(tiles, 3, 112, 112, generator=g))
                continue
            if out is None:  # a later pipeline stage: its input arrives with requires_grad
                out = torch.randn(1, length, 160, generator=g, requires_grad=True)
            if b == len(every) - 1:
                out = every[b].loss_sum(every[b](out), labels)[0]
            else:
                out = every[b](out, pos)
    kept = {}
    for ref in holders:
        h = ref()
        if h is not None and h.t.untyped_storage().data_ptr() not in params:
            kept[h.t.untyped_storage().data_ptr()] = h.t.untyped_storage().nbytes()
    del out
    return sum(kept.values()), int((labels != -100).sum())


def _stages(pipeline: int) -> list[range]:
    from lvita.parallel.pipeline import layer_specs, partition

    parts = partition(layer_specs("tiny", 5), pipeline)
    return [range(parts[s], parts[s + 1]) for s in range(pipeline)]


@pytest.mark.parametrize("trainable", [["vision", "projector", "llm"], ["projector", "llm"]], ids=["all", "vit-frozen"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_plan_activations_equal_what_autograd_keeps(trainable, checkpoint):
    s = Shapes.of("tiny")
    for pipeline in (1, 2):
        for blocks in _stages(pipeline):
            for length in (256, 512, 1024):
                got, labelled = _kept_bytes(blocks, trainable, checkpoint, length, tiles=3)
                plan = stage_activations(s, blocks, s.layers + 2, Micro(length, labelled, 3), 4, trainable,
                                         checkpoint, attention="sdpa")
                # noise: none in the arithmetic (byte counts); what the plan leaves out on purpose
                # (small per-row statistics) shows as the logged ratio (tests/README.md); bug: one kept
                # (tokens x hidden) tensor per layer missing, estimated >= 5% of a stage's total
                assert plan == pytest.approx(got, rel=0.01), (pipeline, list(blocks), length)


def _lora(**kw):
    from lvita.config.schema import LoraConfig

    return LoraConfig(**kw)


FROZEN_LLM = {  # (trainable, LoRA settings or None)
    "lora-all7": ([], dict(rank=16)),
    "lora-qv-dropout": ([], dict(rank=16, dropout=0.1, llm=["q_proj", "v_proj"])),
    "lora-o-gate-down+projector": (["projector"], dict(rank=8, llm=["o_proj", "gate_proj", "down_proj"])),
    "projector-only": (["projector"], None),
}


@pytest.mark.parametrize("case", list(FROZEN_LLM))
@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_plan_activations_under_lora_equal_what_autograd_keeps(case, checkpoint):
    """A frozen LLM (LoRA adapters or none) saves less than a trained one: frozen linears keep no input, norms
    no normalised copy; adapters add their rank-wide lora_A outputs (and dropout's copies); the first layer
    after a frozen embedding keeps no input statistics. Pipeline 1, 2 and 3 (stage 0 of 3 holds the
    embedding and one layer only)."""
    trainable, kw = FROZEN_LLM[case]
    lora = None if kw is None else _lora(**kw)
    s = Shapes.of("tiny")
    for pipeline in (1, 2, 3):
        for blocks in _stages(pipeline):
            for length in (256, 512):
                got, labelled = _kept_bytes(blocks, trainable, checkpoint, length, 3, lora)
                plan = stage_activations(s, blocks, s.layers + 2, Micro(length, labelled, 3), 4, trainable,
                                         checkpoint, attention="sdpa", lora=lora)
                # noise: what the plan counts and autograd does not keep, the 1-byte image-token mask per
                # token (measured: at most 0.15%, stage 0 of 3 checkpointed); bug: the smallest term, one
                # rank-wide lora_A output per adapted linear (rank 8, 3 linears) is 0.3-0.9% of a stage, a
                # trained layer's formula in place of the frozen one >= 3%
                assert plan == pytest.approx(got, rel=0.0025), (case, pipeline, list(blocks), length)


@pytest.mark.parametrize("name", ["1_align", "2_general", "3_long_128k", "4_long_1m"])
def test_longvita_14b_stages_fit_80gb(name, capsys):
    from lvita.config.check import main as check

    assert check(str(REPO / "stages" / "longvita-14b" / f"{name}.json"), 64,
                 [f"deepspeed={REPO}/ds_configs/pipeline_bf16_zero1.json"], gpu_memory=80) == 0
    out = capsys.readouterr().out
    assert "bounds the run at" in out and ": fits 80 GB GPUs" in out, out


def test_levers_lower_the_plan_where_they_should():
    """1M tokens on 64 GPUs (stage 4's layout): without the levers it does not fit 80 GB; tiled MLP
    shrinks the largest transient, activation offload the activations, optimizer offload the states."""
    from lvita.config.check import stage_table
    from lvita.config.schema import load_stage
    from lvita.config.memory_plan import memory_plan
    from lvita.config.validate import validate

    def plan(*sets):
        cfg = load_stage(REPO / "stages" / "longvita-14b" / "4_long_1m.json",
                         [f"deepspeed={REPO}/ds_configs/pipeline_bf16_zero1.json", "model.tiled_mlp=false",
                          "model.activation_offload=false", *sets])
        layout = validate(cfg, 64)
        return memory_plan(cfg, layout, stage_table(cfg, layout.pipeline))

    base, tiled = plan(), plan("model.tiled_mlp=true")
    offload = plan("model.tiled_mlp=true", "model.activation_offload=true")
    states = plan("train.optimizer_offload=true")
    assert not base.fits(80) and offload.fits(80)
    b, t, o, st = (p.stages[1].parts for p in (base, tiled, offload, states))
    assert t["largest transient"] < 0.7 * b["largest transient"] and t["activations"] == b["activations"]
    assert o["activations"] < 0.1 * b["activations"] and offload.stages[1].host > 0
    assert st["optimizer"] == 0 and b["optimizer"] > 0 and states.stages[1].host > 0
