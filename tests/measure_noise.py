"""Measure the noise floor and the bug signal behind two tolerances (not a test; minutes each):

    python -m tests.measure_noise adam WORKDIR   # test_levers.py::test_optimizer_offload_steps_like_adamw
    python -m tests.measure_noise bf16 WORKDIR   # test_training.py::test_bf16_checkpoint_converts_to_universal

Each trains the test's tiny stage several ways and prints how far each run lands from the
reference, in the units its test compares. Noise runs change only the arithmetic (threads, CPU Adam
built for another instruction set, torch's kernels for another CPU via ATEN_CPU_CAPABILITY in a
child process); bug runs break what the test guards (weight decay skipped, L2 instead of decoupled
decay, no bias correction; Adam moments lost or fp32 master weights rebuilt from bf16 in the
universal copy). The numbers quoted in those tests' docstrings came from here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO, stage_dict, write_dataset, write_stage
from tests.distributed import run_world

ADAM_RUNS = {  # name: (variant, optimizer_offload)
    "adamw": ({}, "false"), "adamw_2_threads": ({"threads": 2}, "false"),
    "cpu_adam": ({}, "true"), "cpu_adam_2_threads": ({"threads": 2}, "true"),
    "cpu_adam_avx2": ({"simd": "AVX256", "march": "-march=haswell"}, "true"),
    "cpu_adam_scalar": ({"simd": "SCALAR", "march": "-march=x86-64"}, "true"),
    "bug_no_weight_decay": ({"bug": "no_wd"}, "true"), "bug_l2_decay": ({"bug": "l2"}, "true"),
    "bug_no_bias_correction": ({"bug": "no_bias_correction"}, "true"),
}


def _train_variant(rank, stage, sets, variant):
    if variant.get("simd"):  # DeepSpeed's CPU Adam as another CPU would JIT-build it
        os.environ["TORCH_EXTENSIONS_DIR"] = f"/tmp/lvita_ext_{variant['simd']}"
        from deepspeed.ops.op_builder.cpu.builder import CPUOpBuilder

        CPUOpBuilder.simd_width = lambda self: f"-D__{variant['simd']}__"
        CPUOpBuilder.cpu_arch = lambda self: variant["march"]
    if variant.get("threads"):
        torch.set_num_threads(variant["threads"])
    import lvita.training.optim as optim

    build = optim.build_optimizer

    def broken(groups, train):
        bug = variant.get("bug")
        if bug == "no_wd":
            for g in groups:
                g["weight_decay"] = 0.0
        if bug in ("l2", "no_bias_correction"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=max(g["lr"] for g in groups), betas=tuple(train.adam_betas),
                                    eps=train.adam_eps, adamw_mode=bug != "l2", bias_correction=bug != "no_bias_correction")
        return build(groups, train)

    optim.build_optimizer = broken
    from lvita.config.schema import load_stage
    from lvita.training.loop import run

    return run(load_stage(stage, sets))


def _stage(work: Path, **kw) -> tuple[str, dict]:
    from lvita.data.tokenizer import train_demo_tokenizer

    tok = work / "tok"
    if not tok.exists():
        train_demo_tokenizer(tok)
    cfg = stage_dict(tok, write_dataset(work / "data"), work / "ref", iterations=3, **kw)
    return str(write_stage(work / "s.json", cfg)), cfg


def adam(work: Path) -> None:
    from lvita.model.longvita import module_of
    from lvita.training.optim import lr_factor
    from tests.test_training import _layer_states

    stage, cfg = _stage(work, weight_decay=0.1)
    train = cfg["train"]
    steps = sum(lr_factor(t, train["warmup_steps"], train["iterations"], 0.0) for t in range(train["iterations"]))
    runs = {}
    for name, (variant, on) in ADAM_RUNS.items():
        out = work / name
        losses = run_world(_train_variant, 2, stage, ["parallel.pipeline=2", f"train.optimizer_offload={on}",
                                                       f"output_dir={out}"], variant, timeout=1800)[0]  # JIT builds
        runs[name] = losses, _layer_states(out / "checkpoints" / "global_step3")
        ref_losses, a = runs["adamw"]
        norm = element = 0.0
        for k in a:
            if k.endswith("k_proj.bias"):  # no gradient at all: compared by no test
                continue
            d = runs[name][1][k].double() - a[k].double()
            norm = max(norm, d.norm().item() / max(a[k].double().norm().item(), 1e-30))
            element = max(element, d.abs().max().item() / (train["lr"][module_of(k)] * steps))
        loss = max(abs(x - y) / abs(y) for x, y in zip(losses, ref_losses))
        print(f"{name:24s} worst tensor {norm:.3g} relative | worst element {element:.3g} of its step sizes | "
              f"losses {loss:.3g} relative", flush=True)


def bf16(work: Path) -> None:
    """Noise: whole reference runs under other arithmetic (a child process per setting, since torch
    reads ATEN_CPU_CAPABILITY once) against this process's; bugs: an edited universal copy."""
    from tests.test_stopping import _optimizer_states
    from tests.test_training import _train

    stage, cfg = _stage(work, save_every=1)
    cfg.update(precision="bf16", deepspeed=str(REPO / "ds_configs" / "pipeline_bf16_zero1.json"))
    write_stage(Path(stage), cfg)
    if len(sys.argv) > 3:  # a child: one uninterrupted pipeline-2 run into sys.argv[3]
        run_world(_train, 2, stage, ["parallel.pipeline=2", f"output_dir={sys.argv[3]}"])
        return
    ref = run_world(_train, 1, stage, [])[0]
    run_world(_train, 2, stage, ["parallel.pipeline=2", f"output_dir={work / 'ref_pp2'}"])
    for name, env in (("2_threads", {"LVITA_TEST_THREADS": "2"}), ("avx2", {"ATEN_CPU_CAPABILITY": "avx2"})):
        subprocess.run([sys.executable, "-m", "tests.measure_noise", "bf16", str(work), str(work / name)],
                       cwd=REPO, env={**os.environ, **env}, check=True)
    uni = work / "resumed" / "checkpoints" / "universal" / "global_step1"

    def resume(name, edit=None):
        out = work / name
        shutil.copytree(work / "ref" / "checkpoints" / "global_step1", out / "checkpoints" / "global_step1")
        if edit:
            shutil.copytree(uni, out / "checkpoints" / "universal" / "global_step1")
            for d in (out / "checkpoints" / "universal" / "global_step1" / "zero").iterdir():
                for f in (d.glob(edit[0]) if d.is_dir() else []):
                    t = torch.load(f, weights_only=False)  # {"param": tensor, "cat_dim": ...}
                    t["param"] = edit[1](t["param"])
                    f.unlink()  # the copy may hard-link the original's files
                    torch.save(t, f)
        run_world(_train, 2, stage, ["parallel.pipeline=2", f"output_dir={out}"])

    resume("resumed")
    resume("bug_moments_lost", ("exp_avg*.pt", lambda t: t.zero_()))
    resume("bug_master_from_bf16", ("fp32.pt", lambda t: t.bfloat16().float()))
    want = _optimizer_states(work / "ref_pp2" / "checkpoints" / "global_step2")
    for name in ("resumed", "2_threads", "avx2", "bug_moments_lost", "bug_master_from_bf16"):
        import json

        losses = [json.loads(x)["loss"] for x in (work / name / "metrics.jsonl").read_text().splitlines()][-2:]
        got = _optimizer_states(work / name / "checkpoints" / "global_step2")
        master = moments = 0.0
        for k, w in want.items():
            if torch.is_tensor(w) and w.is_floating_point():
                d = (got[k].double() - w.double()).abs()
                if ".fp32." in k:
                    master = max(master, d.mean().item())
                else:
                    moments = max(moments, d.max().item() / max(w.double().abs().max().item(), 1e-30))
        loss = max(abs(x - y) / abs(y) for x, y in zip(losses, ref[1:]))
        print(f"{name:22s} losses {loss:.3g} relative | master weights mean |diff| {master:.3g} | "
              f"Adam moments {moments:.3g} of their largest entry", flush=True)


if __name__ == "__main__":
    {"adam": adam, "bf16": bf16}[sys.argv[1]](Path(sys.argv[2]))
