"""``lvita check --suggest``: search engine, layout and memory levers together for a world size.

Owns the search behind ``--suggest`` (the arithmetic is :mod:`lvita.config.memory_plan`'s). Every candidate
is the stage file with some keys changed, validated by :func:`lvita.config.validate.validate` as a run
would be, then planned:

- engines: DeepSpeed's pipeline engine (ZeRO-1, the stage's own DeepSpeed JSON) at every pipeline degree
  dividing the world; at pipeline 1 also the ZeRO engine with ZeRO-3 (``ds_configs/zero3_bf16.json``) and
  ZeRO-2 (the same buckets, stage 2);
- layouts: every ulysses x ring whose product divides world / pipeline (validation keeps those whose
  Ulysses degree fits the query and KV heads, the sequence length and the batch arithmetic), the rest
  data-parallel; sequence degrees the stage file does not name included;
- levers, cheapest first (each set adds one): activation checkpointing, tiled MLP, activation offload,
  optimizer offload, then parameter offload (ZeRO-3 only).

Ranked by the fewest levers, then by :func:`rank` (10% margin kept, no ring, fewest pipeline stages, most
headroom); the first is proposed with the ``--set`` overrides that give it. When none fits, the closest candidate is shown part by part.

Every candidate passes the stage's own validation (lvita.config.validate: ZeRO 2/3 only at pipeline 1).
What trains is the stage's own: under ``model.lora`` the rows count the adapters as trainable and the
frozen base weights as weights only (:func:`lvita.config.check.stage_table`), so LoRA stages search the
same engines and levers with their smaller model states.

Trade-off: a ladder of lever sets (5-6 per layout) rather than all 32 subsets keeps the search at a
few hundred plans (seconds) and the proposals monotone: a later lever is only used with the earlier ones.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

from lvita.config.memory_plan import GIB, Plan, memory_plan
from lvita.config.schema import ConfigError
from lvita.config.shipped import DS_CONFIGS
from lvita.config.validate import validate
from lvita.config.zero_memory import zero_of

LEVERS = ("model.activation_checkpointing", "model.tiled_mlp", "model.activation_offload",
          "train.optimizer_offload", "train.param_offload")
ZERO3_JSON = "zero3_bf16.json"
MARGIN = 0.1  # memory_plan's docstring: treat a plan within ~10% of the GPU's size as not fitting


@dataclass
class Candidate:
    engine: str  # "pipeline (ZeRO-1)", "ZeRO-3", "ZeRO-2"
    pipeline: int
    ulysses: int
    ring: int
    data: int
    n_levers: int
    plan: Plan
    sets: list[str]

    @property
    def peak(self) -> int:
        return self.plan.peak

    def line(self, gpu_gb: float) -> str:
        head = gpu_gb * GIB - self.peak
        return (f"{self.engine}, pipeline {self.pipeline} x ulysses {self.ulysses} x ring {self.ring} x data "
                f"{self.data}: {self.peak / GIB:,.1f} GiB peak ({head / GIB:+,.1f} GiB headroom, host "
                f"{self.plan.bound.host / GIB:,.1f} GiB per GPU); levers: "
                f"{', '.join(self.plan.levers) or 'none'}")


def zero3_config(cfg) -> str | None:
    """The ZeRO-3 DeepSpeed JSON to propose for the stage's precision: beside the stage's own, else the
    repository's (bf16: zero3_bf16.json; fp32: a zero3*fp32*.json if one is shipped); None: none."""
    for folder in (Path(cfg.deepspeed).parent, DS_CONFIGS):
        names = [ZERO3_JSON] if cfg.precision == "bf16" else sorted(p.name for p in folder.glob("zero3*fp32*.json"))
        if names and (folder / names[0]).is_file():
            return str(folder / names[0])
    return None


def pipeline_config(cfg) -> str:
    """The pipeline engine's DeepSpeed JSON: the stage's own when it is ZeRO 0-1, else the shipped ZeRO-1 one."""
    if zero_of(cfg).stage <= 1:
        return cfg.deepspeed
    name = "pipeline_bf16_zero1.json" if cfg.precision == "bf16" else "pipeline_fp32_cpu.json"
    beside = Path(cfg.deepspeed).parent / name
    return str(beside if beside.is_file() else DS_CONFIGS / name)


