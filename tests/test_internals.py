"""The library internals lvita patches (lvita.parallel.internals) and the pins that keep them.

(a) On the installed DeepSpeed every registered target exists: on real engines, one per optimizer
path lvita configures (built on CPU with a two-layer PipelineModule), the patches applied and a
finite and a non-finite step taken; on the classes for yunchang and transformers; the attributes
lvita writes for DeepSpeed to read are still read by it. (b) A target removed makes the patching
raise UnsupportedInternals naming it, the class and both versions, never skip. (c) pyproject.toml's
pins admit the installed deepspeed, yunchang, transformers, torch (and every other installed
dependency), the tested versions and the GPU wheels' pins, so the suite fails when the environment
drifts outside them.
"""
from __future__ import annotations

import inspect
import re
import tomllib
from importlib import metadata
from types import SimpleNamespace

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from lvita.parallel import internals
from lvita.parallel.internals import TARGETS, UnsupportedInternals, check, check_engine, optimizer_kind, resolve
from tests.conftest import REPO
from tests.distributed import run_world

# (name, DeepSpeed config additions, the optimizer path lvita's dispatch must find)
CONFIGS = [
    ("fp32 ZeRO 0", {"zero_optimization": {"stage": 0}}, "plain"),
    ("fp32 ZeRO 1", {"zero_optimization": {"stage": 1}}, "zero"),
    ("fp32 ZeRO-Offload", {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
                           "zero_force_ds_cpu_optimizer": False}, "zero"),
    ("bf16 ZeRO 1, fp32 accumulation", {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                                        "data_types": {"grad_accum_dtype": "fp32"}}, "bf16"),
    ("bf16 ZeRO 1, bf16 accumulation", {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}, "zero"),
    ("bf16 ZeRO 0", {"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, "bf16"),
]


class _Linear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x.to(self.weight.dtype))


def _engines(rank):
    """Each configuration: the optimizer path found, the registered names missing on the live objects,
    and whether the patched engine applied a finite step and skipped a non-finite one."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from lvita.parallel.topology import init_distributed
    from lvita.training.guard import NonFiniteGuard
    from lvita.training.loop import _keep_fp32_grad_norm, _one_norm_reduction

    init_distributed()
    out = {}
    for name, extra, _ in CONFIGS:
        torch.manual_seed(0)
        module = PipelineModule([_Linear(4, 8), _Linear(8, 1)], num_stages=1,
                                loss_fn=lambda y, t: ((y.float() - t) ** 2).mean())
        groups = [{"params": list(module.parameters())[:2]}, {"params": list(module.parameters())[2:]}]
        cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
               "steps_per_print": 10**9, "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
               "pipeline": {"pipe_partitioned": False, "grad_partitioned": False}, **extra}
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(groups, lr=1e-3),
                                               config=cfg)
        opt = engine.optimizer
        kind = optimizer_kind(opt, "test")
        kinds = ["engine", kind] + (["zero_offload"] if kind == "zero" and opt.cpu_offload else [])
        missing = [f"{k}.{n}" for k in kinds for n in TARGETS[k].needs
                   if not hasattr(engine if k == "engine" else opt, n)]
        _keep_fp32_grad_norm(engine)
        _one_norm_reduction(engine)
        NonFiniteGuard(engine, 3)
        batch = [(torch.randn(1, 4), torch.randn(1, 1)) for _ in range(2)]
        loss = float(engine.train_batch(iter(batch)))
        applied, norm = engine.was_step_applied(), engine.get_global_grad_norm()
        bad = [(torch.full((1, 4), float("nan")), torch.zeros(1, 1))] * 2
        engine.train_batch(iter(bad))
        out[name] = {"kind": kind, "missing": missing, "loss": loss, "applied": applied, "norm": norm,
                     "bad_applied": engine.was_step_applied(), "bad_norm": engine.get_global_grad_norm()}
    return out


def test_every_registered_deepspeed_target_exists_on_real_engines_and_the_patches_work():
    got = run_world(_engines, 1)[0]
    for name, _, kind in CONFIGS:
        r = got[name]
        assert (r["kind"], r["missing"]) == (kind, []), (name, r)
        assert r["applied"] and r["loss"] == r["loss"], (name, r)  # a finite step is applied
        assert r["norm"] is not None and 0 < float(r["norm"]) < float("inf"), (name, r)  # the norm is kept
        assert not r["bad_applied"], (name, r)  # the guard skipped the NaN step
        if kind == "bf16":
            assert r["bad_norm"] == float("inf"), (name, r)


class _Pair(torch.nn.Module):
    """A two-layer model with the ZeRO engine's forward signature (inputs, labels) -> loss."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)

    def forward(self, inputs, labels):
        return ((self.b(self.a(inputs)).float() - labels) ** 2).mean()


ZERO_CONFIGS = [("fp32 ZeRO 2", {"zero_optimization": {"stage": 2}}, "zero"),
                ("fp32 ZeRO 3", {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}, "zero3"),
                ("bf16 ZeRO 3", {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
                                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}, "zero3")]


def _zero_engines(rank):
    """The ZeRO engine's configurations (DeepSpeedEngine, pipeline 1): as _engines, through ZeroSteps."""
    import deepspeed

    from lvita.parallel.topology import init_distributed
    from lvita.parallel.zero import ZeroSteps
    from lvita.training.guard import NonFiniteGuard

    init_distributed()
    out = {}
    for name, extra, _ in ZERO_CONFIGS:
        torch.manual_seed(0)
        module = _Pair()
        cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
               "steps_per_print": 10**9, "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True, **extra}
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-3),
                                               config=cfg)
        kind = optimizer_kind(engine.optimizer, "test")
        missing = [f"{k}.{n}" for k in ("ds_engine", kind) for n in TARGETS[k].needs
                   if not hasattr(engine if k == "ds_engine" else engine.optimizer, n)]
        steps = ZeroSteps(engine)
        NonFiniteGuard(engine, 3, losses=steps)
        dtype = torch.bfloat16 if "bf16" in name else torch.float32
        loss = float(steps.train_batch(iter([(torch.randn(1, 4, dtype=dtype), torch.randn(1, 1))] * 2)))
        applied, norm = engine.was_step_applied(), engine.get_global_grad_norm()
        steps.train_batch(iter([(torch.full((1, 4), float("nan"), dtype=dtype), torch.zeros(1, 1))] * 2))
        out[name] = {"kind": kind, "missing": missing, "loss": loss, "applied": applied, "norm": norm,
                     "bad_applied": engine.was_step_applied(), "bad_norm": engine.get_global_grad_norm(),
                     "skipped": engine.skipped_steps}
    return out


