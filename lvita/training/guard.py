"""The non-finite guard: a step whose loss or gradients are not finite changes nothing.

Owns the decision to skip an optimizer step, the count of such steps and the stop after
``train.max_nonfinite_steps`` of them in a row (:class:`Diverged`: lvita.train exits 2).

    guard = NonFiniteGuard(engine, cfg.train.max_nonfinite_steps)   # hooks the optimizer once
    loss = engine.train_batch(...)
    bad = guard.skipped(engine)          # this rank's view; lvita.training.stopping agrees on it with the others
    guard.count(step, bad, loss, grad_norm, batch, log)   # counts and logs a skipped step
    guard.check(step)                    # raises Diverged after N in a row

What DeepSpeed (0.19.8, read and checked here) does by itself: its fp32 ZeRO-1/2 optimizer and its
BF16_Optimizer skip a step whose global gradient norm is inf/NaN; bf16 ZeRO-1/2 with bf16
accumulation does not, none looks at the loss, nothing stops a run that only ever skips, and the
skips are not reported. Its ZeRO-1/2 skip path: when
``optimizer.overflow`` is set, ``step`` zeroes the gradients and returns before the fp32 master
weights or Adam moments change, and the engine then leaves the LR scheduler where it was and counts
``engine.skipped_steps``. The guard turns that path on for every precision and decides ``overflow``
itself: any non-finite gradient in this rank's partition, or (last pipeline stage) a non-finite
loss, ORed over the whole world with one all-reduce, so every rank skips or steps together. The
optimizer's own check of the global gradient norm (inf/NaN, e.g. squares that overflow) still
applies. DeepSpeed's BF16_Optimizer (bf16 with fp32 gradient accumulation at ZeRO-1, the shipped
GPU config) and plain optimizers (ZeRO 0) get their ``step`` wrapped instead: it returns early with
``overflow`` set, and the engine then zeroes the gradients and leaves the schedule alone.

On the ZeRO engine (pipeline 1, lvita.parallel.zero): ZeRO-2 is the same DeepSpeedZeroOptimizer path as
ZeRO-1 (its gradient partitions are in ``averaged_gradients`` at the check too). ZeRO-3's optimizer looks
at gradients only under fp16 (``_overflow_check_and_loss_scale_update``), then skips a step whose global
gradient norm is inf/NaN in every precision; the guard replaces that first check with its own decision
on the loss (ORed over the world), and the norm check that follows still catches non-finite gradients,
through the same skip path (gradients zeroed, norm inf, weights and schedule unchanged).

Trade-offs: a skipped step does not advance the LR schedule (as DeepSpeed's fp16 overflow and
Megatron do), so the schedule follows the applied steps; the data stream advances regardless (the
bad batch is not retried). Resume stays exact: the schedule position is restored from the step
count minus the skipped steps (lvita.ckpt.resume), and the guard's counters are in the checkpoint.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from lvita.errors import UserError
from lvita.parallel.internals import check_engine, optimizer_kind


class Diverged(UserError):
    """Training stopped: too many non-finite steps in a row, or weights that are not finite."""


def _any_nonfinite(tensors) -> bool:
    """Whether any tensor holds inf or NaN, with one device sync and no full-size temporaries: a
    tensor's sum is not finite then (nor when its finite values overflow the sum, which DeepSpeed's
    own overflow check accepts too)."""
    sums = [t.detach().sum().float() for t in tensors if t is not None]
    return bool(sums) and not bool(torch.isfinite(torch.stack(sums)).all())


def _world_any(flag: bool, device) -> bool:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _device():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def weights_finite(engine) -> bool:
    """Collective: every weight of every rank's module is finite (under ZeRO-3 its own shard of each)."""
    return not _world_any(_any_nonfinite(getattr(p, "ds_tensor", p).detach() for p in engine.module.parameters()),
                          _device())


