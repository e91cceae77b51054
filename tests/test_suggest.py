"""``lvita check --suggest`` (lvita.config.suggest) across engines and world sizes, and the one-node recipes
(stages/longvita-14b/one-node/*.json) it proposes: stage 4 (1M tokens) on 1 x 8 x 80 GB under ZeRO-3.

Plans only (meta device, no training); about 15 s per check of the 14B preset."""
from __future__ import annotations

import json

import pytest

from lvita.config.check import main as check
from tests.conftest import REPO

STAGES = REPO / "stages" / "longvita-14b"
ONE_NODE = STAGES / "one-node"
RECIPES = ["3_long_128k", "4_long_1m"]
# what a one-node variant may change from its 8 x 8 stage file: the run's identity, the engine and layout,
# the released checkpoint it continues from, and levers the plan says it does without
LAYOUT_KEYS = {"name", "description", "output_dir", "deepspeed", "parallel", "model.init_from", "model.tokenizer",
               "model.tiled_mlp"}


def test_suggest_proposes_zero3_for_1m_tokens_on_one_node(capsys):
    """The issue's case: stage 4's own degrees (pipeline 8 x ulysses 8) do not divide 8 GPUs; --suggest still
    searches, and proposes ZeRO-3 at pipeline 1 with Ulysses 8 under 80 GB (the stage file is invalid at 8: exit 2)."""
    assert check(str(STAGES / "4_long_1m.json"), 8, [], gpu_memory=80, show_suggestions=True) == 2
    out = capsys.readouterr().out
    assert "does not divide the world size 8" in out
    line = next(x for x in out.splitlines() if "proposed for 80 GB GPUs at world 8" in x)
    assert "ZeRO-3, pipeline 1 x ulysses 8 x ring 1 x data 1" in line, line
    peak = float(line.split(": ")[2].split(" GiB peak")[0])
    assert peak < 0.9 * 80, line  # the plan's 10% margin
    assert "--set parallel.ulysses=8" in out and "zero3_bf16.json" in out


def test_suggest_says_in_numbers_why_nothing_fits(capsys):
    assert check(str(STAGES / "4_long_1m.json"), 1, [], gpu_memory=80, show_suggestions=True) == 2
    out = capsys.readouterr().out
    assert "none of" in out and "fits 80 GB GPUs at world 1" in out, out
    assert "largest transient" in out and "GiB > 80" in out, out


@pytest.mark.parametrize("name", RECIPES)
def test_one_node_recipe_is_its_stage_but_for_the_layout(name):
    """The curriculum settings (docs/curriculum.md, tests/test_stage_tables.py) reach the one-node variants unchanged."""
    base, node = (dict(_flat(json.loads(p.read_text()))) for p in (STAGES / f"{name}.json", ONE_NODE / f"{name}.json"))
    assert base.keys() == node.keys()
    changed = {k for k in base if base[k] != node[k]}
    assert changed <= LAYOUT_KEYS, changed - LAYOUT_KEYS
    assert node["parallel"] == {"pipeline": 1, "ulysses": 8, "ring": 1}
    assert node["deepspeed"] == "ds_configs/zero3_bf16.json"
    assert node["model.init_from"] == node["model.tokenizer"] and "Long-VITA" in node["model.init_from"]


@pytest.mark.parametrize("name", RECIPES)
def test_one_node_recipe_plans_under_zero3_and_passes_all_but_the_engine_check(name, monkeypatch):
    """Everything validation checks but the ZeRO stage (probed with the ZeRO-1 JSON), and the ZeRO-3 plan fits."""
    from lvita.config.check import stage_table
    from lvita.config.memory_plan import memory_plan
    from lvita.config.schema import load_stage
    from lvita.config.validate import validate

    monkeypatch.chdir(REPO)
    cfg = load_stage(ONE_NODE / f"{name}.json")
    probe = load_stage(ONE_NODE / f"{name}.json", ["deepspeed=ds_configs/pipeline_bf16_zero1.json"])
    layout = validate(probe, 8)
    assert (layout.pipeline, layout.ulysses, layout.data) == (1, 8, 1)
    plan = memory_plan(cfg, layout, stage_table(cfg, 1))
    assert (plan.engine, plan.zero_stage, plan.shards) == ("zero", 3, 8)
    assert plan.bound.total < 0.9 * 80 * 2**30
    # the start-up: every parameter in fp32 on each GPU before DeepSpeed partitions it (15,083.5M x 4 bytes =
    # 56.2 GiB, plus the CUDA context): under 80 GB, so the plan fits; 3_long_128k trains in less (52 GiB), so
    # on a GPU between the two the build, not training, is what does not fit, and the plan must say so
    from lvita.config.memory_plan import OVERHEAD

    assert plan.startup == sum(r["params"] for r in stage_table(cfg, 1)) * 4 + OVERHEAD
    assert 56 * 2**30 < plan.startup - OVERHEAD < 57 * 2**30 and plan.fits(80)
    assert plan.peak == max(plan.bound.total, plan.startup)
    if name == "3_long_128k":
        between = (plan.bound.total + plan.startup) / 2 / 2**30
        assert plan.bound.total < plan.startup and not plan.fits(between)


