"""The longest sequence one GPU trains, per memory-lever set, against plain transformers.

    python benchmarks/longest_context.py                      # longvita-1.5b, bf16, one GPU
    python benchmarks/longest_context.py --levers ckpt tiled --start 65536 --max 1048576 --refine 2
    python benchmarks/longest_context.py --preset tiny --precision fp32 --start 512 --max 2048 --no-peer  # CPU plumbing

For each lever set (``ckpt``: activation checkpointing only; ``tiled``: + tiled MLP; ``offload``:
+ activation offload; ``optim``: + optimizer offload) it runs ``lvita.train`` itself (the
``deepspeed`` launcher and the real entry point, one process, ``--steps`` optimizer steps) on one
causal packed sequence of L tokens (stage 3-4 style: long text, positions not reset, every token
labelled), doubling L from ``--start`` until a run fails (CUDA out of memory) or passes ``--max``,
then bisecting ``--refine`` times. Each success records tokens/s, model TFLOPs and MFU (from the
run's metrics.jsonl, last step), the measured peak memory (``torch.cuda.max_memory_allocated``)
and the memory plan's prediction for the same stage (``lvita.config.memory_plan``). In the same run the
peer: transformers' ``Qwen2ForCausalLM`` with the same shapes, its gradient checkpointing and its
standard loss (full logits), AdamW, one process per length, doubled and bisected the same way.

Results are appended to ``--out`` (JSON lines) as soon as each trial ends and printed as a table
at the end. Trade-off: a trial is a whole process start (tens of seconds with a 1.5B model); the
time limit per trial (``--trial-timeout``) counts as a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LEVERS = {"ckpt": {"model.activation_checkpointing": True},
          "tiled": {"model.activation_checkpointing": True, "model.tiled_mlp": True},
          "offload": {"model.activation_checkpointing": True, "model.tiled_mlp": True, "model.activation_offload": True},
          "optim": {"model.activation_checkpointing": True, "model.tiled_mlp": True, "model.activation_offload": True,
                    "train.optimizer_offload": True}}


def make_data(root: Path, tokenizer: Path, length: int) -> None:
    """One text sample longer than ``length`` tokens (the packer truncates it to the sequence)."""
    words = " ".join(f"w{i % 997}" for i in range(length + 64))
    (root / "long.jsonl").write_text(json.dumps({"id": f"long-{length}", "messages": [
        {"role": "user", "content": "Repeat."}, {"role": "assistant", "content": words}]}) + "\n")


def stage(args, root: Path, length: int, levers: dict) -> dict:
    cfg = {"name": f"longest-{length}", "output_dir": str(root / "out"), "seed": 0, "precision": args.precision,
           "deepspeed": str(REPO / "ds_configs" / ("pipeline_bf16_zero1.json" if args.precision == "bf16"
                                                   else "pipeline_fp32_cpu.json")),
           "model": {"preset": args.preset, "tokenizer": str(root / "tokenizer"), "trainable": ["projector", "llm"],
                     "logits_chunk": 8192},
           "train": {"iterations": args.steps, "global_batch": 1, "micro_batch": 1, "warmup_steps": 0,
                     "lr": {"projector": 1e-5, "llm": 1e-5}, "save_every": 10**9, "keep_checkpoints": 1},
           "data": {"root": str(root), "seq_length": length, "reset_position_ids": False, "same_source": False,
                    "pack_buffer": 1, "workers": 1, "max_skip_fraction": 1.0,
                    "sources": [{"name": "long", "paths": ["long.jsonl"]}]},
           "resume": "none"}
    for key, value in levers.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def lvita_trial(args, root: Path, length: int, lever: str) -> dict:
    import shutil

    shutil.rmtree(root / "out", ignore_errors=True)
    make_data(root, root / "tokenizer", length)
    cfg = stage(args, root, length, LEVERS[lever])
    path = root / "stage.json"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--module", "lvita.train",
           "--stage", str(path), "--set", f"train.save_every={args.steps + 1}"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.trial_timeout)
        ok, text = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        ok, text = False, f"timeout after {args.trial_timeout}s {e.stdout or ''}"
    row = {"who": f"lvita {lever}", "length": length, "ok": ok, "wall_s": round(time.perf_counter() - t0, 1)}
    metrics = root / "out" / "metrics.jsonl"
    if ok and metrics.is_file():
        last = json.loads(metrics.read_text().splitlines()[-1])
        row.update({k: last.get(k) for k in ("tokens_per_sec", "tflops_per_gpu", "mfu", "peak_memory_gb")})
    else:
        row["error"] = "out of memory" if "out of memory" in text.lower() else text[-600:]
    row["plan_gb"] = plan_gb(path)
    return row


def plan_gb(stage_path: Path) -> float | None:
    from lvita.config.check import stage_table
    from lvita.config.schema import load_stage
    from lvita.config.memory_plan import memory_plan
    from lvita.config.validate import validate

    cfg = load_stage(stage_path)
    layout = validate(cfg, 1)
    return round(memory_plan(cfg, layout, stage_table(cfg, 1)).bound.total / 2**30, 2)


PEER = r"""
import sys, time, torch
from transformers import Qwen2ForCausalLM
from lvita.model.presets import llm_config
length, steps, dtype = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3])
cfg = llm_config(sys.argv[4]); cfg._attn_implementation = "sdpa"
dev = "cuda" if torch.cuda.is_available() else "cpu"
model = Qwen2ForCausalLM(cfg).to(dev, dtype); model.gradient_checkpointing_enable(); model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
ids = torch.randint(0, cfg.vocab_size, (1, length), device=dev)
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    if dev == "cuda": torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
print("RESULT", length / times[-1], peak)
"""


def peer_trial(args, length: int) -> dict:
    cmd = [sys.executable, "-c", PEER, str(length), str(args.steps), args.precision.replace("bf16", "bfloat16")
           .replace("fp32", "float32"), args.preset]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.trial_timeout)
        ok, text = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        ok, text = False, "timeout"
    row = {"who": "transformers", "length": length, "ok": ok, "wall_s": round(time.perf_counter() - t0, 1)}
    if ok:
        tps, peak = next(line for line in text.splitlines() if line.startswith("RESULT")).split()[1:]
        row.update(tokens_per_sec=float(tps), peak_memory_gb=float(peak))
    else:
        row["error"] = "out of memory" if "out of memory" in text.lower() else text[-600:]
    return row


def search(trial, start: int, stop: int, refine: int, record) -> int | None:
    """Double from ``start`` until a failure or ``stop``, then bisect ``refine`` times; returns the
    longest length that ran (None: not even ``start``)."""
    good, bad, length = None, None, start
    while length <= stop:
        if record(trial(length))["ok"]:
            good, length = length, length * 2
        else:
            bad = length
            break
    for _ in range(refine if good and bad else 0):
        mid = (good + bad) // 2 // 1024 * 1024
        if mid in (good, bad):
            break
        if record(trial(mid))["ok"]:
            good = mid
        else:
            bad = mid
    return good


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="longvita-1.5b")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    ap.add_argument("--start", type=int, default=32768)
    ap.add_argument("--max", type=int, default=1 << 20)
    ap.add_argument("--refine", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--trial-timeout", type=int, default=600)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-only", action="store_true", help="only the transformers peer (from --start/4)")
    ap.add_argument("--out", default="longest_context.jsonl")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []

    def record(row):
        rows.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from lvita.data.tokenizer import train_demo_tokenizer

        train_demo_tokenizer(root / "tokenizer")
        longest = {}
        if not args.no_peer:
            longest["transformers"] = search(lambda n: peer_trial(args, n), args.start // 4, args.max, args.refine, record)
        for lever in [] if args.peer_only else args.levers:
            longest[f"lvita {lever}"] = search(lambda n: lvita_trial(args, root, n, lever), args.start, args.max,
                                               args.refine, record)
    print("\n| run | longest tokens | tokens/s | TFLOPs/GPU | MFU | peak GB | plan GB |\n|---|---|---|---|---|---|---|")
    for who, n in longest.items():
        row = next((r for r in rows if r["who"] == who and r["length"] == n and r["ok"]), {})
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {who} | {n or 'none'} | {fmt(row.get('tokens_per_sec'), ',.0f')} | "
              f"{fmt(row.get('tflops_per_gpu'), '.1f')} | {fmt(row.get('mfu'), '.1%')} | "
              f"{fmt(row.get('peak_memory_gb'), '.1f')} | {fmt(row.get('plan_gb'), '.1f')} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
