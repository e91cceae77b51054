"""Surviving the cluster, through the real launcher with 2 CPU processes: preemption signals and
time limits save and exit 0 with nothing left running, the next run resumes exactly; divergence
skips non-finite steps, stops with exit 2 and never prunes the last healthy checkpoint."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from lvita.ckpt.checkpoint import read_manifest
from tests.conftest import REPO, stage_dict, write_stage
from tests.distributed import THREADS, free_port, run_world
from tests.test_training import _layer_states, _metrics, _train

ITERATIONS = 16
STOPPED = re.compile(r"lvita\.train: stopped at step (\d+) of \d+ on (.+); saved (\S+); run the same command again")


def _start(stage: Path, out: Path, *sets: str, launcher: str = "deepspeed.launcher.runner") -> subprocess.Popen:
    cmd = [sys.executable, "-m", launcher, "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "lvita.train", "--stage", str(stage), "--set", f"output_dir={out}"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": THREADS}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps(out: Path) -> list[int]:
    return [m["step"] for m in _metrics(out)] if (out / "metrics.jsonl").is_file() else []


def _tree(proc: subprocess.Popen, out: Path, after_a_step: bool = True):
    """Once both ranks run (and the run has logged a new step): (every process below the runner,
    the two ranks)."""
    before = len(_steps(out))
    deadline = time.time() + 400
    while True:
        assert proc.poll() is None and time.time() < deadline, "the run ended or hung before its first step"
        tree = psutil.Process(proc.pid).children(recursive=True)
        ranks = [p for p in tree if "lvita.train" in _cmdline(p) and "deepspeed.launcher.launch" not in _cmdline(p)]
        if len(ranks) == 2 and (not after_a_step or len(_steps(out)) > before):
            return tree, ranks
        time.sleep(0.05)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _end(proc: subprocess.Popen, tree: list[psutil.Process]) -> str:
    """Output of the whole run (the pipe closes when the last process holding it exits); then no
    process of the run may be left."""
    text, _ = proc.communicate(timeout=600)
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}\n{text[-3000:]}"
    return text


def _stopped(text: str, out: Path, reason: str) -> int:
    found = STOPPED.findall(text)
    assert len(found) == 1, text[-4000:]
    step, why, where = found[0]
    assert reason in why, why
    assert Path(where) == out / "checkpoints" / f"global_step{step}"
    assert (Path(where) / "lvita_manifest.json").is_file()
    assert (out / "checkpoints" / "latest").read_text() == f"global_step{step}"
    assert int(step) < ITERATIONS, "the run ended before the stop: give it more iterations"
    return int(step)


def _signal_all(tree: list[psutil.Process], proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """What ``scancel`` / ``scancel --full`` / a preempting Slurm does: the signal to every process
    of the job (here: lvita.launch, DeepSpeed's launch and both ranks)."""
    for p in [psutil.Process(proc.pid), *tree]:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tokenizer_dir, dataset_dir):
    root = tmp_path_factory.mktemp("stopping")
    cfg = stage_dict(tokenizer_dir, dataset_dir, root / "unused", iterations=ITERATIONS, save_every=4)
    return root, write_stage(root / "s.json", cfg)


@pytest.fixture(scope="module")
def reference(stage) -> Path:
    """The same stage uninterrupted (in-process world): the losses every stopped and resumed run must give."""
    root, stage_file = stage
    ref_out = root / "reference"
    run_world(_train, 2, str(stage_file), [f"output_dir={ref_out}"])
    return ref_out


def _same_as_reference(out: Path, ref_out: Path) -> None:
    assert _steps(out) == list(range(1, ITERATIONS + 1))
    # noise: same layout, same arithmetic: bit-identical (tests/README.md); bug: state lost across the
    # stop moves the next losses >= 1e-3 (test_resume.py)
    assert [m["loss"] for m in _metrics(out)] == pytest.approx([m["loss"] for m in _metrics(ref_out)], rel=1e-6)
    assert [m["lr"] for m in _metrics(out)] == [m["lr"] for m in _metrics(ref_out)]