class NonFiniteGuard:
    def __init__(self, engine, max_in_row: int, losses=None):
        """``losses``: what holds this rank's step loss (``total_loss``, ``is_last_stage()``): the pipeline
        engine itself (default) or lvita.parallel.zero.ZeroSteps."""
        self.max_in_row = max_in_row
        self._losses = losses if losses is not None else engine
        self.total = 0  # non-finite steps in this stage, resumes included
        self.streak = 0  # of them in a row, up to the last step
        self.first_of_streak: int | None = None
        self._install(engine)

    # -- the hook -----------------------------------------------------------------------------------

    def _local_bad(self, engine, grads) -> bool:
        src = self._losses
        loss = src.total_loss  # the pipeline's last stage sums micro-batch losses (None elsewhere)
        if src.is_last_stage() and torch.is_tensor(loss) and not bool(torch.isfinite(loss).all()):
            return True
        return _any_nonfinite(grads)

    def _install(self, engine) -> None:
        opt = engine.optimizer
        if getattr(opt, "_lvita_guarded", False):  # lvita's own mark: hooked once
            return
        # every DeepSpeed name used below is registered in lvita.parallel.internals and checked here:
        # a DeepSpeed without one stops the run instead of training unguarded
        check_engine(engine, "the non-finite guard")
        kind = optimizer_kind(opt, "the non-finite guard")
        dev = _device()
        if kind == "zero":  # ZeRO 1/2
            def check_overflow(partition_gradients=True):
                if opt.cpu_offload:
                    local = bool(opt.local_overflow) or self._local_bad(engine, [])
                else:
                    grads = [g for i in range(len(opt.bit16_groups)) for g in (opt.averaged_gradients.get(i) or [])]
                    local = self._local_bad(engine, grads)
                opt.overflow = _world_any(local, dev)

            opt.check_grad_overflow = True
            opt.check_overflow = check_overflow
        elif kind == "zero3":  # DeepSpeedEngine at ZeRO-3: the loss here, gradients by DeepSpeed's norm check
            def overflow_check(update_scale=True):
                opt.overflow = _world_any(self._local_bad(engine, []), dev)
                if not update_scale:
                    return opt.overflow
                return opt._loss_scale_update_and_overflow_cleanup()

            opt._overflow_check_and_loss_scale_update = overflow_check
        else:  # "bf16": DeepSpeed's BF16_Optimizer (bf16 + fp32 accumulation + ZeRO-1); "plain": ZeRO 0, fp32
            inner = opt.step
            params = [p for g in opt.param_groups for p in g["params"]]

            def step(*args, **kwargs):
                # BF16_Optimizer's fp32 accumulators; the torch optimizer's parameters' .grad
                grads = list(opt.fp32_groups_gradients_flat) if kind == "bf16" else [p.grad for p in params]
                bad = _world_any(self._local_bad(engine, grads), dev)
                if bad:  # the engine reads ``overflow``, then zeroes the gradients and keeps the schedule
                    opt.overflow = True
                    if kind == "bf16":  # the engine copies it to get_global_grad_norm(); a torch optimizer has none
                        opt._global_grad_norm = float("inf")  # as DeepSpeed's own skip reports it
                    return None
                opt.overflow = False
                return inner(*args, **kwargs)  # BF16_Optimizer still skips on a non-finite global norm

            opt.step = step
        opt._lvita_guarded = True

    # -- after each step ----------------------------------------------------------------------------

    @staticmethod
    def skipped(engine) -> bool:
        """Whether the optimizer skipped the last step (this rank's view)."""
        return not engine.was_step_applied()

    def count(self, step: int, bad: bool, loss: float, grad_norm, batch, log) -> None:
        """Record the step (``bad``: agreed by all ranks) and log a skipped one with its samples."""
        if not bad:
            self.streak, self.first_of_streak = 0, None
            return
        self.total += 1
        self.streak += 1
        if self.first_of_streak is None:
            self.first_of_streak = step
        seen = ", ".join(self.samples(batch))
        grad_norm = None if grad_norm is None else float(grad_norm)
        log(f"warning: step {step}: loss {loss} / gradient norm {grad_norm} not finite; the step was skipped "
            f"(weights, optimizer state and LR schedule unchanged; {self.streak} in a row, "
            f"train.max_nonfinite_steps={self.max_in_row}); its samples (source:id): {seen}")

    @staticmethod
    def samples(batch) -> list[str]:
        """``source:id`` of every sample packed into a global batch (lvita.data.packer.PackedSequence)."""
        return [f"{m['source']}:{m['id']}" for s in batch for m in s.samples]

    def check(self, step: int, before_raising=lambda: None) -> None:
        """Raises Diverged after ``max_in_row`` non-finite steps in a row (``before_raising`` first)."""
        if self.streak >= self.max_in_row:
            before_raising()
            raise Diverged(f"training diverged: the loss or gradient norm was not finite for {self.streak} steps in a "
                           f"row (steps {self.first_of_streak}-{step}, train.max_nonfinite_steps={self.max_in_row}); "
                           f"the weights are still those from before step {self.first_of_streak}")

    def state_dict(self) -> dict:
        return {"nonfinite_steps": self.total, "streak": self.streak, "first_of_streak": self.first_of_streak}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.total = int(state.get("nonfinite_steps", 0))
        self.streak = int(state.get("streak", 0))
        self.first_of_streak = state.get("first_of_streak")


def finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return True
