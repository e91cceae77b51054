"""Train one Long-VITA stage with DeepSpeed: its pipeline engine, or at pipeline 1 under ZeRO-2/3 its ZeRO engine.

    deepspeed --num_gpus 8 --module lvita.train --stage stages/longvita-14b/2_general.json
    deepspeed --hostfile hostfiles/8x8.txt --module lvita.train --stage FILE --set train.lr.llm=2e-5
    python -m lvita.train --stage stages/demo/1_align.json          # one process, no launcher

Reads top to bottom: config -> validation (before anything heavy) -> process groups ->
tokenizer -> PipelineModule (or, when the DeepSpeed config's ZeRO stage is 2 or 3, the plain model:
lvita.parallel.zero; ZeRO 0/1 stays on the pipeline engine at every pipeline degree, so its checkpoints
keep resuming) -> freezing and per-module optimizer -> DeepSpeed engine ->
optional weights of the previous stage -> packed data stream -> the step loop with metrics and
checkpoints. Each step consumes one global batch; the loss is the token-weighted mean over it, or under
train.loss_reduction "sequence" the mean of its packed sequences' token means.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lvita.config.shipped import add_stage_arguments


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lvita.train", description=__doc__.split("\n\n")[0])
    add_stage_arguments(ap)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """Let ``python -m lvita.train`` run as a world of one without a launcher."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def _keep_fp32_grad_norm(engine) -> None:
    """DeepSpeed's plain fp32 path (ZeRO 0) clips gradients but drops the norm; keep it for logging.
    Replaced on every engine (DeepSpeed calls it on that path only); its names are checked
    (lvita.parallel.internals: "engine", "ds_utils")."""
    from lvita.parallel.internals import check, check_engine, resolve

    check_engine(engine, "keeping the fp32 gradient norm", pipeline=True)
    check(resolve("deepspeed.runtime.utils"), "ds_utils", "keeping the fp32 gradient norm")
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip():
        norm = clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(), mpu=engine.mpu)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip


def _one_norm_reduction(engine) -> None:
    """DeepSpeed's ZeRO-1 optimizer (fp32) reduces the gradient norm over the pipeline group once
    per parameter group; pipeline stages hold different numbers of groups (vision and projector
    live on stage 0), so the stages' collectives no longer pair up and the step deadlocks. Take
    the norm over all groups at once: the same value, one reduction per stage. Only ZeRO 1/2 needs
    it: BF16_Optimizer takes its norm over all groups in one reduction already, and at ZeRO 0 the
    engine clips all parameters at once; any other optimizer class raises (lvita.parallel.internals)."""
    from lvita.parallel.internals import check, optimizer_kind, resolve

    opt = engine.optimizer
    if optimizer_kind(opt, "the ZeRO-1 pipeline norm fix") != "zero":
        return  # deliberate: those paths have no per-group reduction to fix
    check(resolve("deepspeed.runtime.utils"), "ds_utils", "the ZeRO-1 pipeline norm fix")

    def scaled_global_norm(norm_type=2):
        groups = range(len(opt.bit16_groups))
        params = [p for i in groups for p in opt.params_in_partition[i]]
        if opt.cpu_offload:  # ZeRO-Offload keeps per-parameter norms; the same fix
            from deepspeed.runtime.utils import combine_grad_norm_groups

            return combine_grad_norm_groups([opt.complete_grad_norm_calculation_for_cpu_offload(params)])
        return opt.get_grad_norm_direct([g for i in groups for g in opt.averaged_gradients[i]], params, norm_type)

    opt.scaled_global_norm = scaled_global_norm


def cpu_threads(cores: int, local_size: int, env, cuda: bool) -> tuple[int | None, str]:
    """Torch CPU threads for one of ``local_size`` processes on a node of ``cores`` cores -> (threads
    or None to leave torch's choice, a line saying why). The cores are split between the local
    processes, on GPU nodes too (8 ranks each starting an all-core OpenMP pool next to their data
    threads oversubscribe the node: CPU steps up to 10x slower), unless OMP_NUM_THREADS is set."""
    if "OMP_NUM_THREADS" in env:
        return None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} (set by you) decides torch's CPU threads"
    n = max(1, cores // max(local_size, 1))
    return n, (f"{n} torch CPU thread(s) per process: {cores} cores / {local_size} local process(es)"
               f"{' on a GPU node' if cuda else ''}; set OMP_NUM_THREADS to choose otherwise")


def _share_cpu_threads(log=lambda *a: None) -> None:
    env = os.environ
    local = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or env.get("WORLD_SIZE", "1"))
    threads, why = cpu_threads(os.cpu_count() or 1, local, env, torch.cuda.is_available())
    if threads is not None:
        torch.set_num_threads(threads)
    log(f"[threads] {why}")


