"""The longest sequence one GPU trains, per memory-lever set, against plain transformers.

    python benchmarks/longest_context.py --memory-cap-gb 80            # longvita-1.5b, bf16, one GPU
    python benchmarks/longest_context.py --levers ckpt tiled --start 65536 --max 1048576 --refine 2
    python benchmarks/longest_context.py --preset tiny --precision fp32 --start 512 --max 2048 --no-peer  # CPU plumbing

For each lever set (``ckpt``: activation checkpointing only; ``tiled``: + tiled MLP; ``offload``:
+ activation offload; ``optim``: + optimizer offload) it runs ``lvita.train`` itself (the real entry
point, one process, ``--steps`` optimizer steps, ``train.save_final=false``: nothing saved) on one
causal packed sequence of L tokens (stage 3-4 style: long text, positions not reset, every token
labelled), doubling L from ``--start`` until a run runs out of memory or passes ``--max``, then
bisecting ``--refine`` times between the longest success and that failure. ``--memory-cap-gb`` limits
each trial to that much GPU memory (``train.memory_cap_gb``: measure for 80 GB GPUs on a larger one).
Each success records tokens/s, model TFLOPs and MFU (from the run's metrics.jsonl, last step), the
peaks of allocated and reserved GPU memory and the memory plan's prediction for the same stage
(``lvita.config.memory_plan``). The peer: transformers' ``Qwen2ForCausalLM`` with the same shapes,
its gradient checkpointing and its standard loss (full logits), AdamW, one process per length, built
on the GPU, searched the same way under the same cap.

Trials run through :mod:`benchmarks.trials` (own process group, killed whole on timeout, the next
starts once the GPU is free). Only out-of-memory is read as the length limit: a timeout ends a search
too (a longer trial cannot finish sooner) but is reported as such; another failure (a crash, a full
disk) is recorded and the search goes on to the next length. Rows are appended to ``--out`` (JSON
lines) as soon as each trial ends and printed as a table at the end. Trade-off: a trial is a whole
process start (about 20-30 s with a 1.5B model on a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.trials import run_trial  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LEVERS = {"ckpt": {"model.activation_checkpointing": True},
          "tiled": {"model.activation_checkpointing": True, "model.tiled_mlp": True},
          "offload": {"model.activation_checkpointing": True, "model.tiled_mlp": True, "model.activation_offload": True},
          "optim": {"model.activation_checkpointing": True, "model.tiled_mlp": True, "model.activation_offload": True,
                    "train.optimizer_offload": True}}
# ZeRO-3 at pipeline 1 (the engine of issue 31): on one GPU only offload shrinks the weights' share, so
# the sets start from every activation lever and add the optimizer's, then the parameters' offload
ZERO3_LEVERS = {"z3-optim": {**LEVERS["optim"], "deepspeed": "zero3"},
                "z3-param": {**LEVERS["optim"], "train.param_offload": True, "deepspeed": "zero3"}}
FIGURES = ("tokens_per_sec", "tflops_per_gpu", "mfu", "step_time_s", "peak_memory_gb", "peak_reserved_gb")


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
                     "allow_random_frozen": True, "logits_chunk": 8192},  # a random model: memory and speed only
           "train": {"iterations": args.steps, "global_batch": 1, "micro_batch": 1, "warmup_steps": 0,
                     "lr": {"projector": 1e-5, "llm": 1e-5}, "save_final": False,
                     "memory_cap_gb": args.memory_cap_gb},
           "data": {"root": str(root), "seq_length": length, "reset_position_ids": False, "same_source": False,
                    "pack_buffer": 1, "workers": 1, "max_skip_fraction": 1.0,
                    "sources": [{"name": "long", "paths": ["long.jsonl"]}]},
           "resume": "none"}
    for key, value in levers.items():
        if key == "deepspeed":  # the ZeRO-3 engine: the shipped ZeRO-3 config of the precision
            cfg["deepspeed"] = str(REPO / "ds_configs" / ("zero3_bf16.json" if args.precision == "bf16"
                                                          else "zero3_fp32_cpu.json"))
            continue
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def lvita_trial(args, root: Path, length: int, lever: str, log: Path, timeout: float | None = None) -> dict:
    """One ``python -m lvita.train`` run of ``--steps`` steps at ``length`` tokens with lever set ``lever``;
    ``root`` holds the tokenizer; the run's output is deleted afterwards (only the row stays)."""
    shutil.rmtree(root / "out", ignore_errors=True)
    make_data(root, root / "tokenizer", length)
    path = root / "stage.json"
    path.write_text(json.dumps(stage(args, root, length, {**LEVERS, **ZERO3_LEVERS}[lever])))
    t = run_trial([sys.executable, "-m", "lvita.train", "--stage", str(path)], timeout or args.trial_timeout, log)
    metrics = root / "out" / "metrics.jsonl"
    lines = metrics.read_text().strip().splitlines() if metrics.is_file() else []
    last = json.loads(lines[-1]) if lines else None
    row = _row(t, last and {k: last.get(k) for k in FIGURES}, "exit 0 but no metrics.jsonl row",
               who=f"lvita {lever}", length=length)
    row["plan_gb"] = plan_gb(path)
    shutil.rmtree(root / "out", ignore_errors=True)
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
from lvita.training.monitor import cap_memory, check_memory_cap, peak_memory_gb, peak_reserved_gb
length, steps, dtype, cap = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[5]
cap = None if cap == "none" else float(cap)
print(cap_memory(cap), flush=True)
cfg = llm_config(sys.argv[4]); cfg._attn_implementation = "sdpa"
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
with dev:
    model = Qwen2ForCausalLM(cfg).to(dtype)
