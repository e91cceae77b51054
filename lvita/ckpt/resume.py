"""Resuming a run: which checkpoint to continue from, and a universal copy when the layout changed.

Owns the decision ``resume`` (stage key; ``auto`` | a path | ``none``) leads to:

- ``auto``: the newest complete checkpoint in ``<output_dir>/checkpoints``, or a fresh start;
- a path: an output_dir, a ``checkpoints/`` directory or one ``global_step<N>`` in it;
- the same pipeline degree and DeepSpeed data-parallel degree (world / pipeline) as the saved run:
  DeepSpeed loads its own files; otherwise (ZeRO >= 1) the checkpoint is converted once with
  DeepSpeed's ``ds_to_universal`` into ``checkpoints/universal/<tag>`` and loaded with
  ``load_universal``. Global rank 0 converts; the other ranks wait for the finished copy (polling
  the file system, so a long conversion meets no collective timeout).

    lvita ckpt to-universal runs/stage2/checkpoints/global_step500     # the same conversion by hand

Model weights are stored per block (``layer_XX-model_states.pt``), which is layout-free, so the
universal copy hard-links them; DeepSpeed's tool re-shards the fp32 weights and Adam moments.
Trade-off: a ZeRO-0 checkpoint has no ZeRO optimizer files for the tool to read, so it resumes only
at its own pipeline degree (use a ZeRO-1 DeepSpeed config to move between layouts).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lvita.ckpt.checkpoint import MANIFEST, CheckpointError, Found, atomic_write, check_fits, complete_tags, locate, \
    staged_dir, tag_for

PLACEHOLDER = "frozen_stage_placeholder"  # lvita.parallel.pipeline.LongVitaPipeline's attribute


@dataclass
class ResumePlan:
    found: Found
    universal: bool  # load through checkpoints/universal/<tag>
    same_ranks: bool  # every rank finds its own RNG file

    @property
    def step(self) -> int:
        return int(self.found.manifest["step"])


def layout_info(layout, world: int, zero_stage: int) -> dict:
    return {"pipeline": layout.pipeline, "data": layout.data, "ulysses": layout.ulysses, "ring": layout.ring,
            "world": world, "deepspeed_data": world // layout.pipeline, "zero_stage": zero_stage}


def plan(cfg, now: dict, tokenizer: dict, spec=None) -> ResumePlan | None:
    """What ``cfg.resume`` means for this run (``now``: :func:`layout_info` of it). Checks the
    checkpoint's files, model, vocabulary and precision first; raises CheckpointError."""
    if cfg.resume == "none":
        done = complete_tags(Path(cfg.output_dir) / "checkpoints")
        if done:
            raise CheckpointError(f"resume=none but output_dir={cfg.output_dir} already holds checkpoints ({done[-1]}, ...) "
                                  f"that a later resume=auto would mistake for this run's; pick a new output_dir, "
                                  f"delete them, or resume from them")
        return None
    if cfg.resume == "auto":
        ckpt_dir = Path(cfg.output_dir) / "checkpoints"
        if not complete_tags(ckpt_dir):
            return None
        found = locate(ckpt_dir, "resume=auto: output_dir")
    else:
        found = locate(cfg.resume, "resume")
    if found.manifest.get("weights_only"):
        raise CheckpointError(f"resume={found.tag_dir}: holds weights only (made by lvita convert from-hf); start "
                              f"from it with model.init_from and resume=auto")
    check_fits(found, "resume", spec or cfg.model.spec(), tokenizer, cfg.precision)
    then = found.manifest["layout"]
    if then["zero_stage"] != now["zero_stage"]:
        raise CheckpointError(f"resume={found.tag_dir}: saved with ZeRO stage {then['zero_stage']}, this run uses "
                              f"{now['zero_stage']} ({cfg.deepspeed}); use a DeepSpeed config with the same stage")
    if then["zero_stage"] == 0 and then["pipeline"] != now["pipeline"]:
        raise CheckpointError(f"resume={found.tag_dir}: saved at pipeline {then['pipeline']} with ZeRO stage 0, "
                              f"which DeepSpeed cannot re-shard to pipeline {now['pipeline']}; resume at pipeline "
                              f"{then['pipeline']}, or train with a ZeRO-1 config (ds_configs/pipeline_fp32_cpu.json, "
                              f"pipeline_bf16_zero1.json) so checkpoints move between layouts")
    if then["zero_stage"] >= 2 and then["deepspeed_data"] != now["deepspeed_data"]:
        raise CheckpointError(f"resume={found.tag_dir}: saved by the ZeRO-{then['zero_stage']} engine on "
                              f"{then['deepspeed_data']} ranks; this run has {now['deepspeed_data']}. Resuming a "
                              f"ZeRO-2/3 checkpoint at another world size is not supported yet: resume on "
                              f"{then['deepspeed_data']} processes, or start from its weights with model.init_from")
    # ZeRO-0 keeps whole optimizer states per pipeline stage: any data degree loads them as they are
    universal = then["zero_stage"] > 0 and (then["pipeline"], then["deepspeed_data"]) != \
        (now["pipeline"], now["deepspeed_data"])
    same_ranks = all(then[k] == now[k] for k in ("pipeline", "data", "ulysses", "ring", "world"))
    return ResumePlan(found, universal, same_ranks)


