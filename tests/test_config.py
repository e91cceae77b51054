"""Stage config loading, overrides and validation: every error names the key and the fix."""
from __future__ import annotations

import json

import pytest

from lvita.config.check import main as check
from lvita.config.schema import ConfigError, load_stage
from lvita.config.validate import validate
from tests.conftest import REPO, stage_dict, write_stage


@pytest.fixture
def stage(tmp_path, tokenizer_dir, dataset_dir):
    return write_stage(tmp_path / "s.json", stage_dict(tokenizer_dir, dataset_dir, tmp_path / "out"))


def errors_for(stage, world, *sets) -> str:
    with pytest.raises(ConfigError) as e:
        validate(load_stage(stage, list(sets)), world)
    return str(e.value)


def test_valid_stage_gives_layout(stage):
    layout = validate(load_stage(stage), 2)
    assert (layout.pipeline, layout.data, layout.grad_accum, layout.missing) == (1, 2, 2, [])
    layout = validate(load_stage(stage, ["parallel.pipeline=2"]), 2)
    assert (layout.pipeline, layout.data, layout.grad_accum) == (2, 1, 4)


def test_unknown_key_in_file_names_file_and_key(tmp_path, stage):
    raw = json.loads(stage.read_text())
    raw["train"]["learning_rate"] = 1
    bad = write_stage(tmp_path / "bad.json", raw)
    with pytest.raises(ConfigError, match=r"bad.json: unknown key 'train.learning_rate'; valid keys here: iterations"):
        load_stage(bad)


def test_wrong_type_is_an_error(stage):
    with pytest.raises(ConfigError, match="train.iterations: expected an integer"):
        load_stage(stage, ["train.iterations=three"])


def test_set_unknown_key_and_json_parsing(stage):
    with pytest.raises(ConfigError, match="unknown key 'parallel.tensor'"):
        load_stage(stage, ["parallel.tensor=2"])
    cfg = load_stage(stage, ["train.lr.llm=2e-4", "name=my run", "model.trainable=[\"llm\"]",
                             "model.init_from=null"])
    assert cfg.train.lr["llm"] == 2e-4 and cfg.name == "my run" and cfg.model.trainable == ["llm"]
    assert cfg.model.init_from is None


def test_degrees_must_divide_world(stage):
    msg = errors_for(stage, 3, "parallel.pipeline=2")
    assert "parallel.pipeline x ulysses x ring = 2x1x1 = 2 does not divide the world size 3" in msg


def test_heads_must_divide_ulysses(stage):
    msg = errors_for(stage, 3, "parallel.ulysses=3", "data.seq_length=192")
    assert "parallel.ulysses=3 must divide the 4 query heads of tiny" in msg


def test_ring_refuses_reset_packing(stage):
    msg = errors_for(stage, 2, "parallel.ring=2", "data.reset_position_ids=true")
    assert "parallel.ring=2 with data.reset_position_ids=true" in msg and "use parallel.ulysses" in msg
    layout = validate(load_stage(stage, ["parallel.ring=2", "data.reset_position_ids=false"]), 2)
    assert (layout.ulysses, layout.ring, layout.data) == (1, 2, 1)


def test_batch_arithmetic(stage):
    msg = errors_for(stage, 2, "train.global_batch=3")
    assert "train.global_batch=3 must be a multiple of train.micro_batch x data-parallel ranks = 1 x 2" in msg


def test_missing_files(stage, tmp_path):
    msg = errors_for(stage, 1, f"deepspeed={tmp_path}/nope.json")
    assert "nope.json': file not found (relative to the working directory); point it at a DeepSpeed JSON or name a shipped one: pipeline_bf16_zero1, pipeline_fp32_cpu" in msg
    layout = validate(load_stage(stage, [f"model.tokenizer={tmp_path}/none", "data.root=/nonexistent"]), 1)
    assert any("model.tokenizer" in m for m in layout.missing)
    assert any("captions" in m and "/nonexistent/captions.jsonl" in m for m in layout.missing)


def test_lr_must_cover_trainable_modules(stage):
    msg = errors_for(stage, 1, 'train.lr={"llm": 1e-3}')
    assert "train.lr has no rate for trainable module 'vision'" in msg


def test_all_problems_reported_together(stage):
    msg = errors_for(stage, 1, "precision=fp16", "train.iterations=0", "train.warmup_steps=0")
    assert "2 problem(s)" in msg and "precision='fp16'" in msg and "train.iterations=0" in msg


