"""Resume: exact continuation, crash safety (SIGKILL while training and while saving), other
layouts through universal checkpoints, and the errors for damaged or unfitting checkpoints.

Losses are fp32 on CPU: the same layout must give the uninterrupted run's losses to 1e-6 relative;
another layout sums in another order, so 1e-5 there (the pipeline/data equivalence tolerance is 1e-4).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, stage_dict, write_stage
from tests.distributed import run_world
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
