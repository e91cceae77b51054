"""The private parts of DeepSpeed, yunchang and transformers that lvita reads, writes or replaces:
one list, checked by name where they are used, never guessed at.

Owns :data:`TARGETS` (per library class: every attribute and method lvita relies on and what it
does with it), :data:`TESTED` (the versions they were read from; pyproject.toml pins the same),
:func:`require` / :func:`check` (raise :class:`UnsupportedInternals`, naming the attribute, the
class, the installed and the tested version) and :func:`optimizer_kind`, the one dispatch on
DeepSpeed's optimizer classes for the patches in lvita.training.loop (``_one_norm_reduction``,
``_keep_fp32_grad_norm``) and lvita.training.guard (the non-finite guard).

    kind = optimizer_kind(engine.optimizer, "the non-finite guard")   # "zero" | "bf16" | "plain"
    check(engine, "engine", "the non-finite guard")                    # raises when one is missing

Which optimizer lvita's configurations give (DeepSpeed 0.19.8): on the PipelineEngine (ZeRO 0/1),
fp32 or bf16 with bf16 accumulation at ZeRO-1, and ZeRO-Offload -> ``DeepSpeedZeroOptimizer``
("zero"); bf16 with fp32 accumulation at ZeRO-1 (the shipped GPU config) or bf16 at ZeRO 0 ->
``BF16_Optimizer`` ("bf16"); fp32 at ZeRO 0 -> the torch optimizer itself ("plain"). On the
DeepSpeedEngine (pipeline 1, lvita.parallel.zero): ZeRO-2 -> ``DeepSpeedZeroOptimizer`` ("zero", the
same patches), ZeRO-3 -> ``DeepSpeedZeroOptimizer_Stage3`` ("zero3"). Any other class (FP16_Optimizer, a
wrapper a new DeepSpeed adds) is refused by name: lvita's validation never configures one, and patching
it by guesswork would switch a fix off silently.

Trade-offs: a check by name catches an attribute renamed or removed (the usual way internals
move), not one that keeps its name and changes its meaning; the behaviour tests (the guard's
divergence test in tests/test_stopping.py, pipeline equivalence in tests/test_training.py) and
the version pins (tests/test_internals.py fails when the installed versions leave them) cover
that. Attributes lvita writes for DeepSpeed to read (``feeds``) cannot be checked on the object
before they exist; tests/test_internals.py checks that their reader's source still reads them.
The checks run once per engine, at install time, not per step.
"""
from __future__ import annotations

import importlib
import types
from dataclasses import dataclass, field
from importlib import metadata

# The versions TARGETS was read from and the suite runs; pyproject.toml admits these (tests check).
TESTED = {"deepspeed": "0.19.8", "yunchang": "0.6.4", "transformers": "5.24.0 (GPU wheels), 5.25.0 (CPU suite)"}


class UnsupportedInternals(NotImplementedError):
    """A library lvita patches lacks a piece lvita relies on (another version than the tested one).
    A NotImplementedError, so ``lvita.train`` reports it in one line and exits 2."""


@dataclass(frozen=True)
class Targets:
    cls: str  # "module:qualname" of the class (or module) whose objects carry the names
    library: str
    needs: dict[str, str]  # name -> what lvita does with it; must exist on the object when patched
    feeds: dict[str, str] = field(default_factory=dict)  # written by lvita for ``reader`` to read
    reader: str | None = None  # "module:qualname" whose source reads the ``feeds``


_ENGINE = "deepspeed.runtime.pipe.engine:PipelineEngine"
_DS_ENGINE = "deepspeed.runtime.engine:DeepSpeedEngine"
_ZERO3 = "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3"
_ZERO = "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer"
_BF16 = "deepspeed.runtime.bf16_optimizer:BF16_Optimizer"
_TAKE_STEP = "deepspeed.runtime.engine:DeepSpeedEngine._take_model_step"