def test_deepspeed_json_cross_checked(stage, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0}}))
    msg = errors_for(stage, 1, f"deepspeed={ds}")
    assert "'train_micro_batch_size_per_gpu'=2 disagrees with the stage file (1" in msg
    ds.write_text(json.dumps({"bf16": {"enabled": True}}))
    assert "bf16.enabled=True disagrees with precision='fp32'" in errors_for(stage, 1, f"deepspeed={ds}")
    ds.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    assert "remove the 'optimizer' section" in errors_for(stage, 1, f"deepspeed={ds}")
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert validate(load_stage(stage, [f"deepspeed={ds}"]), 2).pipeline == 1  # ZeRO-2/3: the ZeRO engine
    msg = errors_for(stage, 2, f"deepspeed={ds}", "parallel.pipeline=2")
    assert "zero_optimization.stage=2 with parallel.pipeline=2" in msg and "supports ZeRO stage 0 or 1" in msg


def test_zero3_and_param_offload(stage, tmp_path):
    """ZeRO-3 (ds_configs/zero3_*.json) runs at pipeline 1 only; train.param_offload needs ZeRO-3 and is injected
    as zero_optimization.offload_param (the DeepSpeed file may not set it itself), next to optimizer offload."""
    from lvita.config.validate import deepspeed_config

    zero3 = f"deepspeed={REPO}/ds_configs/zero3_fp32_cpu.json"
    cfg = load_stage(stage, [zero3, "train.param_offload=true", "train.optimizer_offload=true"])
    validate(cfg, 2)
    zero = deepspeed_config(cfg, 1, 2, 2)["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"
    msg = errors_for(stage, 2, zero3, "parallel.pipeline=2")
    assert "zero_optimization.stage=3 with parallel.pipeline=2" in msg and "set parallel.pipeline=1" in msg
    assert "train.param_offload=true needs ZeRO stage 3" in errors_for(stage, 2, "train.param_offload=true")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    assert "remove zero_optimization.offload_param; set train.param_offload" in errors_for(stage, 2, f"deepspeed={ds}")
    ds.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    assert "zero_optimization.stage=4; use 0, 1, 2 or 3" in errors_for(stage, 2, f"deepspeed={ds}")
    assert load_stage(stage).train.param_offload is False


@pytest.mark.parametrize("config", ["zero3_bf16.json", "zero3_fp32_cpu.json", "zero2_fp32_cpu.json"])
def test_check_with_zero_configs(config, capsys):
    """`lvita check` (the memory plan included) runs on ZeRO-2/3 configs without crashing."""
    precision = "fp32" if "fp32" in config else "bf16"
    assert check(str(REPO / "stages" / "longvita-14b" / "2_general.json"), 8,
                 [f"deepspeed={REPO}/ds_configs/{config}", "parallel.pipeline=1", f"precision={precision}",
                  "train.param_offload=true" if "zero3" in config else "train.optimizer_offload=true"]) == 0
    out = capsys.readouterr().out
    assert "world 8 = pipeline 1" in out, out


@pytest.mark.parametrize("name", ["1_align", "2_general", "3_long_128k", "4_long_1m"])
def test_longvita_14b_stages_check(name, capsys):
    assert check(str(REPO / "stages" / "longvita-14b" / f"{name}.json"), 64, [f"deepspeed={REPO}/ds_configs/pipeline_bf16_zero1.json"]) == 0
    out = capsys.readouterr().out
    assert "world 64 = pipeline 8" in out
    assert "total 15,083.5M parameters" in out  # the released projector (InternVL's: 15,121.3M)
    assert out.count("pipeline stage ") == 8


def test_check_reports_errors(capsys):
    rc = check(str(REPO / "stages" / "longvita-14b" / "2_general.json"), 60,
               [f"deepspeed={REPO}/ds_configs/pipeline_bf16_zero1.json"])
    assert rc == 2
    assert "does not divide the world size 60" in capsys.readouterr().err


# The world each stage directory is written for: `lvita demo` runs 2 processes, the 14B stages 8 x 8 GPUs.
STAGE_WORLDS = {"demo": 2, "longvita-14b": 64}


@pytest.mark.parametrize("path", sorted((REPO / "stages").glob("*/*.json")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_stage_file_validates_for_a_short_trial(path):
    """A user's first run of a stage file is a short trial (`--set train.iterations=3`): it must
    validate at the stage's own world size and at the smallest one its layout allows."""
    assert path.parent.name in STAGE_WORLDS, f"add {path.parent.name} to STAGE_WORLDS"
    sets = [f"deepspeed={REPO}/{load_stage(path).deepspeed}", "train.iterations=3"]
    cfg = load_stage(path, sets)
    p = cfg.parallel
    for world in (STAGE_WORLDS[path.parent.name], p.pipeline * p.ulysses * p.ring):
        layout = validate(cfg, world)
        assert layout.world == world and layout.data * layout.pipeline * layout.sequence == world
        if cfg.train.warmup_steps > 3:
            assert any("train.warmup_steps" in n and "ends during warmup" in n for n in layout.notes)


def test_warmup_is_a_warning_but_negative_values_are_errors(stage):
    layout = validate(load_stage(stage, ["train.iterations=3", "train.warmup_steps=6"]), 2)
    assert layout.notes == ["train.warmup_steps=6 is longer than train.iterations=3: the run ends during warmup "
                            "(LR at step t = t/6 of train.lr, last step 3/6)"]
    assert validate(load_stage(stage, ["train.iterations=3", "train.warmup_steps=3"]), 2).notes == []
    assert "train.warmup_steps=-1: must be >= 0" in errors_for(stage, 2, "train.warmup_steps=-1")


def test_benchmark_keys_save_final_and_memory_cap(stage):
    cfg = load_stage(stage, ["train.save_final=false", "train.memory_cap_gb=80"])
    assert (cfg.train.save_final, cfg.train.memory_cap_gb) == (False, 80.0)
    assert (load_stage(stage).train.save_final, load_stage(stage).train.memory_cap_gb) == (True, None)
    validate(cfg, 2)
    assert "train.memory_cap_gb=0.0: GiB per process (e.g. 80), or null" in errors_for(stage, 2, "train.memory_cap_gb=0")
    with pytest.raises(ConfigError, match="train.save_final: expected true or false"):
        load_stage(stage, ["train.save_final=no"])


def test_model_format_defaults_per_preset_and_refuses_unknown_values(stage, tmp_path):
    assert load_stage(stage).model.format == "internvl"  # tiny keeps today's InternVL layout
    assert load_stage(stage, ["model.preset=longvita-14b"]).model.format == "longvita"
    assert load_stage(stage, ["model.preset=longvita-1.5b", "model.format=internvl"]).model.format == "internvl"
    released = tmp_path / "released"
    released.mkdir()
    (released / "config.json").write_text(json.dumps({"model_type": "long_vita"}))
    assert load_stage(stage, [f"model.preset={released}"]).model.format == "longvita"
    with pytest.raises(ConfigError, match=r"s.json: model.format='llava': choose \"longvita\""):
        load_stage(stage, ["model.format=llava"])


def test_issue_24_keys_are_checked_with_their_fix(stage):
    """loss_reduction, vision_lr_decay and same_source refuse values they do not know, naming the valid ones; the
    [InternViT, Qwen2] form of init_from leaves the projector random, so freezing it is an error."""
    assert "train.loss_reduction='mean'" in errors_for(stage, 1, "train.loss_reduction=mean")
    msg = errors_for(stage, 1, 'train.vision_lr_decay={"factor": 1.5, "scale": 0.1}')
    assert "train.vision_lr_decay" in msg and "0 < F <= 1" in msg
    assert "train.vision_lr_decay" in errors_for(stage, 1, 'train.vision_lr_decay={"rate": 0.9}')
    assert "data.same_source='source'" in errors_for(stage, 1, "data.same_source=source")
    msg = errors_for(stage, 1, "model.allow_random_frozen=false", 'model.trainable=["llm"]',
                     'model.init_from=["vit", "qwen"]')
    assert "leaves the projector random" in msg and "freezes vision, projector" not in msg
    ok = validate(load_stage(stage, ["train.loss_reduction=sequence", "data.same_source=file",
                                     'train.vision_lr_decay={"factor": 0.9, "scale": 0.1}']), 1)
    assert ok.missing == []
    # a checkpoint (a string init_from) holds every module: freezing any of them is fine
    layout = validate(load_stage(stage, ["model.allow_random_frozen=false", 'model.trainable=["projector"]',
                                         "model.init_from=runs/previous"]), 1)
    assert [m for m in layout.missing if "model.init_from" in m] == \
        ["model.init_from: runs/previous (the previous stage's output_dir or an HF model directory)"]


def test_init_from_without_weights_is_flagged_and_strict_fails(stage, tmp_path, capsys):
    """A directory named by model.init_from that holds no weights (a previous stage that has not saved yet, a
    typo'd folder) is listed to fill in, and ``lvita check --strict`` fails on it; one with weights is fine."""
    empty = tmp_path / "previous"
    (empty / "logs").mkdir(parents=True)
    layout = validate(load_stage(stage, [f"model.init_from={empty}"]), 1)
    assert [m for m in layout.missing if "init_from" in m] == [
        f"model.init_from: {empty} exists but holds no weights (no *.safetensors, pytorch_model*.bin or checkpoint "
        "layer_*-model_states.pt): has the previous stage saved?"]
    assert check(str(stage), 1, [f"model.init_from={empty}"], strict=True) == 2
    printed = capsys.readouterr()
    assert "holds no weights" in printed.out + printed.err
    tag = empty / "checkpoints" / "global_step5"  # an lvita output_dir once its first checkpoint is written
    tag.mkdir(parents=True)
    (tag / "layer_00-model_states.pt").write_bytes(b"x")
    assert not [m for m in validate(load_stage(stage, [f"model.init_from={empty}"]), 1).missing if "init_from" in m]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert not [m for m in validate(load_stage(stage, [f"model.init_from={hf}"]), 1).missing if "init_from" in m]