def test_preempted_six_ways_resumes_exactly(stage, reference):
    """One training run stopped six times, each continued by the same command: SIGTERM to the
    ``deepspeed`` runner, SIGTERM to one rank, SIGUSR1 to ``python -m lvita.launch`` with SIGTERMs
    hammering both ranks while they save, SIGTERM and SIGUSR1 to every process of a ``lvita.launch``
    run (``scancel --full``: exit 0 all the same), and ``train.time_limit``; then a rank is killed
    (-9) and the run finishes. Its losses equal an
    uninterrupted run's, every step is logged once, and no stopped run leaves a process behind."""
    root, stage_file = stage
    out = root / "run"

    # 1. SIGTERM to DeepSpeed's runner: it dies of it; launch and the ranks notice, save and exit 0
    proc = _start(stage_file, out)
    tree, _ = _tree(proc, out)
    proc.send_signal(signal.SIGTERM)
    text = _end(proc, tree)
    assert proc.returncode == -signal.SIGTERM
    assert "exits successfully" in text and "exits with return code" not in text  # launch saw both ranks exit 0
    s1 = _stopped(text, out, "launcher gone")

    # 2. SIGTERM to one rank: both stop at the same step
    proc = _start(stage_file, out)
    tree, ranks = _tree(proc, out)
    ranks[1].send_signal(signal.SIGTERM)
    text = _end(proc, tree)
    assert proc.returncode == 0, text[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'global_step{s1}'}" in text
    s2 = _stopped(text, out, "signal")
    assert s2 > s1

    # 3. SIGUSR1 (Slurm's --signal) to lvita.launch, which passes it to the ranks and waits for
    # them; then SIGTERM to both ranks every 20 ms until they are gone: the repeats land in the
    # step, the agreement and the save, and change nothing
    proc = _start(stage_file, out, launcher="lvita.launch")
    tree, ranks = _tree(proc, out)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.2)
    while any(_alive(r) for r in ranks):
        for r in ranks:
            try:
                r.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        time.sleep(0.02)
    text = _end(proc, tree)
    assert proc.returncode == 0, text[-4000:]
    assert "lvita.launch: SIGUSR1: passed to 2 training processes" in text
    assert "again while stopping" in text
    s3 = _stopped(text, out, "signal SIGUSR1")
    assert s3 > s2
    read_manifest(out / "checkpoints" / f"global_step{s2}")  # the previous checkpoint is intact too

    # 4. SIGTERM to every process (``scancel``, ``scancel --full``, preemption): DeepSpeed's launch exits
    # 1 once the ranks are gone, whatever they did; lvita.launch exits 0 on the ranks' notes of a clean save
    proc = _start(stage_file, out, launcher="lvita.launch")
    tree, _ = _tree(proc, out)
    _signal_all(tree, proc)
    text = _end(proc, tree)
    assert proc.returncode == 0, text[-4000:]
    assert re.search(r"lvita\.launch: DeepSpeed's launcher ended with status 1 after SIGTERM here; all 2 ranks of "
                     r"this node saved \S+global_step\d+ \(stopped on signal SIGTERM\) and exited cleanly: exit 0", text)
    s4 = _stopped(text, out, "signal SIGTERM")
    assert s4 > s3

    # 5. SIGUSR1 to every process: DeepSpeed's launch dies of it (its runner would call that success and
    # return while the ranks save); lvita.launch waits for the ranks, now its own children, and exits 0
    proc = _start(stage_file, out, launcher="lvita.launch")
    tree, _ = _tree(proc, out)
    _signal_all(tree, proc, signal.SIGUSR1)
    text = _end(proc, tree)
    assert proc.returncode == 0, text[-4000:]
    assert "DeepSpeed's launcher ended with status 138 after SIGUSR1 here" in text
    s5 = _stopped(text, out, "signal SIGUSR1")
    assert s5 > s4

    # 6. the time limit: one step per run (it is over by the end of the first), saved, exit 0
    proc = _start(stage_file, out, "train.time_limit=1s")
    text = _end(proc, _tree(proc, out, after_a_step=False)[0])
    assert proc.returncode == 0, text[-4000:]
    assert _stopped(text, out, "time limit") == s5 + 1

    # 7. kill -9 of one rank is still a crash: the launcher ends the other within seconds (it
    # SIGTERMs it, and a rank whose sibling died exits at once instead of stopping), exit != 0
    proc = _start(stage_file, out)
    tree, ranks = _tree(proc, out)
    t0 = time.time()
    ranks[0].kill()
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive and time.time() - t0 < 20, f"{time.time() - t0:.1f}s"
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode not in (0, None) and "lvita.train: stopped" not in text

    # 8. the same command finishes the run
    proc = _start(stage_file, out)
    text = _end(proc, [])
    assert proc.returncode == 0, text[-4000:]
    _same_as_reference(out, reference)


def test_a_rank_killed_during_a_signal_stop_is_not_0(stage):
    """lvita.launch's exit 0 on the ranks' notes cannot hide a failure: SIGTERM to every process
    (``scancel``), then one rank is killed before it can save: the status stays non-zero."""
    root, stage_file = stage
    out = root / "killed"
    proc = _start(stage_file, out, launcher="lvita.launch")
    tree, ranks = _tree(proc, out)
    _signal_all(tree, proc)
    ranks[0].kill()
    text = _end(proc, tree)
    assert proc.returncode not in (0, None), text[-4000:]
    assert "lvita.train: stopped" not in text and "cleanly: exit 0" not in text
    assert not (out / "checkpoints" / "latest").exists()