model.gradient_checkpointing_enable(); model.train()
check_memory_cap(cap)
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
ids = torch.randint(0, cfg.vocab_size, (1, length), device=dev)
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    if dev.type == "cuda": torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
    check_memory_cap(cap)
print("RESULT", length / times[-1], times[-1], peak_memory_gb(), peak_reserved_gb())
"""


def peer_trial(args, length: int, log: Path, timeout: float | None = None) -> dict:
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.precision]
    cap = "none" if args.memory_cap_gb is None else str(args.memory_cap_gb)
    t = run_trial([sys.executable, "-c", PEER, str(length), str(args.steps), dtype, args.preset, cap],
                  timeout or args.trial_timeout, log, env={**os.environ, "PYTHONPATH": str(REPO)})
    result = [line.split()[1:] for line in log.read_text(errors="replace").splitlines() if line.startswith("RESULT")]
    figures = None
    if result:
        tps, step_s, peak, reserved = result[-1]
        figures = dict(tokens_per_sec=float(tps), step_time_s=float(step_s), peak_memory_gb=float(peak),
                       peak_reserved_gb=None if reserved == "None" else float(reserved))
    return _row(t, figures, "exit 0 but no RESULT line", who="transformers", length=length)


def _row(t, figures: dict | None, missing: str, **head) -> dict:
    """A trial's result row: ``head``, its status, and its figures (an exit 0 without them is an error)."""
    row = {**head, "status": t.status, "ok": t.status == "ok", "wall_s": t.wall_s}
    if t.status != "ok":
        row["error"] = t.error[-600:]
    elif figures is None:
        row.update(status="error", ok=False, error=missing)
    else:
        row.update(figures)
    return row


def search(trial, start: int, stop: int, refine: int, record, time_left=lambda: float("inf")) -> tuple[int | None, str]:
    """Double from ``start`` until out of memory or past ``stop``, then bisect ``refine`` times between
    the longest success and the out-of-memory length. ``trial(length)`` returns a row (``status``);
    ``record`` stores it. Returns (the longest length that ran or None, why the search ended)."""
    good, bad, length, why = None, None, start, f"reached --max {stop}"
    while length <= stop:
        if time_left() <= 0:
            why = f"out of time before {length}"
            break
        status = record(trial(length))["status"]
        if status == "ok":
            good = length
        elif status == "oom":
            bad, why = length, f"out of memory at {length}"
            break
        elif status == "timeout":
            why = f"timeout at {length} (not a memory limit)"
            break
        length *= 2  # ok, or another failure: not a memory limit, go on
    for _ in range(refine if good and bad else 0):
        mid = (good + bad) // 2 // 1024 * 1024
        if not good < mid < bad or time_left() <= 0:  # below 2048 tokens the 1024-rounding leaves nothing between
            break
        status = record(trial(mid))["status"]
        if status == "ok":
            good = mid
        elif status == "oom":
            bad, why = mid, f"out of memory at {mid}"
        else:
            break
    return good, why


def recorder(out: Path, rows: list):
    def record(row: dict) -> dict:
        rows.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row
    return record


def table(longest: dict, rows: list) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| run | longest tokens | why the search ended | tokens/s | TFLOPs/GPU | MFU | peak GiB (allocated / "
             "reserved) | plan GiB |", "|---|---|---|---|---|---|---|---|"]
    for who, (n, why) in longest.items():
        row = next((r for r in rows if r["who"] == who and r["length"] == n and r["ok"]), {})
        lines.append(f"| {who} | {n or 'none'} | {why} | {fmt(row.get('tokens_per_sec'), ',.0f')} | "
                     f"{fmt(row.get('tflops_per_gpu'), '.1f')} | {fmt(row.get('mfu'), '.1%')} | "
                     f"{fmt(row.get('peak_memory_gb'), '.1f')} / {fmt(row.get('peak_reserved_gb'), '.1f')} | "
                     f"{fmt(row.get('plan_gb'), '.1f')} |")
    return "\n".join(lines)


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
    ap.add_argument("--memory-cap-gb", type=float, default=None, help="GiB per trial (train.memory_cap_gb)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-only", action="store_true", help="only the transformers peer (from --start/4)")
    ap.add_argument("--out", default="longest_context.jsonl")
    args = ap.parse_args()
    rows: list = []
    record = recorder(Path(args.out), rows)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from lvita.data.tokenizer import train_demo_tokenizer

        train_demo_tokenizer(root / "tokenizer")
        longest = {}
        if not args.no_peer:
            longest["transformers"] = search(lambda n: peer_trial(args, n, root / "trial.log"), args.start // 4,
                                             args.max, args.refine, record)
        for lever in [] if args.peer_only else args.levers:
            longest[f"lvita {lever}"] = search(lambda n: lvita_trial(args, root, n, lever, root / "trial.log"),
                                               args.start, args.max, args.refine, record)
    print("\n" + table(longest, rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
