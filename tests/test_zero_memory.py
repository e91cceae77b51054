"""The ZeRO half of the memory plan (lvita.config.zero_memory) against DeepSpeed itself: its defaults are
DeepSpeed's, and a real ZeRO-3 engine on 2 gloo ranks (bf16, fp32 gradient accumulation, the tiny model with
the vision tower frozen) allocates per rank the parameter partitions, persistent parameters, gradient
partitions and fp32 master + Adam moments the plan predicts from stage_table's rows (the plan's 1%, as in
tests/test_memory_plan.py: the counts are exact, so noise is 0; the bug signal of an unsharded or unpadded
part is >= 2x at 2 ranks, of forgetting the persistent parameters 3.7% of the weights here)."""
from __future__ import annotations

import json

import pytest
import torch

from lvita.config.zero_memory import DEFAULTS, Zero, engine_of, model_states
from tests.conftest import REPO
from tests.distributed import run_world

DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}, "zero_allow_untested_optimizer": True,
      "steps_per_print": 10**9, "gradient_clipping": 1.0,
      # a low threshold so both kinds of parameter (split and persistent) occur in the tiny model
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 4096}}


def test_defaults_are_deepspeeds():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    by_alias = {(f.alias or name): f.default for name, f in fields.items()}
    for key, value in DEFAULTS.items():
        assert by_alias[key] == value, key
    z = Zero.of({})
    assert (z.stage, z.reduce_bucket_size, z.prefetch_bucket_size) == (0, 5 * 10**8, 5 * 10**7)


# LoRA: rank 8 on the LLM's q/v/down projections, the projector fully trained, the rest frozen
LORA = ['model.trainable=["projector"]', 'model.lora={"rank": 8, "llm": ["q_proj", "v_proj", "down_proj"]}',
        'train.lr={"projector": 1e-4, "llm": 1e-4}']


def _cfg(lora: bool = False):
    from lvita.config.schema import load_stage

    return load_stage(REPO / "stages" / "demo" / "2_general.json",
                      ["model.format=internvl", 'model.trainable=["projector", "llm"]', "precision=bf16"]
                      + (LORA if lora else []))


def _zero3_rank(rank: int, world: int, lora: bool = False) -> dict:
    import deepspeed

    from lvita.ckpt.weights import local_blocks
    from lvita.model.longvita import LongVita
    from lvita.model.lora import add_adapters
    from lvita.parallel.topology import init_distributed
    from lvita.training.optim import freeze

    init_distributed()
    torch.manual_seed(0)
    cfg = _cfg(lora)
    model = LongVita(cfg.model.spec(), 5)
    add_adapters(local_blocks(model), cfg.model.lora, cfg.seed)  # as lvita.training.loop does
    freeze(model, cfg.model.trainable, cfg.model.lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config={**json.loads(json.dumps(DS)), "train_batch_size": world})
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 1000, (1, 128), generator=g)
    ids[0, 4:4 + 16] = 5
    pos = torch.arange(128).unsqueeze(0)
    loss, n = engine(ids, pos, torch.randn(1, 3, 112, 112, generator=g).bfloat16(), ids.clone())
    engine.backward(loss / n)
    engine.step()
    params = list(engine.module.parameters())
    states = sum(v.numel() * v.element_size() for s in zopt.optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.numel() > 1)
    return {"weights": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
            + sum(p.data.numel() * p.data.element_size() for p in params if p.ds_persist),
            "gradients": zopt.grad_partitions_flat_buffer.numel() * zopt.grad_partitions_flat_buffer.element_size(),
            "optimizer": sum(t.numel() * t.element_size() for t in zopt.fp32_partitioned_groups_flat) + states,
            "persistent": sum(p.ds_numel for p in params if p.ds_persist)}


@pytest.mark.parametrize("world,lora", [(2, False), (3, False), (2, True)], ids=["2", "3", "2-lora"])
def test_zero3_partitions_equal_deepspeeds(world, lora):
    """At 3 ranks most of the tiny model's parameters do not split evenly: DeepSpeed pads each one. Under LoRA
    the frozen base weights are partitioned too, but only adapters and the projector get gradient partitions
    and fp32 master + moments (stage_table counts the adapters as the trainer injects them)."""
    from lvita.config.check import stage_table

    cfg = _cfg(lora)
    (row,) = stage_table(cfg, 1)
    zero = Zero.of(DS)
    assert engine_of(cfg, zero) == "zero"
    plan, host = model_states(row, zero, world, "bf16")
    assert world == 2 or sum(n % world != 0 for n, _ in row["numels"]) > len(row["numels"]) // 2
    if lora:  # the rows count adapters: q, v, down of 4 layers at rank 8 (tiny: hidden 160, KV 80, MLP 432)
        adapters = 4 * 8 * ((160 + 160) + (160 + 80) + (432 + 160))
        assert (row["adapters"], row["adapted"]) == (adapters, 12)
        with torch.device("meta"):
            from lvita.model.longvita import LongVita

            projector = sum(p.numel() for n, p in LongVita(cfg.model.spec(), 5).named_parameters()
                            if "multi_modal_projector" in n)
        assert row["trainable"] == adapters + projector
        assert row["trainable"] < 0.2 * row["params"]
    got = run_world(_zero3_rank, world, world, lora)
    for rank in got:
        assert rank["persistent"] > 0
        for part in ("weights", "gradients", "optimizer"):
            # noise: none (element counts); bug: an unsharded part is >= 2x; unpadded pieces at 3 ranks
            # are 1 element short per parameter (the ratio is logged; an exact count is asserted below)
            assert plan[part] == pytest.approx(rank[part], rel=0.01), (part, plan, rank)
        assert plan["weights"] == rank["weights"] and plan["gradients"] == rank["gradients"]
        assert plan["optimizer"] == rank["optimizer"]
    off, host = model_states(row, zero, world, "bf16", optimizer_offload=True, param_offload=True)
    assert off["gradients"] == off["optimizer"] == 0 and off["weights"] < plan["weights"]
    assert host == plan["gradients"] + plan["optimizer"] + plan["weights"] - off["weights"]