TARGETS: dict[str, Targets] = {
    # -- DeepSpeed: the engine (every lvita run builds a PipelineEngine) --------------------------------
    "engine": Targets(_ENGINE, "deepspeed", {
        "clip_fp32_gradients": "replaced by loop._keep_fp32_grad_norm: the fp32 ZeRO-0 clip keeps its norm",
        "_global_grad_norm": "written by that replacement; get_global_grad_norm() returns it",
        "get_global_grad_norm": "read by the training loop for grad_norm",
        "gradient_clipping": "called by the replacement (the clip threshold)",
        "mpu": "passed by the replacement to clip_grad_norm_",
        "optimizer": "the object the fixes and the guard dispatch on (optimizer_kind)",
        "total_loss": "read by the guard: the last stage's sum of micro-batch losses",
        "is_last_stage": "called by the guard: only the last stage holds the loss",
        "was_step_applied": "called by the guard: whether the optimizer skipped the step",
    }),
    # -- DeepSpeed: the engine of the ZeRO-2/3 path (parallel.pipeline 1, lvita.parallel.zero) ------------
    "ds_engine": Targets(_DS_ENGINE, "deepspeed", {
        "optimizer": "the object the guard dispatches on (optimizer_kind)",
        "get_global_grad_norm": "read by the training loop for grad_norm",
        "was_step_applied": "called by the guard: whether the optimizer skipped the step",
        "backward": "called by ZeroSteps.train_batch per micro-batch",
        "step": "called by ZeroSteps.train_batch per micro-batch (steps the optimizer at the boundary)",
        "gradient_accumulation_steps": "called by ZeroSteps.train_batch: micro-batches per step",
        "device": "read by ZeroSteps: where micro-batches go",
    }),
    "zero3_api": Targets("deepspeed.runtime.zero", "deepspeed", {
        "register_external_parameter": "called by build_zero_model: the LM head's weight, used by the loss",
        "GatheredParameters": "used by lvita.ckpt.weights.write_blocks: one block's full weights at a time",
    }),
    "ds_utils": Targets("deepspeed.runtime.utils", "deepspeed", {
        "clip_grad_norm_": "called by loop._keep_fp32_grad_norm",
        "combine_grad_norm_groups": "called by loop._one_norm_reduction under ZeRO-Offload",
    }),
    # -- DeepSpeed: ZeRO stage 1/2 (fp32, bf16 with bf16 accumulation, ZeRO-Offload) ---------------------
    "zero": Targets(_ZERO, "deepspeed", {
        "scaled_global_norm": "replaced by loop._one_norm_reduction: one norm reduction per pipeline stage "
                              "(0.19.8's body less its Muon and MoE branches, which lvita never configures)",
        "bit16_groups": "read by both patches: the number of parameter groups",
        "params_in_partition": "read by _one_norm_reduction: this rank's parameters per group",
        "averaged_gradients": "read by both patches: this rank's gradient partition per group",
        "get_grad_norm_direct": "called by _one_norm_reduction",
        "complete_grad_norm_calculation_for_cpu_offload": "called by _one_norm_reduction under ZeRO-Offload",
        "cpu_offload": "read by both patches: ZeRO-Offload keeps gradients elsewhere",
        "check_overflow": "replaced by the guard: its overflow decision",
        "check_grad_overflow": "set True by the guard: step() then calls check_overflow in every precision",
        "overflow": "written by the guard's check_overflow; step() skips when it is set",
        "step": "DeepSpeed's, unchanged: returns early (grads zeroed, weights kept) on overflow",
    }),
    "zero_offload": Targets(_ZERO, "deepspeed", {
        "local_overflow": "read by the guard under ZeRO-Offload (set while gradients are copied to host)",
    }),
    # -- DeepSpeed: ZeRO stage 3 (DeepSpeedEngine only) ----------------------------------------------------
    "zero3": Targets(_ZERO3, "deepspeed", {
        "_overflow_check_and_loss_scale_update": "replaced by the guard: its overflow decision (0.19.8 looks at "
                                                 "gradients under fp16 only; the global norm check follows)",
        "_loss_scale_update_and_overflow_cleanup": "called by that replacement: the skip (grads zeroed, norm inf)",
        "overflow": "written by the guard; step() then returns before the weights change",
        "step": "DeepSpeed's, unchanged",
        "param_groups": "the optimizer's groups (read by the training loop for the learning rates)",
    }),
    "zero3_universal": Targets(_ZERO3, "deepspeed", {
        "optimizer": "its base torch optimizer, whose per-sub-group Adam ``step`` tensors lvita.ckpt.resume unties "
                     "after a universal load (0.19.8's loader assigns one tensor to every sub-group)",
        "load_hp_checkpoint_state_from_checkpoint_dir_stage3": "loads the universal copy (fp32 weights, Adam "
                     "moments by parameter name; the step from zero/optimizer_state.pt's optimizer_state_dict)",
    }),
    # -- DeepSpeed: BF16_Optimizer (bf16 + fp32 accumulation at ZeRO-1, bf16 at ZeRO 0) -----------------
    "bf16": Targets(_BF16, "deepspeed", {
        "step": "wrapped by the guard: returns early with overflow set on a non-finite step",
        "fp32_groups_gradients_flat": "read by the guard: the fp32 gradient accumulators",
        "param_groups": "the optimizer's groups (read by the training loop for the learning rates)",
        "overflow": "written by the guard's step; set in __init__",
    }, feeds={"_global_grad_norm": "set to inf on a skipped step, as BF16_Optimizer's own skip does"},
        reader=_TAKE_STEP),
    # -- fp32 at ZeRO 0: DeepSpeed steps the torch optimizer itself ---------------------------------------
    "plain": Targets("torch.optim:Optimizer", "torch", {
        "step": "wrapped by the guard: returns early with overflow set on a non-finite step",
        "param_groups": "read by the guard: the parameters whose .grad it checks",
    }, feeds={"overflow": "set by the guard's step; the engine then zeroes gradients and keeps the schedule"},
        reader=_TAKE_STEP),
    # -- yunchang (lvita.parallel.hybrid, lvita.parallel.topology) -----------------------------------------
    "yunchang_attention": Targets("yunchang:LongContextAttention", "yunchang", {
        "ulysses_pg": "replaced by HybridAttention: lvita's Ulysses group, not the global singleton's",
        "ring_pg": "replaced by HybridAttention: lvita's ring group",
    }),
    "yunchang_groups": Targets("yunchang.globals:PROCESS_GROUP", "yunchang", {
        "ULYSSES_PG": "set by lvita.parallel.topology (yunchang's singleton, for code that reads it)",
        "RING_PG": "set by lvita.parallel.topology",
    }),
    "yunchang_kernels": Targets("yunchang.hybrid.utils", "yunchang", {
        "RING_IMPL_DICT": "lvita's zigzag ring kernel is registered in it (lvita.parallel.hybrid)",
    }),
    # -- transformers (lvita.model.presets, lvita.ckpt.hf; checked by the tests only: the model layer
    # imports nothing above it) ----------------------------------------------------------------------------
    "transformers_config": Targets("transformers:PretrainedConfig", "transformers", {
        "_attn_implementation": "set to 'lvita': Qwen2 layers look up lvita.model.attention's kernel by it",
    }),
}