def test_the_zero_engines_targets_exist_and_the_guard_skips_a_non_finite_step():
    got = run_world(_zero_engines, 1)[0]
    for name, _, kind in ZERO_CONFIGS:
        r = got[name]
        assert (r["kind"], r["missing"]) == (kind, []), (name, r)
        assert r["applied"] and r["loss"] == r["loss"] and 0 < float(r["norm"]) < float("inf"), (name, r)
        assert not r["bad_applied"] and r["skipped"] == 1, (name, r)
        if kind == "zero3":
            assert r["bad_norm"] == float("inf"), (name, r)


def test_the_zero3_guard_replaces_a_method_of_the_class():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    for name in ("_overflow_check_and_loss_scale_update", "_loss_scale_update_and_overflow_cleanup", "step"):
        assert name in TARGETS["zero3"].needs and inspect.isfunction(getattr(DeepSpeedZeroOptimizer_Stage3, name))
    # 0.19.8's step asks it for the overflow decision without a scale update, then does the update itself
    module = inspect.getsource(inspect.getmodule(DeepSpeedZeroOptimizer_Stage3))  # step is wrapped (nvtx)
    src = module[module.index("    def step(self, closure=None):"):][:3000]
    assert "self._overflow_check_and_loss_scale_update(update_scale=False)" in src
    assert "if self._loss_scale_update_and_overflow_cleanup():" in src
    check(resolve(TARGETS["zero3_api"].cls), "zero3_api", "test")


