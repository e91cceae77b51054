"""GPU correctness (skipped without CUDA): the bf16 varlen attention path equals per-sample SDPA on a
reset-packed batch; one `lvita.train` step of longvita-1.5b on one GPU with each memory lever; the
memory plan within 15% of torch.cuda.max_memory_allocated at three lengths.

    python -m pytest -q tests/test_gpu.py           # on a GPU machine (benchmarks/gpu_suite.sh runs it)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    # bf16: noise ~1 bf16 ulp (3.9e-3) of outputs ~1 between two kernels' accumulation orders; bug: a sample
    # seeing its neighbour or a wrong segment, ~1e-1
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


LEVER_SETS = {"checkpointing": [], "tiled MLP": ["model.tiled_mlp=true"],
              "activation offload": ["model.tiled_mlp=true", "model.activation_offload=true"],
              "optimizer offload": ["train.optimizer_offload=true"]}


_RUNS: dict = {}
PRESET, PRECISION = "longvita-1.5b", "bf16"


def _run(tmp_path_factory, tokenizer_dir, length: int, sets: tuple = ()) -> tuple[Path, dict]:
    """One ``lvita.train`` launch (2 optimizer steps, so the last step's figures are past warm-up) of
    longvita-1.5b at ``length`` tokens with checkpointing plus ``sets``; a run two tests ask for is
    launched once. Returns the stage file and the last metrics.jsonl row (printed: run with ``-s``)."""
    key = (length, sets)
    if key not in _RUNS:
        import argparse

        from benchmarks.longest_context import make_data, stage

        root = tmp_path_factory.mktemp(f"gpu{length}")
        make_data(root, tokenizer_dir, length)
        (root / "tokenizer").symlink_to(tokenizer_dir)
        cfg = stage(argparse.Namespace(preset=PRESET, precision=PRECISION, steps=2), root, length,
                    {"model.activation_checkpointing": True})
        path = root / "stage.json"
        path.write_text(json.dumps(cfg))
        args = sum((["--set", s] for s in sets), [])
        proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--module",
                               "lvita.train", "--stage", str(path), *args], cwd=REPO, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        last = json.loads((root / "out" / "metrics.jsonl").read_text().splitlines()[-1])
        print(f"\nGPU-RUN {json.dumps({'length': length, 'sets': list(sets), **last})}")
        _RUNS[key] = path, last
    return _RUNS[key]


@pytest.mark.parametrize("lever", list(LEVER_SETS))
def test_one_training_step_per_lever(tmp_path_factory, tokenizer_dir, lever):
    _, last = _run(tmp_path_factory, tokenizer_dir, 8192, tuple(LEVER_SETS[lever]))
    assert last["loss"] == last["loss"] and last["loss"] > 0 and last["mfu"] is not None


@pytest.mark.parametrize("length", [8192, 16384, 32768])
def test_plan_within_15_percent_of_the_measured_peak(tmp_path_factory, tokenizer_dir, length):
    from benchmarks.longest_context import plan_gb

    path, last = _run(tmp_path_factory, tokenizer_dir, length)
    # the goal, not a noise bound: allocator fragmentation and workspaces (~5-10%) vs a plan that
    # misses a term (one activation per layer: >= 15% at these lengths)
    assert plan_gb(path) == pytest.approx(last["peak_memory_gb"], rel=0.15), (plan_gb(path), last["peak_memory_gb"])
