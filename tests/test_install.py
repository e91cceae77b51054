"""lvita as people install it (issue 32 point 1): a built wheel in a fresh virtual environment, run from an
empty directory, with the shipped stage files found by name.

The wheel is built from a copy of the checkout's files (the build writes build/ and *.egg-info, which must
not land in the checkout), without network: ``--no-build-isolation --no-index``, and the venv sees the
suite's site-packages (torch, deepspeed, ...) but its own lvita, the wheel's. The test checks that it is
the wheel's lvita that runs (an editable install or the checkout on sys.path would hide a missing file).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.distributed import free_port

TIMEOUT = 900


def _source_files() -> list[str]:
    """The checkout's files as git sees them (tracked and untracked, not ignored)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                             capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the wheel test copies the files git lists")
    return [f for f in out.stdout.decode().split("\0") if f and (REPO / f).exists() or (REPO / f).is_symlink()]


def _copy_source(dest: Path) -> None:
    for name in _source_files():
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)  # lvita/_shipped/* -> ../../stages: the wheel follows them
        elif src.is_file():
            shutil.copy2(src, dst)


def _run(cmd: list, cwd: Path, env: dict) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}: exit {proc.returncode}\n{text[-4000:]}"
    return text


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(the venv's python, an environment without the checkout on PYTHONPATH)."""
    root = tmp_path_factory.mktemp("install")
    src, wheels, env_dir = root / "src", root / "wheels", root / "venv"
    _copy_source(src)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["OMP_NUM_THREADS"] = "1"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", wheels, src], root, env)
    (wheel,) = wheels.glob("lvita-*.whl")
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], root, env)  # the suite's pip
    return python, env


def test_the_wheel_carries_the_shipped_files_and_runs_from_an_empty_directory(installed, tmp_path):
    python, env = installed
    work = tmp_path / "job"  # an empty job directory: no stages/, no ds_configs/, no lvita/ here
    work.mkdir()
    where = _run([python, "-c", "import lvita, lvita.config.shipped as s; print(lvita.__file__); "
                                "print(s.STAGES.resolve()); print(len(s.stage_names()), len(s.ds_config_names()))"],
                 work, env).split()
    venv_root = python.parent.parent
    assert Path(where[0]).is_relative_to(venv_root), where  # the wheel's lvita, not the checkout's
    assert Path(where[1]).is_relative_to(venv_root) and where[1].endswith("lvita/_shipped/stages"), where
    # every shipped file, as the repository has it (one source: the wheel copies stages/ and ds_configs/)
    repo_stages = sorted(str(p.relative_to(REPO / "stages").with_suffix("")) for p in (REPO / "stages").rglob("*.json"))
    assert int(where[2]) == len(repo_stages) > 8 and int(where[3]) == len(list((REPO / "ds_configs").glob("*.json")))
    shipped = venv_root / Path(where[1]).relative_to(venv_root)
    for name in repo_stages:
        assert (shipped / f"{name}.json").read_bytes() == (REPO / "stages" / f"{name}.json").read_bytes(), name

    # the modelling code that `to-hf --format longvita` copies into an export (package data too)
    code = sorted(p.name for p in (Path(where[0]).parent / "ckpt" / "remote_code").glob("*.py"))
    assert code == sorted(p.name for p in (REPO / "lvita" / "ckpt" / "remote_code").glob("*.py")) and len(code) >= 4

    # lvita demo, first stage, two steps: tokenizer, data, the deepspeed launcher, a checkpoint
    lvita = python.parent / "lvita"
    text = _run([lvita, "demo", "--stages", "1", "--world-size", "1", "--set", "train.iterations=2"], work, env)
    assert "1 stage done" in text, text[-3000:]
    assert (work / "demo_out" / "1_align" / "checkpoints" / "global_step2" / "lvita_manifest.json").is_file()

    # a shipped stage by name under the deepspeed launcher (python -m deepspeed.launcher.runner is the
    # `deepspeed` command; the venv's python, so the ranks import the wheel's lvita), its relative paths
    # (output_dir, data, tokenizer, init_from) resolved against this directory, its deepspeed key
    # (ds_configs/pipeline_fp32_cpu.json) against the shipped configs
    port = str(free_port())
    text = _run([python, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", port, "--module",
                 "lvita.train", "--stage", "demo/2_general", "--set", "train.iterations=2"], work, env)
    metrics = [json.loads(x) for x in (work / "demo_out" / "2_general" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2], text[-3000:]
    assert "initialised weights from demo_out/1_align/checkpoints/global_step2" in text, text[-3000:]
    assert not (work / "stages").exists() and not (work / "ds_configs").exists()
