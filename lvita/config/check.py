"""``lvita check``: validate a stage for a world size and show its layout, without allocating.

    lvita check --stage stages/longvita-14b/2_general.json --world-size 64 [--gpu-memory 80] [--suggest]

Prints the parallel layout and batch arithmetic, then the pipeline partition with parameter
counts per stage (total and trainable), computed on the meta device exactly as the training run
partitions it (under ``model.lora`` with the trainer's own adapter injection, and a LoRA line: rank,
alpha, adapted linears, adapter and frozen parameters), then the memory plan
(:mod:`lvita.config.memory_plan`): predicted peak GPU memory per stage, the stage that bounds the run
and whether it fits; ``--suggest`` searches engines (pipeline,
ZeRO-2/3), layouts and memory levers together (:mod:`lvita.config.suggest`), also when the stage's own
degrees do not divide the world size (then it prints the validation error, the suggestions, and exits 2). Configuration errors exit with status 2; paths that do not exist yet (data,
tokenizer, previous stage) are listed as "to fill in" and fail only with ``--strict``.
"""
from __future__ import annotations

import torch

from lvita.config.schema import ConfigError, load_stage
from lvita.config.memory_plan import describe, memory_plan
from lvita.config.validate import validate
from lvita.errors import run_main


def stage_table(cfg, num_stages: int) -> list[dict]:
    """Per pipeline stage: layer range, layer names, total and trainable parameters, each parameter's
    (elements, trainable), the largest module's own parameters (what ZeRO-3 gathers at once) and its
    trainable ones (the largest fresh gradient ZeRO 2-3 reduce at once), on the meta device. Under
    ``model.lora`` the blocks get their adapters by :func:`lvita.model.lora.add_adapters`
    (the trainer's own injection) and a parameter trains by :func:`lvita.model.lora.trains`, so the counts
    are the run's; ``adapters`` and ``adapted`` count the adapter parameters and the adapted linears."""
    from lvita.model.lora import add_adapters, is_adapter, trains
    from lvita.parallel.pipeline import layer_specs, partition

    lora = cfg.model.lora
    specs = layer_specs(cfg.model.spec(), image_token_id=0)
    parts = partition(specs, num_stages, cfg.parallel.partition_method)
    rows = []
    for s in range(num_stages):
        total = trainable = largest = largest_trained = adapters = adapted = 0
        names, numels = [], []
        with torch.device("meta"):
            for b in range(int(parts[s]), int(parts[s + 1])):
                spec = specs[b]
                names.append(spec.typename.__name__)
                built = spec.build()
                adapted += add_adapters({b: built}, lora, cfg.seed)
                for name, p in built.named_parameters():
                    train = trains(name, cfg.model.trainable, lora)
                    total += p.numel()
                    trainable += p.numel() if train else 0
                    adapters += p.numel() if lora is not None and is_adapter(name) else 0
                    numels.append((p.numel(), train))
                own = [list(mod.named_parameters(recurse=False)) for mod in built.modules()]
                largest = max([largest] + [sum(p.numel() for _, p in ps) for ps in own])
                prefixes = [n for n, _ in built.named_modules()]
                largest_trained = max([largest_trained] + [
                    sum(p.numel() for n, p in ps if trains(f"{pre}.{n}".lstrip("."), cfg.model.trainable, lora))
                    for pre, ps in zip(prefixes, own)])
        rows.append(dict(stage=s, first=int(parts[s]), last=int(parts[s + 1]) - 1, names=names, params=total,
                         trainable=trainable, numels=numels, largest_module=largest,
                         largest_trainable=largest_trained, adapters=adapters, adapted=adapted))
    return rows


def lora_line(lora, rows: list[dict]) -> str:
    """``lvita check``'s LoRA line: rank, alpha, targets, adapted linears, adapter and frozen parameters."""
    from lvita.model.lora import scaling

    targets = "; ".join(f"{g} {', '.join(getattr(lora, g))}" for g in ("llm", "vision", "projector")
                        if getattr(lora, g))
    frozen = sum(r["params"] - r["trainable"] for r in rows)
    return (f"  LoRA: rank {lora.rank}, alpha {lora.alpha:g} (scale {scaling(lora):g}), dropout "
            f"{lora.dropout:g}; {sum(r['adapted'] for r in rows)} adapted linears ({targets}); "
            f"{sum(r['adapters'] for r in rows) / 1e6:,.1f}M adapter parameters, {frozen / 1e6:,.1f}M frozen")


