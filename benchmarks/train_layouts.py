"""Step time of one demo stage under several parallel layouts, side by side in one run.

    python benchmarks/train_layouts.py [--stage stages/demo/2_general.json] [--steps 12]

Runs the stage through the deepspeed launcher (2 processes) as pipeline 1 x data 2 and as
pipeline 2 x data 1, and with 2 OpenMP threads per process (oversubscribed on 2 cores; lvita
splits the cores itself unless OMP_NUM_THREADS is set), and prints the median
step time, tokens/s and peak memory per layout from each run's metrics.jsonl (first two steps
dropped as warm-up). Needs the demo data: run `lvita demo --data-only` first.
Ratios are what to read on CPU; absolute times only mean something on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lvita.training.loop import free_port

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "pipeline 1 x data 2": (["parallel.pipeline=1"], {}),
    "pipeline 2 x data 1": (["parallel.pipeline=2"], {}),
    "pipeline 1 x data 2, 2 threads per process": (["parallel.pipeline=1"], {"OMP_NUM_THREADS": "2"}),
}


def run(stage: str, steps: int, sets: list[str], env_change: dict, out: Path) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, **env_change}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "lvita.train", "--stage", stage, "--set", f"train.iterations={steps}",
           "--set", f"output_dir={out}", "--set", "model.init_from=null", *sum((["--set", s] for s in sets), [])]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]
    return {"step_s": statistics.median(x["step_time_s"] for x in m),
            "tok_s": statistics.median(x["tokens_per_sec"] for x in m),
            "peak_gb": max(x["peak_memory_gb"] for x in m)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="stages/demo/2_general.json")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {name: run(args.stage, args.steps, sets, env, Path(tmp) / str(i))
                for i, (name, (sets, env)) in enumerate(LAYOUTS.items())}
    base = rows["pipeline 1 x data 2"]["step_s"]
    print(f"{'layout':45s} {'median step s':>14s} {'tokens/s':>10s} {'peak GB':>8s} {'step / base':>12s}")
    for name, r in rows.items():
        print(f"{name:45s} {r['step_s']:14.3f} {r['tok_s']:10.0f} {r['peak_gb']:8.2f} {r['step_s'] / base:12.2f}")


if __name__ == "__main__":
    main()