def agree_on_failures(failed: list) -> list:
    """``DataStream.next_global_batch(agree=...)``: each rank decodes only the pixels it consumes, so
    a sample whose media fail to decode is seen by some ranks only; one all-gather over the world
    (a few ``(row, sample)`` pairs) makes every rank drop the same labels."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failed
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, failed)
    return [f for got in every for f in got]


def pixels_to_device(micro: list[tuple], device) -> Iterator[tuple]:
    """Yield the micro-batches with their uint8 tiles already on ``device`` (CUDA only): pinned host
    memory and an asynchronous copy, one micro-batch ahead of the one DeepSpeed asks for. DeepSpeed
    then clones them on the device instead of on the host. On CPU the micro-batches pass unchanged."""
    if device is None or device.type != "cuda":
        yield from micro
        return

    def moved(m):
        (ids, pos, pix, *rest), labels = m
        return (ids, pos, pix.pin_memory().to(device, non_blocking=True), *rest), labels

    ahead = moved(micro[0]) if micro else None
    for i in range(len(micro)):
        cur, ahead = ahead, (moved(micro[i + 1]) if i + 1 < len(micro) else None)
        yield cur


def run(cfg) -> list[float]:
    """Train ``cfg`` (a validated StageConfig) in this process; returns the per-step losses."""
    import deepspeed

    from lvita.ckpt import checkpoint, resume, weights
    from lvita.training.guard import Diverged, NonFiniteGuard, weights_finite
    from lvita.config.schema import parse_duration
    from lvita.training.stopping import Stopper, record_stop, say
    from lvita.ckpt.checkpoint import tokenizer_fingerprint
    from lvita.data.stream import DataStream, PixelShare, own_rows, rank_micro_batches
    from lvita.model.flops import peak_tflops, step_flops
    from lvita.training.levers import apply_levers
    from lvita.model.lora import add_adapters, adapted_groups
    from lvita.model.presets import llm_config
    from lvita.training.monitor import Monitor, cap_memory, check_memory_cap, peak_memory_gb, peak_reserved_gb
    from lvita.training.optim import build_optimizer, freeze, param_groups, scheduler_factory
    from lvita.model.attention import set_attention
    from lvita.parallel.pipeline import build_pipeline
    from lvita.ckpt.weights import write_blocks
    from lvita.parallel.zero import ZeroSteps, build_zero_model
    from lvita.parallel.hybrid import sequence_attention
    from lvita.parallel.sequence import shard_micro_batch
    from lvita.parallel.topology import build_topology, init_distributed
    from lvita.data.input_format import InputFormat
    from lvita.config.validate import deepspeed_config, validate
    from lvita.errors import ConfigError, PathError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = validate(cfg, world)
    if layout.missing:
        hint = " (stages/demo/*.json read demo_out/: run `lvita demo` from the repository root first)"
        raise PathError("paths in the stage file to fill in (they do not exist here): " + "; ".join(layout.missing)
                        + (hint if any("demo_out" in m for m in layout.missing) else ""))

    spec = cfg.model.spec()  # the model's description, built once and passed down
    fmt = InputFormat.load(spec, cfg.model.tokenizer)  # tokenizer (longvita: the 17 official tokens), layout
    tok, context = fmt.tok, fmt.context_ids  # context: where vision features go
    vocab = llm_config(spec).vocab_size
    if len(tok) > vocab:
        raise ConfigError(f"model.tokenizer {cfg.model.tokenizer} has {len(tok)} tokens but model.preset "
                          f"{cfg.model.preset} has a vocabulary of {vocab}; use the model's own tokenizer")
    ds_cfg = deepspeed_config(cfg, layout.micro_batch, layout.grad_accum, world // layout.pipeline)
    zero_stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
    on_zero = zero_stage >= 2  # validation: pipeline 1 then
    info = {"name": cfg.name, **checkpoint.model_info(spec), "precision": cfg.precision,
            "tokenizer": tokenizer_fingerprint(tok), "tokenizer_path": cfg.model.tokenizer,
            "system_prompt": cfg.data.system_prompt,  # what inference and HF exports default to
            "layout": resume.layout_info(layout, world, zero_stage),
            "trainable": list(cfg.model.trainable),  # what trained in full (an adapter export's modules_to_save)
            "lora": None if cfg.model.lora is None else dataclasses.asdict(cfg.model.lora)}
    rank = int(os.environ.get("RANK", "0"))
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    for note in layout.notes:
        log(f"[{cfg.name}] warning: {note}")
    plan = resume.plan(cfg, info["layout"], info["tokenizer"], spec)  # checked before anything is written
    if plan and plan.universal:
        resume.ensure_universal(plan.found.tag_dir, rank, log)  # before the process group: no timeout
        ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}

    _share_cpu_threads(log)
    init_distributed()
    cuda = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else None
    capped = cap_memory(cfg.train.memory_cap_gb, cuda.index if cuda else 0)
    if capped:
        log(f"[{cfg.name}] {capped}")
    topo = build_topology(layout.pipeline, layout.ulysses, layout.ring)
    log(f"[{cfg.name}] world {world} = pipeline {layout.pipeline} x data {layout.data} x sequence "
        f"{layout.sequence}; global batch {layout.global_batch} = micro {layout.micro_batch} x "
        f"accumulation {layout.grad_accum} x data {layout.data}")

    torch.manual_seed(cfg.seed)
    t_build = time.perf_counter()
    with cuda or contextlib.nullcontext():  # random init on the GPU: seconds, not tens of seconds on the host
        if on_zero:
            module = build_zero_model(spec, context, cfg.seed, cfg.model.activation_checkpointing, cfg.model.logits_chunk)
        else:
            module = build_pipeline(spec, context, cfg.seed, layout.pipeline, cfg.parallel.partition_method,
                                    cfg.model.activation_checkpointing, topo.deepspeed,
                                    logits_chunk=cfg.model.logits_chunk)
    log(f"[{cfg.name}] built and initialised the model on {cuda or 'cpu'} in {time.perf_counter() - t_build:.1f}s"
        + (f"; ZeRO-{zero_stage} engine (plain model, no pipeline)" if on_zero else ""))
    if layout.sequence > 1:
        set_attention(module, sequence_attention(topo))
    for line in apply_levers(module, cfg.model):
        log(f"[{cfg.name}] memory lever: {line}")
    if cfg.model.init_from and not plan:
        where = weights.init_from(module, cfg.model.init_from, spec, info["tokenizer"])
        log(f"[{cfg.name}] initialised weights from {where}")
    if plan and plan.universal:  # frozen weights are in no optimizer: a universal load would not restore them
        resume.load_base_weights(module, plan)
    if cfg.model.lora is not None:  # after the base weights are in: the adapters start at zero output
        n = add_adapters(weights.local_blocks(module), cfg.model.lora, cfg.seed)
        log(f"[{cfg.name}] LoRA: rank {cfg.model.lora.rank}, alpha {cfg.model.lora.alpha:g} on {n} linear layers of "
            f"rank 0's stage; {', '.join(adapted_groups(cfg.model.lora))} frozen but for the adapters")
    trainable = freeze(module, cfg.model.trainable, cfg.model.lora)
    groups = param_groups(module, cfg.train)
    if not groups:
        groups = [module.add_frozen_stage_placeholder()]
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=build_optimizer(groups, cfg.train),
                                           lr_scheduler=scheduler_factory(cfg.train), config=ds_cfg)
    if on_zero:
        steps = ZeroSteps(engine)
    else:
        _keep_fp32_grad_norm(engine)
        _one_norm_reduction(engine)
        steps = engine
    guard = NonFiniteGuard(engine, cfg.train.max_nonfinite_steps, losses=steps)
    log(f"[{cfg.name}] trainable parameters on rank 0's stage: {trainable}")

    # Decode only what this rank consumes: pixels on pipeline stage 0 only, its sequence shard's tiles.
    stage0 = topo.deepspeed.get_coord(rank).pipe == 0
    pixels = PixelShare(stage0, topo.sequence_rank, layout.ulysses, layout.ring, context)
    stream = DataStream(cfg.data, fmt, cfg.train.global_batch, cfg.seed,
                        own_rows(topo.data_rank, layout.data, layout.micro_batch, cfg.train.global_batch),
                        log=log, pixels=pixels)
    device = cuda if stage0 else None  # pixels go ahead (DeepSpeed's engine.device: the same LOCAL_RANK GPU)
    start = 0
    if plan:
        t_load = time.perf_counter()
        state = resume.load(engine, plan, rank)
        stream.load_state_dict(state["data"])
        guard.load_state_dict(state.get("guard"))
        start = plan.step
        if not plan.same_ranks:
            torch.manual_seed(cfg.seed + start + rank)
        log(f"[{cfg.name}] resumed from {plan.found.tag_dir} at step {start} in {time.perf_counter() - t_load:.1f}s"
            + (" through a universal checkpoint (layout changed)" if plan.universal else ""))
        if start >= cfg.train.iterations:
            log(f"[{cfg.name}] nothing to do: the checkpoint is at step {start} of {cfg.train.iterations}")
    monitor = Monitor(cfg.output_dir, rank == 0, cfg.train.iterations, cfg.name, resume_step=start)
    peak = peak_tflops(cfg.train.peak_tflops)  # None on CPU / unknown GPUs: MFU not reported
    stopper = Stopper(parse_duration(cfg.train.time_limit), log)  # SIGTERM/SIGUSR1/SIGINT, launcher gone, time limit

    def save(step):
        t_save = time.perf_counter()
        if not weights_finite(engine):  # collective
            ckpts = Path(cfg.output_dir) / "checkpoints"
            raise Diverged(f"step {step}: the weights are not finite; not saving them (the newest healthy checkpoint "
                           f"in {ckpts} is {checkpoint.last_healthy(ckpts)})")
        path = checkpoint.save(engine, cfg.output_dir, step, stream.state_dict(), cfg.to_dict(), info,
                               cfg.train.keep_checkpoints, log, guard=guard.state_dict(),
                               write_blocks=write_blocks if on_zero else None)
        stopper.saved(time.perf_counter() - t_save)
        log(f"[{cfg.name}] saved checkpoint {path} in {time.perf_counter() - t_save:.1f}s")
        return path

    def finish():
        stopper.close()
        monitor.close()
        stream.close()

    losses, stopped = [], None
    for step in range(start + 1, cfg.train.iterations + 1):
        t0 = time.perf_counter()
        batch = stream.next_global_batch(agree=agree_on_failures)
        micro = rank_micro_batches(batch, topo.data_rank, layout.data, layout.micro_batch,
                                   cfg.train.loss_reduction)
        if layout.sequence > 1:
            micro = [shard_micro_batch(m, topo.sequence_rank, layout.ulysses, layout.ring, context,
                                       fmt.tpt) for m in micro]
        data_wait = time.perf_counter() - t0
        lrs = {g.get("module", str(i)): g["lr"] / g.get("lr_scale", 1.0)  # the module's rate (vision: before decay)
               for i, g in enumerate(engine.optimizer.param_groups)}
        loss = float(steps.train_batch(data_iter=pixels_to_device(micro, device)))
        step_time = time.perf_counter() - t0
        losses.append(loss)
        check_memory_cap(cfg.train.memory_cap_gb)
        tokens = sum(s.input_ids.numel() for s in batch)
        tflops = step_flops(spec, cfg.model.trainable, batch, cfg.model.lora) / step_time / world / 1e12
        gn = engine.get_global_grad_norm()
        # one all-reduce: every rank stops (or not) and counts the step as skipped (or not) together
        reason, bad = stopper.agree(step_time, guard.skipped(engine))
        guard.count(step, bad, loss, gn, batch, lambda m: log(f"[{cfg.name}] {m}"))
        if bad or step % cfg.train.log_every == 0 or step == cfg.train.iterations:
            monitor.log(step, {
                "loss": loss, "lr": lrs, "grad_norm": None if gn is None else float(gn),
                "tokens": tokens, "labelled_tokens": sum(int((s.targets != -100).sum()) for s in batch),
                "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None,
                "pad_tokens": sum(s.pad for s in batch), "tokens_per_sec": tokens / step_time,
                "step_time_s": step_time, "data_wait_s": data_wait, "peak_memory_gb": peak_memory_gb(),
                "peak_reserved_gb": peak_reserved_gb(),
                "skipped": stream.skipped_total, "nonfinite_steps": guard.total,
                **({"nonfinite_samples": guard.samples(batch)} if bad else {}),
            })
        guard.check(step, before_raising=finish)  # Diverged after N in a row: nothing saved
        saved = None
        last = step == cfg.train.iterations
        if cfg.train.save_final if last else cfg.train.save_every and step % cfg.train.save_every == 0:
            saved = save(step)
        if reason and step < cfg.train.iterations:
            path = saved or save(step)
            if rank == 0:
                say(stopper.message(reason, step, cfg.train.iterations, path))
            stopped = (step, reason, path)
            break
    finish()
    if stopped:
        record_stop(*stopped)  # for lvita.launch: this rank saved and closed cleanly (exit 0 follows)
    return losses


def main(argv=None) -> int:
    """``python -m lvita.train``: bad input (a UserError) is one line on rank 0's stderr and exit 2."""
    from lvita.errors import run_main

    return run_main("lvita.train", _main, argv)


def _main(argv=None) -> int:
    from lvita.config.schema import load_stage
    from lvita.training.guard import Diverged

    args = parse_args(argv)
    _single_process_env()
    cfg = load_stage(args.stage, args.set)
    try:
        run(cfg)
    except Diverged as e:
        raise Diverged(f"{e}{_healthy_hint(cfg)}") from None
    return 0


def _healthy_hint(cfg) -> str:
    from lvita.ckpt.checkpoint import last_healthy

    ckpts = Path(cfg.output_dir) / "checkpoints"
    tag = last_healthy(ckpts)
    if tag is None:
        return ". No checkpoint was saved before it; lower train.lr or set train.grad_clip and start again"
    return (f". Newest checkpoint from sound training: {ckpts / tag}; lower train.lr or set train.grad_clip and "
            f"continue from it with --set resume={ckpts / tag}")


if __name__ == "__main__":
    sys.exit(main())
