"""Checkpoint size, save and load time, and the one-off universal conversion, for one stage.

    lvita demo --data-only && python benchmarks/checkpoint.py [--stage stages/demo/2_general.json] [--steps 6]
    python benchmarks/checkpoint.py --nproc 1 --steps 1 --set model.preset=longvita-1.5b --set precision=bf16 \
        --set deepspeed=ds_configs/pipeline_bf16_zero1.json --set train.warmup_steps=0          (one GPU)
    python benchmarks/checkpoint.py --weights-only longvita-1.5b      # model-weight files only (fits a CPU)

Through the deepspeed launcher (``--nproc`` processes, pipeline ``--pipeline``): trains ``--steps``
steps saving every step, resumes the last checkpoint at the same layout (DeepSpeed's own files),
converts it with ``lvita ckpt to-universal`` and, with 2 or more processes, resumes it at the other
pipeline degree (1 <-> 2) for one more step. Prints the checkpoint's size on disk, the median save time and the load times read from
the run's log lines, and the conversion time. CPU timings are indicative; absolute times belong to
a GPU run.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lvita.training.loop import free_port

REPO = Path(__file__).resolve().parents[1]


def launch(stage: str, nproc: int, sets: list[str]) -> str:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
           str(free_port()), "--module", "lvita.train", "--stage", stage, *sum((["--set", s] for s in sets), [])]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc.stdout


def seconds(pattern: str, text: str) -> list[float]:
    return [float(x) for x in re.findall(pattern, text)]


def weights_only(preset: str, tokenizer: str) -> None:
    """Model-weight files of a big preset without training it (bf16, as a bf16 run saves them): write
    the per-block files, read them into a fresh model, export to HF. Fits a CPU machine."""
    import torch

    from lvita.ckpt import hf
    from lvita.model.longvita import LongVita
    from lvita.data.tokenizer import load_tokenizer, special_token_ids
    from lvita.ckpt.weights import layer_file, load_block, local_blocks, read_block

    image_token = special_token_ids(load_tokenizer(tokenizer))["img_context"]
    with torch.device("meta"):
        shapes = LongVita(preset, image_token)
    n_params = sum(p.numel() for p in shapes.parameters())
    model = LongVita(preset, image_token).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for b, m in local_blocks(model).items():
            torch.save(m.state_dict(), layer_file(Path(tmp), b))
        save_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        fresh = LongVita(preset, image_token).to(torch.bfloat16)
        t0 = time.perf_counter()
        for b, m in local_blocks(fresh).items():
            load_block(m, read_block(Path(tmp), b), "bench")
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.write_hf_dir(fresh.state_dict(), preset, tokenizer, Path(tmp) / "hf", image_token)
        export_s = time.perf_counter() - t0
    print(f"{preset}: {n_params / 1e9:.2f} B parameters, bf16 model weights")
    print("| what | figure |\n|---|---|")
    print(f"| model-weight files (layer_XX-model_states.pt) | {size / 2**30:.2f} GiB |")
    print(f"| write them | {save_s:.1f} s |\n| read and load them (model.init_from path) | {load_s:.1f} s |")
    print(f"| lvita convert to-hf (safetensors + tokenizer + processor) | {export_s:.1f} s |")
    print(f"| full bf16 ZeRO-1 training checkpoint (computed: 2 B weights + 12 B fp32 master and Adam moments "
          f"per parameter) | {n_params * 14 / 2**30:.1f} GiB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", default="stages/demo/2_general.json")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--pipeline", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--skip-universal", action="store_true", help="no conversion (it needs twice the disk)")
    ap.add_argument("--weights-only", metavar="PRESET", help="only time the model-weight files of PRESET (no training)")
    ap.add_argument("--tokenizer", default="demo_out/tokenizer", help="for --weights-only")
    args = ap.parse_args()
    if args.weights_only:
        return weights_only(args.weights_only, args.tokenizer)
    other = 2 if args.pipeline == 1 else 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        base = [f"output_dir={out}", "model.init_from=null", f"parallel.pipeline={args.pipeline}",
                "train.save_every=1", *args.set]
        log = launch(args.stage, args.nproc, base + [f"train.iterations={args.steps}"])
        saves = seconds(r"saved checkpoint \S+ in ([\d.]+)s", log)
        tag = out / "checkpoints" / f"global_step{args.steps}"
        manifest = json.loads((tag / "lvita_manifest.json").read_text())
        size = sum(manifest["files"].values())
        layer_bytes = sum(v for k, v in manifest["files"].items() if k.startswith("layer_"))
        log = launch(args.stage, args.nproc, base + [f"train.iterations={args.steps}"])  # loads, nothing to train
        load_same = seconds(r"resumed from \S+ at step \d+ in ([\d.]+)s", log)
        convert_s = usize = load_universal = None
        if not args.skip_universal:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lvita.cli", "ckpt", "to-universal", str(tag)], cwd=REPO,
                           check=True, capture_output=True)
            convert_s = time.perf_counter() - t0
            universal = out / "checkpoints" / "universal" / tag.name
            usize = sum(p.stat().st_size for p in universal.rglob("*") if p.is_file() and not p.name.startswith("layer_"))
        if convert_s is not None and args.nproc >= 2:
            log = launch(args.stage, args.nproc, base + [f"output_dir={Path(tmp) / 'moved'}", f"resume={tag}",
                                                         f"parallel.pipeline={other}", f"train.iterations={args.steps + 1}"])
            load_universal = seconds(r"resumed from \S+ at step \d+ in ([\d.]+)s", log)
    print(f"stage {args.stage} ({manifest['preset']}, {manifest['precision']}, ZeRO {manifest['layout']['zero_stage']}), "
          f"{args.nproc} processes, pipeline {args.pipeline}")
    print("| what | figure |\n|---|---|")
    print(f"| checkpoint size | {size / 2**20:.1f} MiB ({layer_bytes / 2**20:.1f} MiB model weights, "
          f"{len(manifest['files'])} files) |")
    print(f"| save, median of {len(saves)} | {statistics.median(saves):.2f} s |")
    print(f"| load at the same layout (resume) | {load_same[0]:.2f} s |")
    if convert_s is not None:
        print(f"| one-off universal conversion (`lvita ckpt to-universal`, incl. Python start) | {convert_s:.2f} s |")
        print(f"| universal copy, besides the hard-linked model weights | {usize / 2**20:.1f} MiB |")
    if load_universal:
        print(f"| load at pipeline {other} from the universal copy | {load_universal[0]:.2f} s |")


if __name__ == "__main__":
    main()