def resolve(path: str):
    """The object at ``"module:qualname"`` (or a module); UnsupportedInternals when it is gone."""
    module, _, qual = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in qual.split(".") if qual else ():
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        lib = module.split(".")[0]
        raise UnsupportedInternals(f"{path} is gone from {lib} {installed(lib)} ({e}); lvita is tested with "
                                   f"{lib} {TESTED.get(lib, 'as pinned')} (pyproject.toml pins it)") from e
    return obj


def installed(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def require(obj, names, what: str, library: str = "deepspeed", uses: dict[str, str] | None = None) -> None:
    """Raise UnsupportedInternals unless ``obj`` (an instance, class or module) has every one of ``names``.

    ``what``: the lvita feature that needs them, for the message; ``uses``: name -> what lvita does
    with it. Never a silent skip: a patch that cannot apply stops the run."""
    missing = [n for n in names if not hasattr(obj, n)]
    if not missing:
        return
    if isinstance(obj, types.ModuleType):
        where = f"module {obj.__name__}"
    else:
        cls = obj if isinstance(obj, type) else type(obj)
        where = f"{cls.__module__}.{cls.__qualname__}"
    said = "; ".join(f"`{n}`" + (f" ({uses[n]})" if uses and n in uses else "") for n in missing)
    raise UnsupportedInternals(
        f"{what}: {where} of {library} {installed(library)} has no {said}. lvita patches this {library} "
        f"internal and is tested with {library} {TESTED.get(library, 'as pinned in pyproject.toml')}; "
        f"install the version pyproject.toml pins (pip install -e .)")


def check(obj, kind: str, what: str) -> None:
    """``require`` every name :data:`TARGETS` registers under ``kind`` on ``obj``."""
    t = TARGETS[kind]
    require(obj, t.needs, what, t.library, t.needs)


def optimizer_kind(opt, what: str) -> str:
    """Which of DeepSpeed's optimizer paths ``opt`` (``engine.optimizer``) is, its targets checked:
    "zero" (DeepSpeedZeroOptimizer, stage 1/2), "bf16" (BF16_Optimizer) or "plain" (a torch
    optimizer DeepSpeed steps directly, ZeRO 0 in fp32). Any other class raises, naming it."""
    import torch

    zero, bf16, zero3 = resolve(_ZERO), resolve(_BF16), resolve(_ZERO3)
    base = resolve("deepspeed.runtime.base_optimizer:DeepSpeedOptimizer")
    if isinstance(opt, zero):
        kind = "zero"
    elif isinstance(opt, zero3):
        kind = "zero3"
    elif isinstance(opt, bf16):
        kind = "bf16"
    elif isinstance(opt, torch.optim.Optimizer) and not isinstance(opt, base):
        kind = "plain"
    else:
        cls = type(opt)
        raise UnsupportedInternals(
            f"{what}: engine.optimizer is {cls.__module__}.{cls.__qualname__}, not one of the optimizers lvita "
            f"patches (DeepSpeedZeroOptimizer at ZeRO 1/2, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer, a torch "
            f"optimizer at ZeRO 0) under "
            f"deepspeed {installed('deepspeed')}; lvita is tested with deepspeed {TESTED['deepspeed']} and "
            f"configurations from lvita.config.validate (bf16 or fp32, ZeRO 0-3, no fp16)")
    check(opt, kind, what)
    if kind == "zero" and opt.cpu_offload:
        check(opt, "zero_offload", what)
    return kind


def check_engine(engine, what: str, pipeline: bool | None = None) -> None:
    """The engine is DeepSpeed's PipelineEngine (``pipeline`` True or None) or, at pipeline 1 under ZeRO-2/3,
    its DeepSpeedEngine (``pipeline`` False or None), with the targets checked."""
    if pipeline is not False and isinstance(engine, resolve(_ENGINE)):
        check(engine, "engine", what)
        return
    if pipeline is not True and isinstance(engine, resolve(_DS_ENGINE)) and not isinstance(engine, resolve(_ENGINE)):
        check(engine, "ds_engine", what)
        return
    cls = type(engine)
    want = {True: "PipelineEngine", False: "DeepSpeedEngine (ZeRO-2/3 at pipeline 1)",
            None: "PipelineEngine or DeepSpeedEngine"}[pipeline]
    raise UnsupportedInternals(f"{what}: the engine is {cls.__module__}.{cls.__qualname__}, not DeepSpeed's {want} "
                               f"(lvita builds a PipelineModule, or at ZeRO-2/3 the plain model: lvita.parallel.zero)")
