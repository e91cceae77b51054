"""Optimizer state and checkpoint size: full fine-tuning vs LoRA, measured on the tiny model, computed for 14B.

    lvita demo --data-only && python benchmarks/lora_states.py [--stage stages/demo/2_general.json] [--rank 16]

Measured (CPU, one process each, the same stage and data, run one after the other by this script): the trainer
(lvita.training.loop.run, the pipeline engine under ZeRO-1, fp32) trains ``--steps`` steps with everything
trainable, then with ``model.trainable: []`` and ``model.lora`` (rank ``--rank``, alpha 2 x rank, every LLM
linear). ``deepspeed.initialize`` is wrapped to keep the engine, and its optimizer's ``step`` to read the
gradients it was handed; what the engine holds is read from DeepSpeed's objects: the fp32 master partitions
(``single_partition_of_fp32_groups``), the Adam moments (``optimizer.state``: exp_avg, exp_avg_sq) and the
gradients at the step (the module's ``.grad`` tensors plus ZeRO's ``averaged_gradients``). The final checkpoint
is then sized on disk: model files (``layer_XX-model_states.pt``: every weight, frozen ones included) vs
optimizer files (``*optim_states.pt``) vs the rest (client state, RNG, manifest).

Computed (no run; parameter counts from the model's own shapes on the meta device): ``longvita-14b`` in the
paper's precision (bf16 weights; DeepSpeed keeps per trainable parameter an fp32 master, two fp32 Adam moments
and an fp32 gradient: 4 + 8 + 4 = 16 B; checkpoints store 2 B per weight in the model files and 12 B per
trainable parameter in the optimizer files), totals over all data-parallel ranks (ZeRO divides them by its
degree). Trade-off: the tiny model's measurement checks the per-parameter bytes the 14B arithmetic uses; it is
not a 14B measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LORA_SETS = lambda rank: ["model.trainable=[]", f'model.lora={{"rank": {rank}, "alpha": {2 * rank}}}',  # noqa: E731
                          "model.allow_random_frozen=true"]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure_one(stage: str, sets: list[str]) -> dict:
    """Train in this process (world 1) and return what the engine held and what the checkpoint holds."""
    import deepspeed

    from lvita.config.schema import load_stage
    from lvita.training.loop import free_port, run

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    held: dict = {}
    initialize = deepspeed.initialize

    def capture(*args, **kwargs):
        result = initialize(*args, **kwargs)
        engine = held["engine"] = result[0]
        opt, step = engine.optimizer, engine.optimizer.step

        def step_and_read(*a, **k):
            if "grads" not in held:  # the gradients handed to the optimizer, before it frees them
                avg = getattr(opt, "averaged_gradients", None) or {}
                held["grads"] = _bytes(p.grad for p in engine.module.parameters()) + \
                    _bytes(t for ts in avg.values() for t in (ts or []))
            return step(*a, **k)

        opt.step = step_and_read
        return result

    deepspeed.initialize = capture
    cfg = load_stage(stage, sets)
    run(cfg)
    engine = held["engine"]
    opt = engine.optimizer
    params = list(engine.module.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    moments = [t for s in opt.optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    tag = sorted((Path(cfg.output_dir) / "checkpoints").glob("global_step*"), key=lambda p: int(p.name[11:]))[-1]
    files = [p for p in tag.iterdir() if p.is_file()]
    model_files = sum(p.stat().st_size for p in files if p.name.startswith("layer_"))
    optim_files = sum(p.stat().st_size for p in files if p.name.endswith("optim_states.pt"))
    return {"params": sum(p.numel() for p in params), "trainable": trainable,
            "weights_bytes": _bytes(params), "master_bytes": _bytes(opt.single_partition_of_fp32_groups),
            "adam_bytes": _bytes(moments), "grad_bytes": held["grads"],
            "ckpt_model_bytes": model_files, "ckpt_optim_bytes": optim_files,
            "ckpt_other_bytes": sum(p.stat().st_size for p in files) - model_files - optim_files}


def computed_14b(rank: int) -> dict:
    """Parameter counts of longvita-14b (full, LoRA adapters of every LLM linear at ``rank``) from its shapes."""
    import torch
    from torch import nn

    from lvita.config.schema import LoraConfig
    from lvita.model.longvita import LongVita, module_of
    from lvita.model.presets import llm_config

    with torch.device("meta"):
        model = LongVita("longvita-14b", 0)
    targets = LoraConfig().llm
    adapters = sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if type(m) is nn.Linear and module_of(n) == "llm" and n.rsplit(".", 1)[-1] in targets)
    n = sum(p.numel() for p in model.parameters())
    assert llm_config("longvita-14b").num_hidden_layers == 48
    return {"params": n, "full_trainable": n, "lora_trainable": adapters}


def gib(b: float) -> str:
    return f"{b / 2**30:,.1f} GiB" if b >= 2**30 else f"{b / 2**20:,.2f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default=str(REPO / "stages" / "demo" / "2_general.json"))
    ap.add_argument("--data", default="demo_out/data")
    ap.add_argument("--tokenizer", default="demo_out/tokenizer")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # internal: [out json, sets...]
    args = ap.parse_args()
    if args.one:
        Path(args.one[0]).write_text(json.dumps(measure_one(args.stage, args.one[1:])))
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"data.root={Path(args.data).resolve()}", f"model.tokenizer={Path(args.tokenizer).resolve()}",
                "model.init_from=null", "parallel.pipeline=1", "parallel.ulysses=1", "parallel.ring=1",
                f"train.iterations={args.steps}", "train.save_every=0",
                f"deepspeed={REPO / 'ds_configs' / 'pipeline_fp32_cpu.json'}"]
        for name, extra in (("full", []), (f"LoRA r{args.rank}", LORA_SETS(args.rank))):
            res = Path(tmp) / f"{len(rows)}.json"
            cmd = [sys.executable, __file__, "--stage", args.stage, "--one", str(res), *base,
                   f"output_dir={Path(tmp) / str(len(rows))}", *extra]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            if proc.returncode != 0:
                sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
            rows[name] = json.loads(res.read_text())
    full, lora = rows.values()
    print(f"measured: tiny preset, fp32, pipeline engine ZeRO-1, 1 process, {args.steps} steps of {args.stage}")
    print("| what | " + " | ".join(rows) + " | LoRA / full |\n|---|---|---|---|")
    for key, label in (("params", "parameters"), ("trainable", "trainable parameters")):
        print(f"| {label} | {full[key]:,} | {lora[key]:,} | {lora[key] / full[key]:.4f} |")
    held = lambda r: r["master_bytes"] + r["adam_bytes"] + r["grad_bytes"]  # noqa: E731
    for key, label in (("master_bytes", "fp32 master (engine)"), ("adam_bytes", "Adam moments (engine)"),
                       ("grad_bytes", "gradients at the step (engine)"), (None, "optimizer state + gradients"),
                       ("ckpt_model_bytes", "checkpoint model files"), ("ckpt_optim_bytes", "checkpoint optimizer files"),
                       ("ckpt_other_bytes", "checkpoint, other files")):
        a, b = (held(full), held(lora)) if key is None else (full[key], lora[key])
        print(f"| {label} | {gib(a)} | {gib(b)} | {b / a:.4f} |")
    for r, name in ((full, "full"), (lora, "LoRA")):
        print(f"{name}: optimizer state + gradients per trainable parameter: {held(r) / r['trainable']:.2f} B")
    c = computed_14b(args.rank)
    n, t_full, t_lora = c["params"], c["full_trainable"], c["lora_trainable"]
    print(f"\ncomputed: longvita-14b, bf16, LoRA rank {args.rank} on every LLM linear; {n:,} parameters, "
          f"{t_lora:,} adapter parameters ({t_lora / n:.4%}); totals over data-parallel ranks")
    print("| what (formula) | full | LoRA | LoRA / full |\n|---|---|---|---|")
    for label, fn in (("optimizer state + gradients (16 B x trainable)", lambda t: 16 * t),
                      ("checkpoint model files (2 B x all weights, adapters too)", lambda t: 2 * (n + (t if t < n else 0))),
                      ("checkpoint optimizer files (12 B x trainable)", lambda t: 12 * t)):
        a, b = fn(t_full), fn(t_lora)
        print(f"| {label} | {gib(a)} | {gib(b)} | {b / a:.4f} |")


if __name__ == "__main__":
    main()
