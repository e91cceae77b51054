"""Model states per GPU under DeepSpeed's engines: weights, gradients, optimizer states and ZeRO's buffers.

Owns the half of the memory plan (:mod:`lvita.config.memory_plan`) that does not depend on the sequence:
what the engine keeps for the parameters of one pipeline stage on one rank. Which engine runs follows
the engine rule: ``parallel.pipeline > 1`` or ZeRO stage 0-1 -> DeepSpeed's pipeline engine (the bf16
path is ``BF16_Optimizer``); ``parallel.pipeline == 1`` with ``zero_optimization.stage`` 2 or 3 -> the
plain model under DeepSpeed's ZeRO engine (``stage_1_and_2.DeepSpeedZeroOptimizer`` /
``stage3.DeepSpeedZeroOptimizer_Stage3``). Sharding is over DeepSpeed's data-parallel group, which
holds the data x sequence ranks (``world / pipeline``): sequence ranks count as data ranks there.

Frozen parameters (``requires_grad`` False: modules outside ``model.trainable``, LoRA's base weights) cost
their weights only. Read in DeepSpeed 0.19.8's source: every wrapper builds its flat buffers, fp32
copies and gradient partitions from the optimizer's groups filtered by ``utils.is_optimized_parameter``
(trainable, non-empty): ``BF16_Optimizer._setup_for_real_optimizer`` (the bf16 pipeline: fp32 partition
and fp32 gradient accumulators of trainable parameters only), ``stage_1_and_2`` (ZeRO 1-2) and
``stage3._get_trainable_parameter_groups`` (ZeRO-3), and lvita hands the optimizer trainable parameters
only (``lvita.training.optim.param_groups``); autograd gives frozen parameters no ``.grad``. The engine
still casts every parameter to the run's precision, and ZeRO-3 partitions every parameter of the module,
frozen ones included (``parameter_offload._convert_to_zero_parameters`` over ``module.parameters()``), and
gathers frozen ones for forward and backward like the rest. So with N parameters and T trainable (LoRA:
adapters plus ``model.trainable``'s modules; :func:`lvita.config.check.stage_table` counts them on the
meta device after the trainer's own injection), per engine, with ``w`` = world / pipeline shards, e = 2
(bf16) or 4 (fp32) bytes, g = the gradient accumulation bytes (``data_types.grad_accum_dtype``;
DeepSpeed's default: the model dtype):

- ZeRO 0-1 (pipeline engine): weights N e; gradients T (e + 4) in bf16 (bf16 gradients plus
  BF16_Optimizer's full fp32 accumulators), T 4 in fp32; fp32 master + Adam moments 12 T / w (ZeRO-1);
  one fp32 reduce bucket;
- ZeRO-2: weights N e; the gradient partition T g / w (plus its fp32 copy at the step when g < 4);
  optimizer 12 T / w; the reduce bucket (g bytes a element) and one module's fresh gradient;
- ZeRO-3: every parameter split into ``ceil(n / w)`` elements per rank (DeepSpeed pads the last
  piece), bf16; parameters of at most ``stage3_param_persistence_threshold`` elements also stay whole
  on every rank; gradient partitions ``sum ceil(n / w)`` g over trainable parameters
  (``grad_partitions_flat_buffer``); fp32 partitions + two Adam moments 12 bytes a partition element;
  gathered parameters: the largest module's own parameters plus ``stage3_prefetch_bucket_size``,
  capped by ``stage3_max_live_parameters`` (never below the largest module); the reduce bucket (e
  bytes a element) and one module's fresh gradient (the largest module's trainable parameters: under
  LoRA an adapter, not the frozen embedding).
- ``train.optimizer_offload`` (ZeRO 1-3): fp32 master and moments in host memory; under ZeRO 2-3 the
  gradient partitions go there too. ``train.param_offload`` (ZeRO-3 only): the parameter partitions
  live in host memory; the gathered and persistent parameters stay on the GPU.

Defaults are DeepSpeed 0.19.8's (``deepspeed/runtime/zero/config.py``, ``DeepSpeedZeroConfig``):
``reduce_bucket_size`` 5e8, ``stage3_prefetch_bucket_size`` 5e7, ``stage3_max_live_parameters`` 1e9,
``stage3_param_persistence_threshold`` 1e5, ``sub_group_size`` 1e9 (tests/test_zero_memory.py reads
them back from DeepSpeed). The ZeRO-3 partition sizes equal what a real 2-rank ZeRO-3 engine
allocates (the same test); the ZeRO-2 figures are read off ``stage_1_and_2.py`` and not yet measured.

Trade-off: the parts are summed as if they all peaked at once (the step's fp32 copies happen when the
activations are gone), so the plan errs high; allocator fragmentation is left to the plan's margin.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

# DeepSpeed 0.19.8 DeepSpeedZeroConfig defaults (deepspeed/runtime/zero/config.py)
DEFAULTS = {"stage": 0, "reduce_bucket_size": int(5e8), "stage3_prefetch_bucket_size": int(5e7),
            "stage3_max_live_parameters": int(1e9), "stage3_param_persistence_threshold": int(1e5),
            "sub_group_size": int(1e9)}


@dataclass
class Zero:
    """The ZeRO settings the plan reads from a DeepSpeed JSON (missing keys: DeepSpeed's defaults)."""
    stage: int = 0
    reduce_bucket_size: int = DEFAULTS["reduce_bucket_size"]
    prefetch_bucket_size: int = DEFAULTS["stage3_prefetch_bucket_size"]
    max_live_parameters: int = DEFAULTS["stage3_max_live_parameters"]
    persistence_threshold: int = DEFAULTS["stage3_param_persistence_threshold"]
    sub_group_size: int = DEFAULTS["sub_group_size"]
    grad_accum_fp32: bool = False  # data_types.grad_accum_dtype == "fp32"

    @classmethod
    def of(cls, ds: dict) -> "Zero":
        z = ds.get("zero_optimization", {}) or {}
        get = lambda key: int(z.get(key, DEFAULTS[key]))  # noqa: E731
        accum = str((ds.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
        return cls(get("stage"), get("reduce_bucket_size"), get("stage3_prefetch_bucket_size"),
                   get("stage3_max_live_parameters"), get("stage3_param_persistence_threshold"),
                   get("sub_group_size"), accum in ("fp32", "float32", "float"))


def zero_of(cfg) -> Zero:
    """The ZeRO settings of ``cfg.deepspeed`` read directly (lvita.config.validate checks the file)."""
    try:
        return Zero.of(json.loads(Path(cfg.deepspeed).read_text()))
    except (OSError, ValueError):
        return Zero()


def engine_of(cfg, zero: Zero) -> str:
    """"pipeline" (DeepSpeed's PipelineModule engine, ZeRO 0-1) or "zero" (the plain model under ZeRO 2-3)."""
    return "zero" if cfg.parallel.pipeline == 1 and zero.stage >= 2 else "pipeline"


def model_states(row: dict, zero: Zero, shards: int, precision: str, optimizer_offload: bool = False,
                 param_offload: bool = False) -> tuple[dict[str, int], int]:
    """-> ({part: GPU bytes}, host bytes) for one stage's parameters on one rank. ``row``: one of
    lvita.config.check.stage_table's rows (``params``, ``trainable``, ``numels``: [(n, trainable)],
    ``largest_module``); ``shards``: DeepSpeed's data-parallel group (data x sequence ranks)."""
    e = 2 if precision == "bf16" else 4
    g = 4 if zero.grad_accum_fp32 or e == 4 else e
    n_all, trained = row["params"], row["trainable"] or 1  # a frozen stage trains a one-element placeholder
    largest = row.get("largest_module", 0)
    fresh = row.get("largest_trainable", largest)  # the largest module's gradient, reduced at once
    parts, host = {}, 0
    if zero.stage <= 1:
        w = shards if zero.stage == 1 else 1
        parts["weights"] = n_all * e
        parts["gradients"] = trained * (e + 4 if e == 2 else 4)
        states = trained * 12 // w
        parts["optimizer"] = 0 if optimizer_offload else states
        host += states if optimizer_offload else 0
        parts["zero buffers"] = min(zero.reduce_bucket_size, trained) * 4 if w > 1 else 0
        return parts, host
    if zero.stage == 2:
        part = math.ceil(trained / shards)
        parts["weights"] = n_all * e
        grads = part * g + (part * 4 if g < 4 else 0)
        states = part * 12
        parts["gradients"] = 0 if optimizer_offload else grads
        parts["optimizer"] = 0 if optimizer_offload else states
        host += grads + states if optimizer_offload else 0
        parts["zero buffers"] = min(zero.reduce_bucket_size, trained) * g + fresh * e
        return parts, host
    numels = row.get("numels") or [(n_all, True)]
    split = sum(math.ceil(n / shards) for n, _ in numels)
    persistent = sum(n for n, _ in numels if n <= zero.persistence_threshold)
    part = sum(math.ceil(n / shards) for n, t in numels if t) or 1
    parts["weights"] = (0 if param_offload else split * e) + persistent * e
    host += split * e if param_offload else 0
    grads = part * g + (min(part, zero.sub_group_size) * 4 if g < 4 else 0)
    states = part * 12
    parts["gradients"] = 0 if optimizer_offload else grads
    parts["optimizer"] = 0 if optimizer_offload else states
    host += grads + states if optimizer_offload else 0
    live = max(largest, min(zero.max_live_parameters, largest + zero.prefetch_bucket_size))
    parts["zero buffers"] = live * e + min(zero.reduce_bucket_size, trained) * e + fresh * e
    return parts, host