def _set(cfg, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def _validated(trial, world: int, errors: list[str]):
    try:
        return validate(trial, world)
    except ConfigError as e:
        errors.append(str(e))
        return None


def candidates(cfg, world: int, rows_of) -> tuple[list[Candidate], list[str]]:
    """Every (engine, layout, lever set) that validates, planned; ``rows_of(trial, pipeline)``: stage_table.
    -> (candidates, validation errors of the rest)."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    engines = [("pipeline (ZeRO-1)", p, None) for p in divisors]
    pipe_json = pipeline_config(cfg)
    z3_json = zero3_config(cfg)
    if z3_json is not None:
        z3 = zero_of(replace(cfg, deepspeed=z3_json))
        engines += [("ZeRO-3", 1, z3), ("ZeRO-2", 1, replace(z3, stage=2))]
    out, errors = [], []
    for name, pp, zero in engines:
        ladder = [LEVERS[:k] for k in range(0, 5 if zero is None or zero.stage == 2 else 6)]
        for seq in (d for d in divisors if (world // pp) % d == 0):
            for ring in (d for d in divisors if seq % d == 0):
                for levers in ladder:
                    trial = copy.deepcopy(cfg)
                    trial.parallel.pipeline, trial.parallel.ulysses, trial.parallel.ring = pp, seq // ring, ring
                    if seq > 1:
                        trial.train.micro_batch = 1
                    for key in LEVERS:
                        _set(trial, key, key in levers)
                    sets = [f"parallel.pipeline={pp}", f"parallel.ulysses={seq // ring}", f"parallel.ring={ring}"]
                    trial.deepspeed = pipe_json if zero is None else z3_json
                    if trial.deepspeed != cfg.deepspeed or zero is not None and zero.stage == 2:
                        sets.append(f"deepspeed={trial.deepspeed}"
                                    + ("" if zero is None or zero.stage == 3 else " (with zero_optimization.stage 2)"))
                    layout = _validated(trial, world, errors)
                    if layout is None:
                        continue
                    plan = memory_plan(trial, layout, rows_of(trial, pp), zero=zero)
                    sets += [f"{k}={str(k in levers).lower()}" for k in LEVERS if k in levers or _get(cfg, k)]
                    if seq > 1 and cfg.train.micro_batch != 1:
                        sets.append("train.micro_batch=1")
                    out.append(Candidate(name, pp, seq // ring, ring, layout.data, len(levers), plan, sets))
    return out, errors


def _get(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def rank(c: Candidate, gpu_gb: float) -> tuple:
    """Fewest levers; then a peak within MARGIN of the GPU last (the plan leaves fragmentation out); then
    the smallest ring (Ulysses all-to-all is faster where the heads allow it), the fewest pipeline stages (bubbles),
    and the most headroom."""
    return c.n_levers, c.peak > (1 - MARGIN) * gpu_gb * GIB, c.ring, c.pipeline, c.peak


def suggest(cfg, world: int, gpu_gb: float, rows_of, limit: int = 8) -> list[str]:
    """Lines for ``lvita check --suggest``: the proposal and the next best that fit, or why none does."""
    found, errors = candidates(cfg, world, rows_of)
    if not found:
        return [f"  no layout validates at world {world}" + (f"; e.g. {errors[0]}" if errors else "")]
    fits = sorted((c for c in found if c.plan.fits(gpu_gb)), key=lambda c: rank(c, gpu_gb))
    if fits:
        best = fits[0]
        lines = [f"  proposed for {gpu_gb:g} GB GPUs at world {world}: {best.line(gpu_gb)}",
                 "    lvita check ... --set " + " --set ".join(s.split(" (")[0] for s in best.sets)]
        if any("stage 2" in s for s in best.sets):
            lines.append("    (a DeepSpeed JSON like ds_configs/zero3_bf16.json with zero_optimization.stage 2)")
        lines.append(f"  other layouts and levers that fit ({len(fits)} in all, fewest levers first):")
        return lines + [f"    {c.line(gpu_gb)}" for c in fits[1:limit]]
    close = min(found, key=lambda c: c.peak)
    b = close.plan.bound
    parts = ", ".join(f"{k} {v / GIB:,.1f}" for k, v in b.parts.items())
    return [f"  none of {len(found)} candidates fits {gpu_gb:g} GB GPUs at world {world}; the closest is "
            f"{close.line(gpu_gb)}",
            f"    its stage {b.stage} in GiB: {parts} = {b.total / GIB:,.1f} GiB > {gpu_gb:g}; host "
            f"{b.host / GIB:,.1f} GiB per GPU",
            "    (more GPUs, a shorter data.seq_length or a smaller model)"]
