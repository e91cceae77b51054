"""Resuming a run: which checkpoint to continue from, and a universal copy when the layout changed.

Owns the decision ``resume`` (stage key; ``auto`` | a path | ``none``) leads to:

- ``auto``: the newest complete checkpoint in ``<output_dir>/checkpoints``, or a fresh start;
- a path: an output_dir, a ``checkpoints/`` directory or one ``global_step<N>`` in it;
- the same engine, pipeline degree and DeepSpeed data-parallel degree (world / pipeline) as the saved
  run: DeepSpeed loads its own files; otherwise (ZeRO >= 1 on both sides) the checkpoint is converted once
  with DeepSpeed's ``ds_to_universal`` into ``checkpoints/universal/<tag>`` and loaded with
  ``load_universal``. Global rank 0 converts; the other ranks wait for the finished copy (polling the file
  system, so a long conversion meets no collective timeout).

    lvita ckpt to-universal runs/stage2/checkpoints/global_step500     # the same conversion by hand

Across engines: the pipeline engine (ZeRO-1, any pipeline degree) and the ZeRO engine (pipeline 1, ZeRO-2
or 3, any data x sequence degree) resume each other's checkpoints, and a ZeRO-2/3 checkpoint resumes at
another world size, all through the universal copy (tests/test_cross_engine_resume.py: pipeline 2 ->
ZeRO-3 at Ulysses 2 and back, ZeRO-3 on 2 ranks -> 1 rank and -> ZeRO-2, losses equal the uninterrupted
run's). DeepSpeed's universal format keys each parameter's fp32 weight and Adam moments by the saving
engine's parameter name, and the two engines name parameters differently (PipelineModule: ``3.layer.mlp...``
by block; plain model: ``layers.2.layer.mlp...``), so the copy is made loadable by both
(:func:`_for_both_engines`): every parameter folder also under the other engine's name (hard links,
:func:`pipeline_to_plain` / :func:`plain_to_pipeline`), a ``step.pt`` per folder and ``{"param", "cat_dim"}``
tensors for the ZeRO-1/2 loader (``ds_to_universal`` writes neither for ZeRO-3 files), ``zero/
optimizer_state.pt`` with both loaders' keys, and the model-states file (lvita's client state) under
both engines' names. After a universal load under ZeRO-3, :func:`_untie_zero3_steps` gives each
sub-group its own Adam step tensor (DeepSpeed 0.19.8 shares one, counting one step per sub-group).

Model weights are stored per block (``layer_XX-model_states.pt``), which is layout-free, so the
universal copy hard-links them; DeepSpeed's tool re-shards the fp32 weights and Adam moments. Weights in no
optimizer (frozen modules, a LoRA run's base) are read from the block files (:func:`load_base_weights`).
Trade-off: a ZeRO-0 checkpoint has no ZeRO optimizer files for the tool to read, so it resumes only
at its own pipeline degree and stage (use a ZeRO-1 DeepSpeed config to move between layouts and engines).
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
    _same_adapters(found, cfg.model.lora)
    then = found.manifest["layout"]
    if then["zero_stage"] != now["zero_stage"] and 0 in (then["zero_stage"], now["zero_stage"]):
        raise CheckpointError(f"resume={found.tag_dir}: saved with ZeRO stage {then['zero_stage']}, this run uses "
                              f"{now['zero_stage']} ({cfg.deepspeed}); a ZeRO-0 checkpoint has no ZeRO optimizer "
                              f"files to convert: use a DeepSpeed config with the same stage, or train with ZeRO-1 "
                              f"or more so checkpoints move between stages and engines")
    if then["zero_stage"] == 0 and then["pipeline"] != now["pipeline"]:
        raise CheckpointError(f"resume={found.tag_dir}: saved at pipeline {then['pipeline']} with ZeRO stage 0, "
                              f"which DeepSpeed cannot re-shard to pipeline {now['pipeline']}; resume at pipeline "
                              f"{then['pipeline']}, or train with a ZeRO-1 config (ds_configs/pipeline_fp32_cpu.json, "
                              f"pipeline_bf16_zero1.json) so checkpoints move between layouts")
    # ZeRO-0 keeps whole optimizer states per pipeline stage: any data degree loads them as they are.
    # Another ZeRO stage (the other engine: pipeline at ZeRO-1 <-> ZeRO-2/3 at pipeline 1) or another
    # layout: through the universal copy, whose per-parameter folders carry both engines' names.
    universal = then["zero_stage"] > 0 and (then["pipeline"], then["deepspeed_data"], then["zero_stage"]) != \
        (now["pipeline"], now["deepspeed_data"], now["zero_stage"])
    same_ranks = all(then[k] == now[k] for k in ("pipeline", "data", "ulysses", "ring", "world", "zero_stage"))
    return ResumePlan(found, universal, same_ranks)


def _same_adapters(found: Found, lora) -> None:
    """A resume continues the same parameters: LoRA adapters of the same rank, scale and targets, or none."""
    import dataclasses

    shape = lambda d: None if not d else {k: d[k] for k in ("rank", "alpha", "llm", "vision", "projector")}  # noqa
    saved, now = shape(found.manifest.get("lora")), shape(None if lora is None else dataclasses.asdict(lora))
    if saved == now:
        return
    if saved is None:
        raise CheckpointError(f"resume={found.tag_dir}: saved by full fine-tuning but this stage sets model.lora; to "
                              f"add adapters start a new stage from it with model.init_from (and a new output_dir)")
    if now is None:
        raise CheckpointError(f"resume={found.tag_dir}: saved with LoRA adapters ({saved}) but this stage has no "
                              f"model.lora; set the same model.lora, or start a new stage from it with model.init_from "
                              f"(the adapters are merged in)")
    raise CheckpointError(f"resume={found.tag_dir}: saved with model.lora {saved}, this stage has {now}; resume "
                          f"with the same adapters, or start a new stage from it with model.init_from")


def load_base_weights(module, plan_: ResumePlan) -> None:
    """Before a universal load (and adapters, DeepSpeed): every local block's weights from the per-block files,
    adapters left out (``...base_layer.weight`` -> plain name). A universal load restores only the optimizer's
    parameters, so weights in no optimizer (a LoRA base, frozen modules) kept the seeded init, not init_from's
    (a LoRA run at another layout: step-3 loss 7.67, not 6.92; tests/test_lora_resume.py)."""
    from lvita.ckpt.weights import layer_file, load_block, local_blocks, read_block
    from lvita.model.lora import base_state

    tag_dir = plan_.found.tag_dir
    for b, m in local_blocks(module).items():
        load_block(m, base_state(read_block(tag_dir, b, merge=False)), str(layer_file(tag_dir, b)))


# -- universal conversion ---------------------------------------------------------------------------

def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.parent / "universal" / tag_dir.name


UNIVERSAL_FORMAT = 2  # 2: per-parameter folders under both engines' names (_for_both_engines)


def universal_ready(out: Path) -> bool:
    """A finished universal copy of the current format (an older one is converted again)."""
    try:
        return json.loads((out / MANIFEST).read_text()).get("universal_format") == UNIVERSAL_FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def to_universal(tag_dir: str | Path, log=print, workers: int | None = None) -> Path:
    """Convert a complete checkpoint once (cached: returns the existing copy). Not collective."""
    tag_dir = Path(tag_dir)
    found = locate(tag_dir, "checkpoint")
    tag_dir = found.tag_dir
    out = universal_dir(tag_dir)
    if universal_ready(out):
        return out
    if out.exists():  # made by an lvita before universal_format 2: loadable by its own engine only
        log(f"[checkpoint] {out} predates cross-engine universal copies; converting again")
        (out / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(out)
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
        for layer in sorted(tag_dir.glob("layer_*-model_states.pt")):  # per-block weights are layout-free
            (tmp / layer.name).unlink(missing_ok=True)  # ds_to_universal copies them from ZeRO-3 checkpoints
            _link_or_copy(layer, tmp / layer.name)
        n_layers = len(list(tag_dir.glob("layer_*-model_states.pt"))) - 2  # embedding, decoder layers, head
        _for_both_engines(tmp, n_layers)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {**found.manifest, "files": files, "universal_of": str(tag_dir), "universal_format": UNIVERSAL_FORMAT,
                    "conversion_s": round(time.perf_counter() - t0, 2)}
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
    log(f"[checkpoint] universal checkpoint ready in {time.perf_counter() - t0:.1f}s: {out}")
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# -- one universal copy for both engines ---------------------------------------------------------------
# DeepSpeed's universal format keys each parameter's fp32 weight and Adam moments by the saving engine's
# parameter name. The pipeline engine's PipelineModule names a parameter by its block ("3.layer.self_attn.
# q_proj.weight": block 3 = decoder layer 2), the ZeRO engine's plain model by its module
# ("layers.2.layer.self_attn.q_proj.weight").
# Loading under the wrong names finds no folder (or, worse, another parameter's), so every folder is also
# written under the other engine's name (hard links), and the small files both loaders read are given in
# both engines' forms. Pure name maps below; tests/test_cross_engine_resume.py checks them both ways.

def pipeline_to_plain(name: str, n_layers: int) -> str | None:
    """A PipelineModule parameter name -> the plain model's (lvita.parallel.zero.ZeroModel), or None when
    the name is not a block's (the frozen stage's placeholder). Blocks: 0 embedding, 1..n_layers decoder
    layers, n_layers + 1 head (lvita.parallel.pipeline.layer_specs)."""
    block, _, rest = name.partition(".")
    if not block.isdigit() or not rest:
        return None
    b = int(block)
    if b == 0:
        return f"embed.{rest}"
    if b == n_layers + 1:
        return f"head.{rest}"
    if 1 <= b <= n_layers:
        return f"layers.{b - 1}.{rest}"
    return None


def plain_to_pipeline(name: str, n_layers: int) -> str | None:
    """The inverse of :func:`pipeline_to_plain`; None for a name that is no block's."""
    first, _, rest = name.partition(".")
    if first == "embed" and rest:
        return f"0.{rest}"
    if first == "head" and rest:
        return f"{n_layers + 1}.{rest}"
    if first == "layers":
        idx, _, key = rest.partition(".")
        if idx.isdigit() and key and int(idx) < n_layers:
            return f"{int(idx) + 1}.{key}"
    return None


