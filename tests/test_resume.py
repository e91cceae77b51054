"""Resume: exact continuation, crash safety (SIGKILL while training and while saving), other
layouts through universal checkpoints, and the errors for damaged or unfitting checkpoints.

Losses are fp32 on CPU. Noise: the same layout repeats the same arithmetic (bit-identical here at 1
and 2 threads and under ATEN_CPU_CAPABILITY=avx2; logged ratios in tests/README.md), so 1e-6 there;
another layout sums in another order (~1e-7), so 1e-5. Bug: what a resume can lose moves the next
losses by ~4e-3 (Adam moments; tests/measure_noise.py bf16), a data position restarted changes the
batch (loss ~1e-1 apart), an LR position lost changes the step size (estimated >= 1e-3 here).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, stage_dict, write_stage
from tests.distributed import THREADS, run_world, wait_for_file
from tests.test_training import _metrics, _train


def _copy_tag(src_out: Path, tag: str, dst_out: Path) -> None:
    shutil.copytree(src_out / "checkpoints" / tag, dst_out / "checkpoints" / tag)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_dir, dataset_dir):
    """An uninterrupted 6-step run at pipeline 1 x data 2, checkpoints every 2 steps, newest 2 kept."""
    root = tmp_path_factory.mktemp("resume")
    cfg = stage_dict(tokenizer_dir, dataset_dir, root / "ref", iterations=6, save_every=2, keep_checkpoints=2)
    stage = write_stage(root / "s.json", cfg)
    losses = run_world(_train, 2, str(stage), [])[0]
    return root, stage, losses


def test_exact_resume_keeps_newest_checkpoints(reference):
    root, stage, ref = reference
    ckpts = root / "ref" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("global_step")) == ["global_step4", "global_step6"]
    assert (ckpts / "latest").read_text() == "global_step6"
    out = root / "again"
    _copy_tag(root / "ref", "global_step4", out)
    losses = run_world(_train, 2, str(stage), [f"output_dir={out}"])[0]
    assert losses == pytest.approx(ref[4:], rel=1e-6)
    assert [m["step"] for m in _metrics(out)] == [5, 6]
    # a finished run resumed again has nothing to do
    assert run_world(_train, 2, str(stage), [f"output_dir={out}"])[0] == []


@pytest.mark.parametrize("sets", [["parallel.pipeline=2"], ["parallel.ulysses=2"]], ids=["pp2", "ulysses2"])
def test_resume_at_another_layout(reference, sets):
    """Saved at pipeline 1 x data 2; resumed at pipeline 2 (universal conversion) or at Ulysses 2
    (same DeepSpeed data degree: DeepSpeed's own files load)."""
    root, stage, ref = reference
    out = root / f"to_{sets[0]}"
    _copy_tag(root / "ref", "global_step4", out)
    losses = run_world(_train, 2, str(stage), [f"output_dir={out}", *sets])[0]
    assert losses == pytest.approx(ref[4:], rel=1e-5)
    universal = out / "checkpoints" / "universal" / "global_step4"
    assert universal.is_dir() == ("pipeline" in sets[0])


def test_resume_data_parallel_from_pipeline(tmp_path, tokenizer_dir, dataset_dir):
    cfg = stage_dict(tokenizer_dir, dataset_dir, tmp_path / "pp2", iterations=4, save_every=2)
    stage = str(write_stage(tmp_path / "s.json", cfg))
    ref = run_world(_train, 2, stage, ["parallel.pipeline=2"])[0]
    _copy_tag(tmp_path / "pp2", "global_step2", tmp_path / "dp2")
    losses = run_world(_train, 2, stage, ["parallel.pipeline=1", f"output_dir={tmp_path / 'dp2'}"])[0]
    assert losses == pytest.approx(ref[2:], rel=1e-5)


# -- crash safety -------------------------------------------------------------------------------------

def _start(stage: Path, out: Path, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, **(env_extra or {})}
    cmd = [sys.executable, "-m", "lvita.train", "--stage", str(stage), "--set", f"output_dir={out}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-4000:]
    return text


def test_sigkill_while_training_and_while_saving(tmp_path, tokenizer_dir, dataset_dir):
    cfg = stage_dict(tokenizer_dir, dataset_dir, tmp_path / "x", iterations=5, save_every=1)
    stage = write_stage(tmp_path / "s.json", cfg)
    ref = run_world(_train, 1, str(stage), [f"output_dir={tmp_path / 'ref'}"])[0]  # uninterrupted, in-process

    # killed during step 3 or 4, once step 2's checkpoint is complete
    out = tmp_path / "killed"
    proc = _start(stage, out)
    done = out / "checkpoints" / "global_step2" / "lvita_manifest.json"
    alive = wait_for_file(proc, done, 300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive and done.is_file(), f"exit code {proc.returncode}, global_step2 complete: {done.is_file()}"
    assert proc.returncode == -signal.SIGKILL
    latest = (out / "checkpoints" / "latest").read_text()  # frozen by the kill
    assert 1 <= int(latest.removeprefix("global_step")) < 5, latest  # killed before the final step 5
    text = _finish(_start(stage, out))
    assert "resumed from" in text
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in _metrics(out)] == pytest.approx(ref, rel=1e-6)

    # killed while saving step 3: DeepSpeed's files are written, the manifest is not
    out = tmp_path / "killed_saving"
    proc = _start(stage, out, {"LVITA_FAULT_KILL_BEFORE_MANIFEST": "global_step3"})
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert (ckpts / "global_step3" / "layer_00-model_states.pt").is_file()
    assert not (ckpts / "global_step3" / "lvita_manifest.json").exists()
    assert (ckpts / "latest").read_text() == "global_step2"
    text = _finish(_start(stage, out))
    assert "global_step2 at step 2" in text
    assert [m["loss"] for m in _metrics(out)] == pytest.approx(ref, rel=1e-6)
    assert (ckpts / "global_step3" / "lvita_manifest.json").is_file() and (ckpts / "latest").read_text() == "global_step5"


# -- bad checkpoints: a clear error, nothing overwritten ------------------------------------------------

def _fails(stage: Path, out: Path, *sets: str) -> str:
    """Run lvita.train expecting exit 2; returns stderr; the output_dir must be untouched."""
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")} if out.exists() else {}
    env = {**os.environ, "OMP_NUM_THREADS": THREADS}
    cmd = [sys.executable, "-m", "lvita.train", "--stage", str(stage), "--set", f"output_dir={out}"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before if out.exists() else True
    return proc.stderr


@pytest.fixture
def damaged(reference, tmp_path):
    root, stage, _ = reference
    out = tmp_path / "out"
    _copy_tag(root / "ref", "global_step4", out)
    return stage, out, out / "checkpoints" / "global_step4"


def test_missing_shard(damaged):
    stage, out, tag = damaged
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    err = _fails(stage, out)
    assert "missing file zero_pp_rank_1_mp_rank_00_optim_states.pt" in err and "global_step4" in err


def test_truncated_file(damaged):
    stage, out, tag = damaged
    f = tag / "layer_03-model_states.pt"
    f.write_bytes(f.read_bytes()[:1000])
    err = _fails(stage, out)
    assert "layer_03-model_states.pt is 1000 bytes but was saved with" in err


def test_model_and_tokenizer_mismatch(damaged, tmp_path):
    from lvita.data.tokenizer import train_demo_tokenizer

    stage, out, tag = damaged
    assert "resume=none but output_dir" in _fails(stage, out, "resume=none")
    assert "saved for model.preset='tiny' but this stage has model.preset='longvita-1.5b'" in _fails(
        stage, out, "model.preset=longvita-1.5b")
    # same shapes, the other format (projector and input layout): resume and init_from are refused
    for sets in (["model.format=longvita"], ["resume=none", f"model.init_from={out}", "model.format=longvita"]):
        err = _fails(stage, out if sets[0] != "resume=none" else tmp_path / "fresh", *sets)
        assert "saved in model.format='internvl' but this stage has model.format='longvita'" in err, err
    other = train_demo_tokenizer(tmp_path / "tok", vocab_size=900)
    err = _fails(stage, out, f"model.tokenizer={other}")
    assert "tokenizer vocabulary differs" in err and "900" in err
    assert "model.tokenizer has" in _fails(stage, tmp_path / "new", f"model.init_from={out}",
                                           f"model.tokenizer={other}")


def test_incomplete_or_foreign_checkpoints(damaged, tmp_path):
    stage, out, tag = damaged
    (tag / "lvita_manifest.json").unlink()
    assert "incomplete (no lvita_manifest.json" in _fails(stage, tmp_path / "new", f"resume={tag}")
    shutil.copytree(tag, out / "checkpoints" / "global_step2")
    err = _fails(stage, tmp_path / "new2", f"resume={out}")
    assert "no complete checkpoint there (incomplete: global_step2, global_step4)" in err


def test_frozen_stage_resumes_at_pipeline_2(tmp_path, tokenizer_dir, dataset_dir):
    """Stage 1 trains only the projector: at pipeline 2 the second stage trains nothing and holds a
    placeholder weight that the pipeline-1 checkpoint never had."""
    cfg = stage_dict(tokenizer_dir, dataset_dir, tmp_path / "dp2", iterations=4, save_every=2)
    cfg["model"]["trainable"] = ["projector"]
    cfg["train"]["lr"] = {"projector": 1e-2}
    stage = str(write_stage(tmp_path / "s.json", cfg))
    ref = run_world(_train, 2, stage, [])[0]
    _copy_tag(tmp_path / "dp2", "global_step2", tmp_path / "pp2")
    losses = run_world(_train, 2, stage, ["parallel.pipeline=2", f"output_dir={tmp_path / 'pp2'}"])[0]
    assert losses == pytest.approx(ref[2:], rel=1e-5)
