"""LoRA runs resume (issue 33): after SIGKILL at the same layout, and at another engine and layout through the
universal copy, continuing an uninterrupted LoRA run's losses; the frozen base weights stay bit-identical to the
init_from checkpoint's while the adapters train.

The stage: the tiny preset initialised from a full fine-tuning checkpoint, ``trainable: []``, rank-4 adapters on
every LLM linear (train.lr.llm their rate), fp32 on CPU at pipeline 2 (ZeRO-1, 2 processes). Only adapters are
in the optimizer: the universal copy holds no folder for a frozen weight, so the new layout's frozen weights come
from the per-block model files (lvita.ckpt.resume.load_base_weights) and its adapters' fp32 weights and Adam moments
from the universal folders; the new layout's own checkpoints then resume natively (DeepSpeed's module load).

Noise and bug sizes: the same layout repeats the same arithmetic (bit-identical, tests/test_resume.py; 1e-6), another
engine and layout sums in another order (measured here: ZeRO-3 Ulysses 2 6.9e-8 and 1.4e-7 relative on steps 3-4,
pipeline 1 x data 2 0 and 1.4e-7; 1e-5). Bug: a base that does not come back at the new layout (the seeded
initialisation instead of the init_from weights: lvita.ckpt.resume.load_base_weights did not exist) gave step 3
a loss of 7.67 instead of 6.92; a lost Adam state or LR position moves the next loss by >= 1e-3 at full
fine-tuning (tests/test_resume.py).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, stage_dict, write_stage
from tests.distributed import launch_trainer, newest_step, run_world, sigkill_after
from tests.test_training import _metrics, _train

PIPE2 = "parallel.pipeline=2"
ZERO3_ULYSSES2 = [f"deepspeed={REPO / 'ds_configs' / 'zero3_fp32_cpu.json'}", "parallel.pipeline=1",
                  "parallel.ulysses=2"]


def _lora_stage(root: Path, tokenizer_dir, dataset_dir, init: Path) -> Path:
    cfg = stage_dict(tokenizer_dir, dataset_dir, root / "x", iterations=4, save_every=1)
    cfg["model"].update(trainable=[], init_from=str(init), lora={"rank": 4, "alpha": 8})
    cfg["train"]["lr"] = {"vision": 1e-4, "projector": 1e-3, "llm": 1e-2}
    return write_stage(root / "lora.json", cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir, dataset_dir):
    """The base (one step of full fine-tuning, 1 process) and an uninterrupted 4-step LoRA run at pipeline 2
    saving every step."""
    root = tmp_path_factory.mktemp("lora_resume")
    base_cfg = stage_dict(tokenizer_dir, dataset_dir, root / "base", iterations=1)
    run_world(_train, 1, str(write_stage(root / "base.json", base_cfg)), [])
    init = root / "base" / "checkpoints" / "global_step1"
    stage = _lora_stage(root, tokenizer_dir, dataset_dir, init)
    ref = run_world(_train, 2, str(stage), [PIPE2, f"output_dir={root / 'ref'}"])[0]
    assert len(ref) == 4
    return root, stage, init, ref


def _launch(stage: Path, out: Path, *sets: str) -> subprocess.Popen:
    return launch_trainer(stage, out, *sets)


def test_lora_resumes_after_sigkill_with_the_uninterrupted_losses(runs):
    root, stage, _, ref = runs
    out = root / "killed"
    text = sigkill_after(_launch(stage, out, PIPE2), out / "checkpoints" / "global_step2" / "lvita_manifest.json")
    assert "LoRA: rank 4" in text
    latest = newest_step(out / "checkpoints")
    assert 2 <= latest < 4, latest  # killed before the final step
    proc = _launch(stage, out, PIPE2)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'global_step{latest}'}" in text
    assert "universal" not in text  # the same layout: DeepSpeed's own files
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4]
    # noise: none (the same layout repeats the same arithmetic, bit-identical in tests/test_resume.py); 1e-6
    # as there. Bug: see the module docstring (a restart of the adapters moves step 3 by far more)
    assert [m["loss"] for m in _metrics(out)] == pytest.approx(ref, rel=1e-6)


def _plain(name: str) -> str:
    return name.replace(".base_layer.", ".")


def test_frozen_base_weights_stay_bit_identical_and_adapters_train(runs):
    from lvita.ckpt.weights import read_block
    from lvita.model.lora import is_adapter
    from lvita.model.presets import llm_config

    root, _, init, _ = runs
    n_blocks = llm_config("tiny").num_hidden_layers + 2  # embedding, decoder layers, head
    tags = {s: root / "ref" / "checkpoints" / f"global_step{s}" for s in (2, 4)}
    adapters = {2: {}, 4: {}}
    frozen = 0
    for b in range(n_blocks):
        base = read_block(init, b)
        for step, tag in tags.items():
            state = read_block(tag, b, merge=False)
            plain = {_plain(k) for k in state if not is_adapter(k)}
            assert plain == set(base), f"block {b}: other frozen tensors than the base's"
            for k, v in state.items():
                if is_adapter(k):
                    adapters[step][f"{b}.{k}"] = v
                else:  # bit-identical: a frozen weight that moved at all was in the optimizer
                    assert torch.equal(v, base[_plain(k)]), f"block {b} {k} moved at step {step}"
                    frozen += step == 4
    assert frozen > 0 and not any(".base_layer." in k for k in adapters[4])
    a4, a2 = adapters[4], adapters[2]
    assert a4 and a4.keys() == a2.keys()
    assert sum(".lora_A." in k for k in a4) == sum(".lora_B." in k for k in a4) == 7 * (n_blocks - 2)
    # lora_B starts at zero (PEFT): every one is non-zero after training; every adapter moved from step 2 to 4
    assert all(v.abs().max() > 0 for k, v in a4.items() if ".lora_B." in k)
    assert all(not torch.equal(a4[k], a2[k]) for k in a4)


def _resume_from(runs, name: str, sets: list[str], world: int = 2) -> tuple[list[float], Path]:
    root, stage, _, _ = runs
    out = root / name
    shutil.copytree(root / "ref" / "checkpoints" / "global_step2", out / "checkpoints" / "global_step2")
    losses = run_world(_train, world, str(stage), [*sets, f"output_dir={out}"])[0]
    assert (out / "checkpoints" / "universal" / "global_step2" / "lvita_manifest.json").is_file()
    assert [m["step"] for m in _metrics(out)] == [3, 4]
    assert [m["lr"] for m in _metrics(out)] == [m["lr"] for m in _metrics(root / "ref")][2:]
    return losses, out


@pytest.mark.parametrize("name,sets", [("zero3_ulysses2", ZERO3_ULYSSES2), ("data2", ["parallel.pipeline=1"])],
                         ids=["zero3_ulysses2", "pipeline1_data2"])
def test_lora_checkpoint_resumes_at_another_layout_through_universal(runs, name, sets):
    """Saved at pipeline 2 (ZeRO-1); resumed under the ZeRO-3 engine at Ulysses 2, or at pipeline 1 x data 2:
    the universal copy holds the adapters' states only (frozen parameters are in no optimizer); the frozen
    weights load from the per-block files. Tolerance 1e-5 (noise ~1e-7: another engine's summation order)."""
    from lvita.ckpt.weights import read_block

    root = runs[0]
    losses, out = _resume_from(runs, name, sets)
    assert losses == pytest.approx(runs[3][2:], rel=1e-5)
    # the new layout's own step-3 checkpoint resumes there natively (DeepSpeed's files, no universal copy)
    again = root / f"{name}_again"
    shutil.copytree(out / "checkpoints" / "global_step3", again / "checkpoints" / "global_step3")
    assert run_world(_train, 2, str(runs[1]), [*sets, f"output_dir={again}"])[0] == pytest.approx(losses[1:], rel=1e-6)
    assert not (again / "checkpoints" / "universal").exists()
    universal = out / "checkpoints" / "universal" / "global_step2" / "zero"
    folders = [d.name for d in universal.iterdir() if d.is_dir()]
    assert folders and all(".lora_" in f or f == "frozen_stage_placeholder" for f in folders), folders
    # the frozen weights written at step 4 by the new layout are still the base's (bit-identical)
    init = runs[2]
    for b in (0, 1):
        base = read_block(init, b)
        for k, v in read_block(out / "checkpoints" / "global_step4", b, merge=False).items():
            if ".lora_" not in k:
                assert torch.equal(v, base[_plain(k)]), (b, k)


def test_full_fine_tuning_with_a_frozen_module_resumes_at_another_layout(runs, tokenizer_dir, dataset_dir):
    """Not LoRA alone: a full fine-tuning stage that freezes the vision tower (as stages 1, 3 and 4 freeze modules)
    and starts from init_from, saved at pipeline 2 and resumed at pipeline 1 x data 2 through the universal copy,
    continues the uninterrupted losses. Before load_base_weights the frozen tower came back as the seeded init, not
    init_from's (the same bug as the LoRA base's); hidden whenever init_from is unset, since the seeded init is then
    what training started from. Tolerance 1e-5 (noise ~1e-7, another summation order)."""
    root, _, init, _ = runs
    cfg = stage_dict(tokenizer_dir, dataset_dir, root / "frozen_ref", iterations=3, save_every=1)
    cfg["model"].update(trainable=["projector", "llm"], init_from=str(init))
    stage = write_stage(root / "frozen.json", cfg)
    ref = run_world(_train, 2, str(stage), [PIPE2])[0]
    out = root / "frozen_data2"
    shutil.copytree(root / "frozen_ref" / "checkpoints" / "global_step1", out / "checkpoints" / "global_step1")
    losses = run_world(_train, 2, str(stage), ["parallel.pipeline=1", f"output_dir={out}"])[0]
    assert (out / "checkpoints" / "universal" / "global_step1").is_dir()
    assert losses == pytest.approx(ref[1:], rel=1e-5), (losses, ref)
