"""GPU correctness (skipped without CUDA): the bf16 varlen attention path equals per-sample SDPA on a
reset-packed batch; one `lvita.train` step of longvita-1.5b on one GPU with each memory lever; the
memory plan within 15% of torch.cuda.max_memory_allocated at three lengths.

    python -m pytest -q tests/test_gpu.py           # on a GPU machine (benchmarks/gpu_suite.sh runs it)
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_varlen_attention_equals_per_sample_sdpa():
    from lvita.model.attention import _sdpa, local_attention

    torch.manual_seed(0)
    lengths, hq, hkv, d = [700, 1, 300, 1047], 12, 2, 128
    total = sum(lengths)
    q = torch.randn(1, total, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, total, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    got = local_attention(q, k, v, cu_seqlens=cu)
    want = torch.cat([_sdpa(q[:, a:b], k[:, a:b], v[:, a:b], None) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())],
                     dim=1)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


LEVER_SETS = {"checkpointing": [], "tiled MLP": ["model.tiled_mlp=true"],
              "activation offload": ["model.tiled_mlp=true", "model.activation_offload=true"],
              "optimizer offload": ["train.optimizer_offload=true"]}


def _stage(tmp_path, tokenizer_dir, length: int):
    from benchmarks.longest_context import make_data

    make_data(tmp_path, tokenizer_dir, length)
    (tmp_path / "tokenizer").symlink_to(tokenizer_dir)
    import argparse

    from benchmarks.longest_context import stage

    cfg = stage(argparse.Namespace(preset="longvita-1.5b", precision="bf16", steps=1), tmp_path, length,
                {"model.activation_checkpointing": True})
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("lever", list(LEVER_SETS))
def test_one_training_step_per_lever(tmp_path, tokenizer_dir, lever):
    path = _stage(tmp_path, tokenizer_dir, 8192)
    sets = sum((["--set", s] for s in LEVER_SETS[lever]), [])
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--module",
                           "lvita.train", "--stage", str(path), *sets], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss"] == last["loss"] and last["loss"] > 0 and last["mfu"] is not None


@pytest.mark.parametrize("length", [8192, 16384, 32768])
def test_plan_within_15_percent_of_the_measured_peak(tmp_path, tokenizer_dir, length):
    from benchmarks.longest_context import plan_gb

    path = _stage(tmp_path, tokenizer_dir, length)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--module",
                           "lvita.train", "--stage", str(path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    measured = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])["peak_memory_gb"]
    assert plan_gb(path) == pytest.approx(measured, rel=0.15), (plan_gb(path), measured)