def _short(names: list[str]) -> str:
    out, prev, n = [], None, 0
    for name in names + [None]:
        if name == prev:
            n += 1
            continue
        if prev is not None:
            out.append(f"{prev} x{n}" if n > 1 else prev)
        prev, n = name, 1
    return ", ".join(out)


def suggest(cfg, world_size: int, gpu_gb: float, limit: int = 8) -> list[str]:
    """``--suggest``'s lines (lvita.config.suggest): engine, layout and levers searched together."""
    from lvita.config.suggest import suggest as search

    tables: dict[int, list[dict]] = {}

    def rows_of(trial, pipeline: int) -> list[dict]:
        if pipeline not in tables:
            tables[pipeline] = stage_table(trial, pipeline)
        return tables[pipeline]

    return search(cfg, world_size, gpu_gb, rows_of, limit)


def main(stage: str, world_size: int, overrides: list[str], strict: bool = False, gpu_memory: float = 80.0,
         show_suggestions: bool = False) -> int:
    """``lvita check``: the layout, the batch and the memory plan; a bad stage file: one line, exit 2."""
    return run_main("lvita check", _main, stage, world_size, overrides, strict, gpu_memory, show_suggestions)


def _main(stage: str, world_size: int, overrides: list[str], strict: bool, gpu_memory: float,
          show_suggestions: bool) -> int:
    cfg = load_stage(stage, overrides)
    try:
        layout = validate(cfg, world_size)
    except ConfigError as e:
        if not show_suggestions:
            raise
        print(f"{stage}: as written it does not validate at world {world_size}: {e}")
        print(f"  engines, layouts and levers for {gpu_memory:g} GB GPUs at world {world_size}:")
        for line in suggest(cfg, world_size, gpu_memory):
            print(line)
        return 2
    print(f"{stage}: {cfg.description or cfg.name}")
    print(f"  world {layout.world} = pipeline {layout.pipeline} x data {layout.data} x sequence "
          f"{layout.sequence} (ulysses {layout.ulysses} x ring {layout.ring})")
    print(f"  global batch {layout.global_batch} = micro {layout.micro_batch} x accumulation "
          f"{layout.grad_accum} x data {layout.data}; {cfg.data.seq_length} tokens per sequence, "
          f"{layout.global_batch * cfg.data.seq_length:,} tokens per step")
    print(f"  model {cfg.model.preset} (format {cfg.model.format}), trainable {cfg.model.trainable}, precision {cfg.precision}")
    rows = stage_table(cfg, layout.pipeline)
    for r in rows:
        warn = "" if r["trainable"] else "  (trains nothing: gets a placeholder weight)"
        print(f"  pipeline stage {r['stage']}: layers {r['first']}-{r['last']} ({_short(r['names'])}), "
              f"{r['params'] / 1e6:,.1f}M parameters, {r['trainable'] / 1e6:,.1f}M trainable{warn}")
    print(f"  total {sum(r['params'] for r in rows) / 1e6:,.1f}M parameters, "
          f"{sum(r['trainable'] for r in rows) / 1e6:,.1f}M trainable")
    if cfg.model.lora is not None:
        print(lora_line(cfg.model.lora, rows))
    used = [s for s in cfg.data.sources if s.ratio > 0]
    print(f"  data: {len(used)} of {len(cfg.data.sources)} sources used, packed "
          + {True: "per source", "file": "per data file", False: "across sources"}[cfg.data.same_source]
          + f", loss {cfg.train.loss_reduction} mean")
    for s in used:
        print(f"    {s.name}: {s.sampling()}")
    plan = memory_plan(cfg, layout, rows)
    for line in describe(plan, gpu_memory):
        print(line)
    if show_suggestions:
        print(f"  engines, layouts and levers for {gpu_memory:g} GB GPUs at world {world_size}:")
        for line in suggest(cfg, world_size, gpu_memory):
            print(line)
    for note in layout.notes:
        print(f"  warning: {note}")
    if layout.missing:
        print(f"  to fill in before training ({len(layout.missing)} paths unset or not here):")
        for m in layout.missing:
            print(f"    - {m}")
        if strict:
            return 2
    print("  OK" if not layout.missing else "  OK apart from the paths above")
    return 0
