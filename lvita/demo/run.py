"""``lvita demo``: the four-stage curriculum and a LoRA fine-tune on the tiny model, on this machine, no downloads.

    lvita demo [--out demo_out] [--world-size 2] [--stages N] [--set KEY=VALUE]...

Trains a tokenizer on text shipped in the package, generates a small multi-source dataset
(images, multi-image, comics, videos, short and long text), then runs the shipped stages
``demo/*`` (``stages/demo/*.json``; the first ``--stages`` of them) in order through the ``deepspeed``
launcher with ``--world-size`` processes (CPU and gloo when there is no GPU), each stage initialised from
the previous stage's last checkpoint, ``--set`` overrides applied to every stage. Runs from any
directory (an installed wheel carries the stage files). Prints where the TensorBoard logs and
checkpoints are and each stage's first and last loss. After a LoRA stage (``demo/5_lora``: adapters on stage 4's
LLM) the model is exported with the adapters merged and answers a question (:mod:`lvita.demo.lora`).

The launcher output of each stage goes to ``<out>/<stage>/launcher.log``; the terminal shows
only lvita's own progress lines (and any error).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lvita.config.shipped import STAGES as SHIPPED_STAGES
from lvita.demo.lora import QUESTION, export_and_answer, is_lora_stage
from lvita.errors import ConfigError, PathError
from lvita.training.loop import free_port

STAGES = SHIPPED_STAGES / "demo"


def prepare(out: Path) -> tuple[Path, Path]:
    """Tokenizer and data under ``out`` (reused when already there)."""
    from lvita.demo.dataset import generate_demo_data
    from lvita.data.tokenizer import train_demo_tokenizer

    tok_dir, data_dir = out / "tokenizer", out / "data"
    if not (tok_dir / "tokenizer.json").is_file():
        t = time.time()
        train_demo_tokenizer(tok_dir)
        print(f"[demo] trained the demo tokenizer in {time.time() - t:.1f}s -> {tok_dir}", flush=True)
    if not (data_dir / ".complete").is_file():
        t = time.time()
        sources = generate_demo_data(data_dir)
        (data_dir / ".complete").write_text("\n".join(sorted(sources)))
        print(f"[demo] generated {len(sources)} demo sources in {time.time() - t:.1f}s -> {data_dir}", flush=True)
    return tok_dir, data_dir


def _run_stage(stage: Path, out: Path, nproc: int, overrides: list[str]) -> int:
    stage_out = out / stage.stem
    stage_out.mkdir(parents=True, exist_ok=True)
    (stage_out / "metrics.jsonl").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(free_port()), "--module", "lvita.train", "--stage", str(stage)]
    for o in [f"output_dir={stage_out}", *overrides]:
        cmd += ["--set", o]
    with open(stage_out / "launcher.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if line.startswith(f"[{stage.stem}]") or line.startswith("[data]") or "error" in line.lower():
                print(line, end="", flush=True)
        return proc.wait()


def _first_last(metrics: Path) -> tuple[float, float]:
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if line.strip()]
    return losses[0], losses[-1]


def main(out: str = "demo_out", nproc: int = 2, data_only: bool = False, stages: int | None = None,
         sets: list[str] | None = None) -> int:
    """``lvita demo`` (the CLI reports a UserError, such as a broken install, as one line, exit 2)."""
    out = Path(out).resolve()
    if not STAGES.is_dir():
        raise PathError(f"{STAGES} not found: this lvita was installed without its stage files; reinstall it "
                        f"(pip install lvita, or pip install -e . in a clone)")
    files = sorted(STAGES.glob("*.json"))
    if stages is not None and not 1 <= stages <= len(files):
        raise ConfigError(f"--stages {stages}: between 1 and {len(files)} (the demo's stages)")
    files = files[:stages]
    if nproc < 1:
        raise ConfigError(f"--world-size {nproc}: at least 1 process")
    from lvita.config.schema import apply_override

    for item in sets or []:  # checked here, once, rather than failing inside the launcher's first stage
        apply_override({}, item)
    start = time.time()
    tok_dir, data_dir = prepare(out)
    if data_only:
        return 0
    summary, answers, prev = [], [], None
    for stage in files:
        overrides = [f"data.root={data_dir}", f"model.tokenizer={tok_dir}",
                     f"model.init_from={json.dumps(str(out / prev / 'checkpoints')) if prev else 'null'}", *(sets or [])]
        shutil.rmtree(out / stage.stem, ignore_errors=True)  # a fresh run of every stage, not a resume
        t = time.time()
        print(f"[demo] stage {stage.stem}: {json.loads(stage.read_text()).get('description', '')}", flush=True)
        rc = _run_stage(stage, out, nproc, overrides)
        if rc != 0:
            print(f"lvita demo: error: stage {stage.stem} failed (exit {rc}); see {out / stage.stem / 'launcher.log'}",
                  file=sys.stderr)
            return rc
        first, last = _first_last(out / stage.stem / "metrics.jsonl")
        if is_lora_stage(stage):
            export, text = export_and_answer(out / stage.stem, log=lambda m: print(f"[demo] {m}", flush=True))
            answers.append((export, text))
        summary.append((stage.stem, first, last, time.time() - t))
        prev = stage.stem
    print(f"\n[demo] {len(files)} stage{'s' * (len(files) > 1)} done in {time.time() - start:.0f}s")
    print(f"[demo] TensorBoard: tensorboard --logdir {out}")
    for name, first, last, secs in summary:
        print(f"[demo]   {name:10s} loss {first:.3f} -> {last:.3f}  ({secs:.0f}s)  checkpoints: {out / name / 'checkpoints'}")
    for export, text in answers:
        print(f"[demo] merged LoRA export {export} answers {QUESTION!r}: {text!r}")
    return 0