def test_every_registered_target_exists_on_the_installed_classes():
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from transformers.models.qwen2 import modeling_qwen2
    from yunchang import LongContextAttention

    for kind in ("ds_utils", "yunchang_groups", "yunchang_kernels", "transformers_config"):
        check(resolve(TARGETS[kind].cls), kind, "test")  # modules and singletons: every name by itself
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    # the methods lvita replaces or wraps are the classes' own (the rest is set in __init__: test above)
    for cls, name in ((PipelineEngine, "clip_fp32_gradients"), (DeepSpeedZeroOptimizer, "scaled_global_norm"),
                      (DeepSpeedZeroOptimizer, "check_overflow"), (BF16_Optimizer, "step")):
        assert name in TARGETS[{PipelineEngine: "engine", DeepSpeedZeroOptimizer: "zero"}.get(cls, "bf16")].needs
        assert inspect.isfunction(getattr(cls, name)), (cls, name)
    # yunchang's LongContextAttention sets both groups in __init__ from the singleton lvita fills
    init = inspect.getsource(LongContextAttention.__init__)
    assert all(f"self.{n} = PROCESS_GROUP." in init for n in TARGETS["yunchang_attention"].needs), init
    # transformers' Qwen2 attention picks its kernel by the name lvita sets
    assert "config._attn_implementation" in inspect.getsource(modeling_qwen2.Qwen2Attention.forward)


def test_what_lvita_writes_for_deepspeed_is_still_read_by_it():
    for kind, t in TARGETS.items():
        if t.feeds:
            src = inspect.getsource(resolve(t.reader))
            for name in t.feeds:
                assert f"self.optimizer.{name}" in src, (kind, name, t.reader)


# -- (b) a target gone: an error, never a skip ------------------------------------------------------------