@pytest.mark.parametrize("name", RECIPES)
def test_one_node_recipe_passes_lvita_check(name, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert check(str(ONE_NODE / f"{name}.json"), 8, [], gpu_memory=80) == 0
    out = capsys.readouterr().out
    assert "ZeRO-3 over 8 data x sequence ranks" in out and ": fits 80 GB GPUs" in out, out
    assert "start-up: the ZeRO engine builds the whole model in fp32 on each GPU before partitioning it" in out


# -- fine-tuning recipes (stages/longvita-14b/finetune/): the released Long-VITA-128K, full or LoRA, one node ----

FINETUNE = STAGES / "finetune"
# what the LoRA recipe may change from the full one: its identity, what trains and how fast, the engine
LORA_KEYS = {"name", "description", "output_dir", "deepspeed", "model.trainable", "model.lora.rank", "model.lora.alpha",
             "model.lora.dropout", "model.lora.llm", "train.lr.projector", "train.lr.llm"}


def _flat(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "parallel":
            yield from _flat(v, key + ".")
        else:
            yield key, v


def test_finetune_recipes_continue_long_vita_128k_and_differ_only_in_what_trains():
    from lvita.config import shipped

    full, lora = (dict(_flat(json.loads((FINETUNE / f"{n}.json").read_text()))) for n in ("full_128k", "lora_128k"))
    changed = {k for k in full.keys() | lora.keys() if full.get(k) != lora.get(k)}
    assert changed <= LORA_KEYS, changed - LORA_KEYS
    for cfg in (full, lora):
        assert cfg["model.init_from"] == cfg["model.tokenizer"] == "/path/to/Long-VITA-128K_HF"
        assert cfg["model.preset"] == "longvita-14b" and cfg["data.seq_length"] == 131072
        assert cfg["parallel"] == {"pipeline": 1, "ulysses": 8, "ring": 1}
    assert full["model.trainable"] == ["projector", "llm"] and not any(k.startswith("model.lora") for k in full)
    assert lora["model.trainable"] == [] and lora["model.lora.rank"] == 16 and len(lora["model.lora.llm"]) == 7
    # shipped as package data (lvita stages lists them; lvita/_shipped links the stages folder)
    assert {"longvita-14b/finetune/full_128k", "longvita-14b/finetune/lora_128k"} <= set(shipped.stage_names())


@pytest.mark.parametrize("name", ["full_128k", "lora_128k"])
def test_finetune_recipe_passes_lvita_check(name, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert check(str(FINETUNE / f"{name}.json"), 8, [], gpu_memory=80) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "bounds the run at" in x)
    assert ": fits 80 GB GPUs" in line and float(line.split(" at ")[1].split(" GiB")[0]) < 0.9 * 80, line
    if name == "lora_128k":  # 48 layers x r (in + out) over q k v o gate up down: 48 x 1,433,600 adapter parameters
        assert ("LoRA: rank 16, alpha 32 (scale 2), dropout 0; 336 adapted linears (llm q_proj, k_proj, v_proj, "
                "o_proj, gate_proj, up_proj, down_proj); 68.8M adapter parameters, 15,083.5M frozen") in out, out
        assert "pipeline engine, ZeRO-1 over 8 data x sequence ranks" in out
    else:
        assert "LoRA:" not in out and "ZeRO-3 over 8 data x sequence ranks" in out


def test_suggest_proposes_the_lora_recipes_layout(capsys, monkeypatch):
    """--suggest plans LoRA candidates (adapters counted, frozen weights at bf16 only): at world 8 the pipeline
    engine at pipeline 1 x Ulysses 8 without offload, the layout lora_128k.json uses, well under its full
    fine-tuning twin's ZeRO-3 peak."""
    monkeypatch.chdir(REPO)
    assert check(str(FINETUNE / "lora_128k.json"), 8, [], gpu_memory=80, show_suggestions=True) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "proposed for 80 GB GPUs at world 8" in x)
    assert "pipeline (ZeRO-1), pipeline 1 x ulysses 8 x ring 1 x data 1" in line, line
    assert line.endswith("levers: activation checkpointing"), line