def _optimizer_states(tag: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(tag.glob("*zero_pp_rank_*_optim_states.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        zero3 = "fp32_flat_groups" in state  # ZeRO-3's layout (the ZeRO engine) vs ZeRO-1/2's
        base = state["optimizer_state_dict"] if zero3 else state["base_optimizer_state"]
        for i, s in base["state"].items():
            for k, v in s.items():
                out[f"{f.name}.{i}.{k}"] = v
        for i, t in enumerate(state["fp32_flat_groups" if zero3 else "single_partition_of_fp32_groups"]):
            out[f"{f.name}.fp32.{i}"] = t
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16", "zero3"])
def test_divergence_skips_steps_and_stops_with_exit_2(stage, precision):
    """lr 1e4 without clipping: the gradient norm goes inf. Those steps change neither weights nor
    optimizer state, are counted and logged with their samples; after 2 in a row the run exits 2,
    and the last healthy checkpoint survives keep_checkpoints=1. fp32 goes through DeepSpeed's ZeRO-1
    optimizer, bf16 (the GPU config, here on CPU) through its BF16_Optimizer, zero3 (fp32) through the ZeRO engine's
    DeepSpeedZeroOptimizer_Stage3."""
    root, stage_file = stage
    out = root / f"diverged_{precision}"
    sets = {"fp32": [], "bf16": ["precision=bf16", f"deepspeed={REPO / 'ds_configs' / 'pipeline_bf16_zero1.json'}"],
            "zero3": [f"deepspeed={REPO / 'ds_configs' / 'zero3_fp32_cpu.json'}"]}[precision]
    proc = _start(stage_file, out, 'train.lr={"vision":1e4,"projector":1e4,"llm":1e4}', "train.grad_clip=0",
                  "train.max_nonfinite_steps=2", "train.save_every=1", "train.keep_checkpoints=1", *sets)
    text = _end(proc, [])
    assert proc.returncode == 2, text[-4000:]
    metrics = _metrics(out)
    bad = [m["step"] for m in metrics if m.get("nonfinite_samples")]
    assert len(bad) == 2 and bad[1] == bad[0] + 1 == metrics[-1]["step"], metrics
    first = bad[0]
    assert [m["nonfinite_steps"] for m in metrics] == [0] * (first - 1) + [1, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()  # the writer was closed before the exit
    assert [e.value for e in board.Scalars("train/nonfinite_steps")] == [0] * (first - 1) + [1, 2]
    assert all(re.fullmatch(r"(captions:cap|text:txt)-\d+", s) for s in metrics[-1]["nonfinite_samples"])
    assert f"step {first}: loss" in text and "the step was skipped" in text
    assert all(m["grad_norm"] == float("inf") for m in metrics[first - 1:])
    ckpts = out / "checkpoints"
    healthy, during = ckpts / f"global_step{first - 1}", ckpts / f"global_step{first}"
    assert re.search(rf"lvita\.train: error: training diverged: .* \(steps {first}-{first + 1}, .*"
                     rf"Newest checkpoint from sound training: {re.escape(str(healthy))};", text)
    # keep_checkpoints=1 keeps the newest (saved during the non-finite steps) and the last healthy one
    assert sorted(p.name for p in ckpts.glob("global_step*")) == sorted([healthy.name, during.name])
    assert (ckpts / "latest").read_text() == during.name
    m_healthy = json.loads((healthy / "lvita_manifest.json").read_text())
    m_during = json.loads((during / "lvita_manifest.json").read_text())
    assert (m_healthy["weights_finite"], m_healthy["nonfinite_streak"]) == (True, 0)
    assert m_during["nonfinite_streak"] == 1
    # the skipped step left weights and optimizer state exactly as they were, and finite
    for read in (_layer_states, _optimizer_states):
        a, b = read(healthy), read(during)
        assert a.keys() == b.keys() and a
        for k in a:
            if torch.is_tensor(a[k]):
                assert torch.isfinite(a[k]).all() and torch.equal(a[k], b[k]), k


def test_stop_keys_are_checked(stage, tmp_path):
    from lvita.config.schema import ConfigError, load_stage
    from lvita.config.schema import parse_duration
    from lvita.config.validate import validate

    assert [parse_duration(t) for t in ("47h30m", "90m", "3600s", "1d2h", None)] == [171000, 5400, 3600, 93600, None]
    _, stage_file = stage
    for sets, msg in ((["train.time_limit=47 hours"], "train.time_limit='47 hours': expected a duration"),
                      (["train.time_limit=0m"], "train.time_limit='0m': must be longer than 0"),
                      (["train.max_nonfinite_steps=0"], "train.max_nonfinite_steps=0: stop after")):
        with pytest.raises(ConfigError, match=re.escape(msg)):
            validate(load_stage(stage_file, sets), 2)


def test_stopper_in_one_process():
    """``lvita.train`` run directly: a signal is a stop at the next agreement, repeats are harmless,
    a stopping process ignores further signals; the time limit counts the longest step and save."""
    from lvita.training.stopping import SIGNALS, Stopper

    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        s = Stopper()
        assert s.agree(0.1) == (None, False)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.agree(0.1, skipped=True) == ("signal SIGUSR1", True)
        os.kill(os.getpid(), signal.SIGTERM)  # while stopping: noted, nothing else
        s.close()
        assert {signal.getsignal(sig) for sig in SIGNALS} == {signal.SIG_IGN}
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        t = Stopper(time_limit_s=time.time() - Stopper(install=False).started + 30)
        t.saved(2.0)
        assert t.agree(5.0) == (None, False)  # 5 s step + 2 s save fit in the 30 s left
        assert t.agree(29.0)[0] == "time limit"
        t.close()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # it stopped
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    u = Stopper()
    u.close()
    assert {sig: signal.getsignal(sig) for sig in saved} == saved  # no stop: the previous handlers are back


_BLOCKED_RANK = """
import socket, subprocess, sys, psutil
from lvita.training.stopping import Stopper
sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
s = Stopper()
s.grandparent, s.siblings = -1, [psutil.Process(sibling.pid)]  # as if under DeepSpeed's launch
if sys.argv[1] == "dead":
    sibling.kill(); sibling.wait()
a, b = socket.socketpair()
print("blocked", flush=True)
a.recv(1)  # like a collective waiting for a dead peer: the Python handler cannot run here
"""


@pytest.mark.parametrize("sibling", ["dead", "alive"])
def test_sigterm_after_a_rank_died_exits_at_once(sibling):
    """DeepSpeed's launch SIGTERMs the survivors when a rank dies (then SIGKILLs them 30 s later).
    A survivor blocked in a collective must still die at once, as before lvita caught SIGTERM; with
    every rank alive the same SIGTERM is a stop request and ends nothing by itself."""
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED_RANK, sibling], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "blocked"
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        if sibling == "dead":
            assert proc.wait(timeout=20) == 128 + signal.SIGTERM and time.time() - t0 < 10
            assert "SIGTERM after another rank of this node died; exiting at once" in proc.stderr.read()
        else:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=3)
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            p.kill()
        proc.kill()
        proc.wait()


def test_ctrl_c_stops_once_and_quits_the_second_time():
    """The first SIGINT (Ctrl-C reaches every process of the terminal's group) is a stop request like
    SIGTERM; the second ends the rank at once, even while it is blocked in a collective."""
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED_RANK, "alive"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "blocked"
        proc.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        sibling = psutil.Process(proc.pid).children()
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 128 + signal.SIGINT and time.time() - t0 < 10
        for p in sibling:  # it holds the stderr pipe open
            p.kill()
        err = proc.stderr.read()
        assert "SIGINT: stopping after this step with a checkpoint" in err and "SIGINT again: exiting at once" in err
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            p.kill()
        proc.kill()
        proc.wait()


def test_launch_reports_0_only_on_every_ranks_clean_stop(tmp_path):
    """lvita.launch's rule for a non-zero launcher status: exit 0 only with a note from every rank of
    the node, all for one checkpoint whose manifest checks out, and no noted rank exiting non-zero."""
    from lvita.launch import clean_stop
    from lvita.ckpt.checkpoint import MANIFEST

    tag = tmp_path / "checkpoints" / "global_step4"
    tag.mkdir(parents=True)
    (tag / "w.pt").write_bytes(b"1234")
    notes = tmp_path / "notes"
    notes.mkdir()

    def note(rank, checkpoint=tag, size=2):
        (notes / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "local_rank": rank, "local_size": size, "pid": 100 + rank, "step": 4,
            "reason": "signal SIGTERM", "checkpoint": str(checkpoint)}))

    assert clean_stop(notes, {}) == (False, "no rank noted a completed stop")
    note(0)
    assert clean_stop(notes, {}) == (False, "1 of 2 ranks of this node noted a completed stop")
    note(1, tmp_path / "checkpoints" / "global_step3")
    assert not clean_stop(notes, {})[0]
    note(1)
    ok, found = clean_stop(notes, {})
    assert not ok and "incomplete" in found  # no manifest: the save did not finish
    (tag / MANIFEST).write_text(json.dumps({"files": {"w.pt": 4}}))
    assert clean_stop(notes, {100: 0}) == (True, f"all 2 ranks of this node saved {tag} (stopped on signal SIGTERM) "
                                                 f"and exited")
    assert clean_stop(notes, {101: 1}) == (False, "ranks exited non-zero after their stop: {1: 1}")
    (tag / "w.pt").write_bytes(b"12")
    assert not clean_stop(notes, {})[0]  # truncated
