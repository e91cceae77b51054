"""What one small training run promises, checked on one shared 3-step fp32 run (1 process): bad
records are skipped and counted by reason in metrics.jsonl (``skipped``) and TensorBoard
(``data/skipped/<reason>``); ``train.log_every`` thins the metrics; and the resumes lvita refuses,
each with a clear error (exit 2) before anything is written: another precision, another ZeRO stage, a
ZeRO-0 checkpoint at another pipeline degree, a weights-only checkpoint (``lvita convert from-hf``).
Also ``max_samples`` caps a source's records per mixture pass."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, stage_dict, write_dataset, write_stage
from tests.distributed import run_world
from tests.test_training import _metrics, _train

BAD = ["not json {",  # malformed_json
       json.dumps({"id": "no-answer", "messages": [{"role": "user", "content": "hi"}]}),  # no_assistant_turn
       json.dumps({"id": "no-file", "images": ["images/missing.png"], "messages": [  # bad_media
           {"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A circle."}]})]
SKIPPED = {"malformed_json": 1, "no_assistant_turn": 1, "bad_media": 1}
ZERO0 = {"bf16": {"enabled": False}, "zero_optimization": {"stage": 0},
         "pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_dir):
    """3 steps, metrics every 2nd step; the text source opens with three bad records (a source is read
    in file order; the run reads well over three text records and fewer than one pass of the mixture,
    so each bad record is read exactly once)."""
    root = tmp_path_factory.mktemp("stage_run")
    data = write_dataset(root / "data", n_text=120)
    text = data / "text.jsonl"
    text.write_text("\n".join(BAD) + "\n" + text.read_text())
    cfg = stage_dict(tokenizer_dir, data, root / "out", iterations=3, log_every=2)
    cfg["data"].update(pack_buffer=8, prefetch=1)  # plan ahead little: fewer records read than in one pass
    stage = write_stage(root / "s.json", cfg)
    run_world(_train, 1, str(stage), [])
    (root / "zero0.json").write_text(json.dumps(ZERO0))
    return root, stage


def _board(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    return board


def test_log_every_thins_the_metrics(run):
    root, _ = run
    assert [m["step"] for m in _metrics(root / "out")] == [2, 3]  # train.log_every=2, and always the last step
    assert [e.step for e in _board(root / "out").Scalars("train/loss")] == [2, 3]


def test_skipped_counts_in_metrics_and_tensorboard(run):
    root, _ = run
    assert _metrics(root / "out")[-1]["skipped"] == SKIPPED
    board = _board(root / "out")
    tags = board.Tags()["scalars"]
    assert {t for t in tags if t.startswith("data/skipped/")} == {f"data/skipped/{r}" for r in SKIPPED}
    for reason, n in SKIPPED.items():
        last = board.Scalars(f"data/skipped/{reason}")[-1]
        assert (last.step, last.value) == (3, n)


# -- refused resumes -------------------------------------------------------------------------------

def _refused(monkeypatch, capsys, stage, out: Path, sets: list[str], world: int = 1) -> str:
    """lvita.train in this process up to its resume check (rank 0 of ``world``); returns the error."""
    from lvita.train import main

    def past_the_check(*a, **k):
        raise AssertionError("lvita.train went past its resume check")

    monkeypatch.setattr("lvita.parallel.topology.init_distributed", past_the_check)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29599").items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert main(["--stage", str(stage), "--set", f"output_dir={out}", *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lvita.train: error: resume=")
    assert not out.exists() or not any(out.iterdir()), "a refused resume wrote into output_dir"
    return err


def _ckpt(run) -> Path:
    return run[0] / "out" / "checkpoints" / "global_step3"


def _plan(stage, sets, world, zero):
    """lvita.ckpt.resume.plan for the stage with ``sets`` at ``world`` processes and ZeRO ``zero``."""
    from lvita.ckpt import resume
    from lvita.ckpt.checkpoint import tokenizer_fingerprint
    from lvita.config.schema import load_stage
    from lvita.config.validate import validate
    from lvita.data.tokenizer import load_tokenizer

    cfg = load_stage(stage, sets)
    return resume.plan(cfg, resume.layout_info(validate(cfg, world), world, zero),
                       tokenizer_fingerprint(load_tokenizer(cfg.model.tokenizer)))


def test_resume_at_the_saved_settings_is_planned(run, tmp_path):
    """The control: the same checkpoint with the run's own settings is accepted (DeepSpeed's files)."""
    p = _plan(run[1], [f"resume={_ckpt(run)}", f"output_dir={tmp_path / 'x'}"], 1, 1)
    assert p.step == 3 and not p.universal and p.same_ranks


def test_resume_refuses_another_precision(run, tmp_path, monkeypatch, capsys):
    err = _refused(monkeypatch, capsys, run[1], tmp_path / "x", [
        f"resume={_ckpt(run)}", "precision=bf16", f"deepspeed={REPO / 'ds_configs' / 'pipeline_bf16_zero1.json'}"])
    assert "saved with precision=fp32" in err and "set precision=fp32" in err


def test_resume_refuses_another_zero_stage(run, tmp_path, monkeypatch, capsys):
    err = _refused(monkeypatch, capsys, run[1], tmp_path / "x", [
        f"resume={_ckpt(run)}", f"deepspeed={run[0] / 'zero0.json'}"])
    assert "saved with ZeRO stage 1, this run uses 0" in err


def test_resume_refuses_a_zero0_checkpoint_at_another_pipeline_degree(run, tmp_path, monkeypatch, capsys):
    """A ZeRO-0 checkpoint (this run's, its manifest saying ZeRO stage 0): data degree may change,
    the pipeline degree may not."""
    copy = tmp_path / "zero0" / "checkpoints" / "global_step3"
    shutil.copytree(_ckpt(run), copy)
    manifest = json.loads((copy / "lvita_manifest.json").read_text())
    manifest["layout"]["zero_stage"] = 0
    (copy / "lvita_manifest.json").write_text(json.dumps(manifest))
    zero0 = f"deepspeed={run[0] / 'zero0.json'}"
    p = _plan(run[1], [f"resume={copy}", zero0, "parallel.pipeline=1", f"output_dir={tmp_path / 'x'}"], 2, 0)
    assert p.step == 3 and not p.universal  # data 1 -> 2 at pipeline 1: loads as it is
    err = _refused(monkeypatch, capsys, run[1], tmp_path / "x", [f"resume={copy}", zero0, "parallel.pipeline=2"],
                   world=2)
    assert "saved at pipeline 1 with ZeRO stage 0" in err and "pipeline 2" in err


def test_resume_refuses_a_weights_only_checkpoint(run, tmp_path, monkeypatch, capsys, tokenizer_dir):
    from lvita.ckpt.convert import from_hf
    from lvita.ckpt.hf import write_hf_dir
    from lvita.data.tokenizer import load_tokenizer, special_token_ids
    from lvita.model.longvita import LongVita

    img = special_token_ids(load_tokenizer(tokenizer_dir))["img_context"]
    hf = write_hf_dir(LongVita("tiny", img, seed=0).state_dict(), "tiny", tokenizer_dir, tmp_path / "hf", img)
    from_hf([str(hf)], str(tmp_path / "lv"), "tiny", log=lambda *a: None)
    err = _refused(monkeypatch, capsys, run[1], tmp_path / "x", [f"resume={tmp_path / 'lv'}"])
    assert "holds weights only" in err and "model.init_from" in err


# -- max_samples ----------------------------------------------------------------------------------

def test_max_samples_caps_a_source_per_pass(dataset_dir):
    from lvita.config.schema import DataConfig, SourceConfig
    from lvita.data.sources import Mixture

    cfg = DataConfig(root=str(dataset_dir), sources=[SourceConfig("captions", ["captions.jsonl"]),
                                                     SourceConfig("text", ["text.jsonl"], ratio=2.0, max_samples=5)])
    mix = Mixture(cfg, seed=0)
    assert mix.pass_size == 24 + 5
    for _ in range(2):  # two passes: 5 text records each, read on in file order
        got = [mix.next() for _ in range(mix.pass_size)]
        assert sum(r.source == "text" for r in got) == 5 and sum(r.source == "captions" for r in got) == 24
    texts = [r.raw["id"] for r in got if r.source == "text"]
    assert texts == [f"txt-{i}" for i in range(5, 10)]