# -- universal conversion ---------------------------------------------------------------------------

def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.parent / "universal" / tag_dir.name


def to_universal(tag_dir: str | Path, log=print, workers: int | None = None) -> Path:
    """Convert a complete checkpoint once (cached: returns the existing copy). Not collective."""
    tag_dir = Path(tag_dir)
    found = locate(tag_dir, "checkpoint")
    tag_dir = found.tag_dir
    out = universal_dir(tag_dir)
    if (out / MANIFEST).is_file():
        return out
    if found.manifest["layout"]["zero_stage"] == 0:
        raise CheckpointError(f"{tag_dir}: saved with ZeRO stage 0; DeepSpeed's universal conversion needs the ZeRO "
                              f"optimizer files of stage 1 or more")
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    log(f"[checkpoint] converting {tag_dir} to a universal checkpoint (one-off, cached in {out}) ...")
    t0 = time.perf_counter()
    with staged_dir(out) as tmp:
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(tmp), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"{tag_dir}: DeepSpeed's ds_to_universal failed (exit {proc.returncode}):\n"
                                  f"{proc.stderr[-3000:]}")
        _add_placeholder_state(tmp / "zero")
        for layer in sorted(tag_dir.glob("layer_*-model_states.pt")):  # per-block weights are layout-free
            try:
                os.link(layer, tmp / layer.name)
            except OSError:
                shutil.copy2(layer, tmp / layer.name)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {**found.manifest, "files": files, "universal_of": str(tag_dir),
                    "conversion_s": round(time.perf_counter() - t0, 2)}
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
    log(f"[checkpoint] universal checkpoint ready in {time.perf_counter() - t0:.1f}s: {out}")
    return out


def _add_placeholder_state(zero: Path) -> None:
    """A pipeline stage that trains nothing holds one zero placeholder weight (lr 0, see
    lvita.parallel.pipeline); at the new layout such a stage may exist where none did. Give the
    universal copy its (all-zero) state so DeepSpeed finds it."""
    import torch

    target = zero / PLACEHOLDER
    steps = sorted(zero.glob("*/step.pt"))
    if target.exists() or not steps:
        return
    target.mkdir()
    for name in ("fp32", "exp_avg", "exp_avg_sq"):
        torch.save({"cat_dim": 0, "param": torch.zeros(1)}, target / f"{name}.pt")
    shutil.copy2(steps[0], target / "step.pt")


def ensure_universal(tag_dir: Path, rank: int, log=print, poll_s: float = 2.0) -> Path:
    """Rank 0 converts; the others wait for ``universal/<tag>/lvita_manifest.json`` (or the error)."""
    out = universal_dir(tag_dir)
    failed = out.with_name(f"{out.name}.failed")
    if rank == 0:
        failed.unlink(missing_ok=True)
        try:
            return to_universal(tag_dir, log)
        except BaseException as e:
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(str(e))
            raise
    t0 = time.perf_counter()
    while not (out / MANIFEST).is_file():
        if failed.is_file():
            raise CheckpointError(f"rank 0 could not convert {tag_dir} to universal: {failed.read_text()}")
        time.sleep(poll_s)
        if time.perf_counter() - t0 > 24 * 3600:
            raise CheckpointError(f"waited a day for rank 0 to convert {tag_dir}; giving up")
    return out


def load(engine, plan_: ResumePlan, rank: int) -> dict:
    """Load model, optimizer and LR schedule; returns lvita's client state (step, data, config)."""
    from lvita.ckpt.checkpoint import set_rng_state

    found = plan_.found
    load_dir = universal_dir(found.tag_dir).parent if plan_.universal else found.ckpt_dir
    # DeepSpeed's universal loader copies group settings (lr, weight decay) by group position, which
    # differs between pipeline layouts; the stage config owns them, so they are put back after loading
    # and the LR schedule is set from the step, less the steps skipped as non-finite (nothing else).
    settings = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    path, client = engine.load_checkpoint(str(load_dir), tag=found.tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None or not client or "lvita" not in client:
        raise CheckpointError(f"resume={found.tag_dir}: DeepSpeed loaded nothing from {load_dir}/{found.tag}")
    for group, saved in zip(engine.optimizer.param_groups, settings):
        group.update(saved)
    state = client["lvita"]
    # steps skipped as non-finite (lvita.training.guard) did not advance the schedule
    position = plan_.step - int((state.get("guard") or {}).get("nonfinite_steps", 0))
    sched = engine.lr_scheduler
    sched.last_epoch = position
    lrs = [base * fn(position) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    if state["step"] != plan_.step or found.tag != tag_for(state["step"]):
        raise CheckpointError(f"resume={found.tag_dir}: step {state['step']} inside disagrees with the manifest")
    rng = found.tag_dir / f"rng_rank{rank:05d}.pt"
    if plan_.same_ranks and rng.is_file():
        import torch

        set_rng_state(torch.load(rng, weights_only=False))
    return state