def _bare_zero(**without):
    """A DeepSpeedZeroOptimizer with every registered instance attribute set to a dummy (no __init__)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = object.__new__(DeepSpeedZeroOptimizer)
    cls_names = set(dir(DeepSpeedZeroOptimizer))
    for name in TARGETS["zero"].needs:
        if name not in cls_names and name not in without:
            setattr(opt, name, False if name == "cpu_offload" else [])
    return opt


def _assert_names(err, *words):
    msg = str(err.value)
    for w in (*words, f"deepspeed {metadata.version('deepspeed')}", internals.TESTED["deepspeed"]):
        assert w in msg, msg


def test_a_removed_method_stops_the_pipeline_fix_and_the_guard(monkeypatch):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from lvita.training.loop import _one_norm_reduction

    engine = SimpleNamespace(optimizer=_bare_zero())
    assert optimizer_kind(engine.optimizer, "test") == "zero"
    monkeypatch.delattr(DeepSpeedZeroOptimizer, "scaled_global_norm")
    with pytest.raises(UnsupportedInternals) as err:
        _one_norm_reduction(engine)
    _assert_names(err, "`scaled_global_norm`", "stage_1_and_2.DeepSpeedZeroOptimizer", "the ZeRO-1 pipeline norm fix")
    monkeypatch.undo()
    opt = _bare_zero()
    monkeypatch.delattr(DeepSpeedZeroOptimizer, "check_overflow")
    with pytest.raises(UnsupportedInternals) as err:
        optimizer_kind(opt, "the non-finite guard")
    _assert_names(err, "`check_overflow`", "DeepSpeedZeroOptimizer", "the non-finite guard")


def test_a_missing_instance_attribute_stops_the_patch():
    with pytest.raises(UnsupportedInternals) as err:
        optimizer_kind(_bare_zero(averaged_gradients=True), "the non-finite guard")
    _assert_names(err, "`averaged_gradients`", "this rank's gradient partition")
    offload = _bare_zero()
    offload.cpu_offload = True  # ZeRO-Offload needs local_overflow as well
    with pytest.raises(UnsupportedInternals) as err:
        optimizer_kind(offload, "the non-finite guard")
    _assert_names(err, "`local_overflow`")


def test_the_guard_and_the_norm_fix_refuse_an_engine_or_optimizer_they_do_not_know(monkeypatch):
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.pipe.engine import PipelineEngine

    from lvita.training.guard import NonFiniteGuard
    from lvita.training.loop import _keep_fp32_grad_norm, _one_norm_reduction

    fp16 = object.__new__(FP16_Optimizer)
    with pytest.raises(UnsupportedInternals) as err:
        _one_norm_reduction(SimpleNamespace(optimizer=fp16))
    _assert_names(err, "fused_optimizer.FP16_Optimizer", "not one of the optimizers lvita patches")
    with pytest.raises(UnsupportedInternals, match="not DeepSpeed's PipelineEngine"):
        NonFiniteGuard(SimpleNamespace(optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)), 2)
    engine = object.__new__(PipelineEngine)
    monkeypatch.delattr(PipelineEngine, "is_last_stage")
    with pytest.raises(UnsupportedInternals) as err:
        check_engine(engine, "the non-finite guard")
    _assert_names(err, "`is_last_stage`", "pipe.engine.PipelineEngine")
    with pytest.raises(UnsupportedInternals) as err:
        _keep_fp32_grad_norm(engine)
    _assert_names(err, "keeping the fp32 gradient norm")
    assert issubclass(UnsupportedInternals, NotImplementedError)  # lvita.train: one line, exit 2


def test_a_moved_class_is_named():
    with pytest.raises(UnsupportedInternals, match=r"deepspeed\.runtime\.nowhere:Gone is gone from deepspeed"):
        resolve("deepspeed.runtime.nowhere:Gone")


# -- (c) the pins -------------------------------------------------------------------------------------------

def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def test_pyproject_pins_admit_the_installed_versions():
    reqs = _requirements()
    for name in ("deepspeed", "yunchang", "transformers", "torch"):
        assert reqs[name].specifier, f"{name} is not pinned in pyproject.toml"
    outside = []
    for name, req in reqs.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            assert name not in ("deepspeed", "yunchang", "transformers", "torch"), f"{name} is not installed"
            continue
        if not req.specifier.contains(Version(have), prereleases=True):
            outside.append(f"{name} {have} (pyproject.toml: {req})")
    assert not outside, "installed versions outside the pins (retest and move the pin, or install the pinned one): " \
                        + "; ".join(outside)


def test_the_tested_versions_and_the_gpu_wheels_lie_inside_the_pins():
    reqs = _requirements()
    for lib, said in internals.TESTED.items():
        for v in re.findall(r"\d+\.\d+\.\d+", said):
            assert reqs[lib].specifier.contains(v), (lib, v, str(reqs[lib]))
    wheels = (REPO / "benchmarks" / "gpu_wheels.sh").read_text()
    for lib in ("deepspeed", "yunchang", "transformers"):
        pinned = re.search(rf"\b{lib}==([\w.]+)", wheels)
        assert pinned and reqs[lib].specifier.contains(pinned.group(1)), (lib, pinned and pinned.group(0))


def test_every_bound_says_why():
    lines = (REPO / "pyproject.toml").read_text().split("dependencies = [", 1)[1].split("]", 1)[0].splitlines()
    for line in lines:
        if re.search(r'^\s*"[\w-]+\s*[<>=!~]', line):
            assert "#" in line, f"pyproject.toml: give the bound a reason: {line.strip()}"