def other_engine_name(name: str, n_layers: int) -> str | None:
    return pipeline_to_plain(name, n_layers) if name.split(".", 1)[0].isdigit() else plain_to_pipeline(name, n_layers)


MODEL_STATES = {"pipeline": "mp_rank_00_model_states.pt",  # what each engine's loader reads (DeepSpeed 0.19.8,
                "zero3": "zero_pp_rank_0_mp_rank_00_model_states.pt"}  # universal: pp/dp rank 0's file)


def _for_both_engines(out: Path, n_layers: int) -> None:
    """Make the universal copy ``out`` loadable by the pipeline engine (ZeRO-1), the ZeRO-2 and the ZeRO-3
    engine, whichever saved it: per-parameter folders under both names, a ``step.pt`` per folder (the
    ZeRO-1/2 loader reads it; ds_to_universal writes none for ZeRO-3 files), ``zero/optimizer_state.pt``
    in both loaders' forms, and the model-states file (client state) under both engines' names."""
    import torch

    zero = out / "zero"
    opt_path = zero / "optimizer_state.pt"
    opt = torch.load(opt_path, map_location="cpu", weights_only=False)
    steps = sorted(zero.glob("*/step.pt"))
    if steps:  # saved at ZeRO-1/2: one Adam step count for every parameter
        step = torch.load(steps[0], map_location="cpu", weights_only=False)
    else:  # saved at ZeRO-3: the base optimizer's state of sub-group 0
        step = opt["optimizer_state_dict"]["state"][0]["step"]
    # the ZeRO-3 loader reads the step here; the ZeRO-1/2 loader reads param_groups and ds_version
    opt.pop("fp32_flat_groups", None)  # rank 0's weights, read by neither loader
    base = opt.setdefault("optimizer_state_dict", {})
    base["state"] = {0: {"step": step}}  # a ZeRO-3 source's rank-0 moments are in the folders already
    base.setdefault("param_groups", opt.get("param_groups", []))
    opt.setdefault("param_groups", base["param_groups"])
    if "ds_version" not in opt:
        from deepspeed import __version__

        opt["ds_version"] = __version__
    torch.save(opt, opt_path)
    folders = [d for d in sorted(zero.iterdir()) if d.is_dir()]
    shapes = {}
    for f in MODEL_STATES.values():
        if (out / f).is_file():
            for group in torch.load(out / f, map_location="cpu", weights_only=False).get("param_shapes") or []:
                shapes.update(group)
    for d in folders:
        if not (d / "step.pt").is_file():
            torch.save(step, d / "step.pt")
        for key in ("fp32", "exp_avg", "exp_avg_sq"):  # ZeRO-3's conversion writes bare flat tensors; the
            f = d / f"{key}.pt"  # ZeRO-1/2 loader reads {"param": tensor of the parameter's shape, "cat_dim"}
            t = torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None
            if torch.is_tensor(t):
                torch.save({"param": t.reshape(shapes[d.name]) if d.name in shapes else t, "cat_dim": 0}, f)
    _add_placeholder_state(zero)
    for d in folders:
        alias = other_engine_name(d.name, n_layers)
        if alias is None or (zero / alias).exists():
            continue
        (zero / alias).mkdir()
        for f in d.iterdir():
            _link_or_copy(f, zero / alias / f.name)
    have = [out / f for f in MODEL_STATES.values() if (out / f).is_file()]
    if not have:
        raise CheckpointError(f"{out}: DeepSpeed's conversion wrote no {' or '.join(MODEL_STATES.values())}")
    for f in MODEL_STATES.values():
        if not (out / f).is_file():  # the other engine's name; its universal loader reads it as the only file
            sd = torch.load(have[0], map_location="cpu", weights_only=False)
            sd["mp_world_size"] = 1  # (DeepSpeed checks it against the files it found: pipeline 2 saved 2)
            torch.save(sd, out / f)


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
    """Rank 0 converts; the others wait for ``universal/<tag>/lvita_manifest.json`` of the current
    ``universal_format`` (or the error)."""
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
    while not universal_ready(out):
        if failed.is_file():
            raise CheckpointError(f"rank 0 could not convert {tag_dir} to universal: {failed.read_text()}")
        time.sleep(poll_s)
        if time.perf_counter() - t0 > 24 * 3600:
            raise CheckpointError(f"waited a day for rank 0 to convert {tag_dir}; giving up")
    return out


def _untie_zero3_steps(optimizer) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal loader (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``)
    gives every sub-group's Adam state the same ``step`` tensor; torch's Adam increments it in place once per
    sub-group, so after one step each group's bias correction counts several steps (next losses off by ~2e-3
    in tests/test_cross_engine_resume.py). One tensor per state, as after a native load."""
    from lvita.parallel.internals import check, resolve

    if not isinstance(optimizer, resolve("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3")):
        return
    check(optimizer, "zero3_universal", "resuming from a universal checkpoint under ZeRO-3")
    for state in optimizer.optimizer.state.values():
        if "step" in state and hasattr(state["step"], "clone"):
            state["step"] = state["step"].clone()


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
    if plan_.universal:
        _untie_zero3_steps(engine.optimizer)
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
