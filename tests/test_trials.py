"""benchmarks/trials.py and the length search of benchmarks/longest_context.py, which the GPU suite's
figures rest on: a timed-out trial is killed with everything it started, nothing a finished trial
started lives on, the next trial waits while the GPU holds a process, out-of-memory is told apart from
other failures, and only out-of-memory is read as the length limit."""
from __future__ import annotations

import time

import pytest

from benchmarks.longest_context import search
from benchmarks.trials import classify, group_alive, run_trial, wait_gpu_free


def test_a_timed_out_trial_is_killed_with_its_children(tmp_path):
    t0 = time.monotonic()
    t = run_trial(["bash", "-c", "sleep 300 & echo child started; sleep 300"], 1.0, tmp_path / "t.log")
    assert t.status == "timeout" and t.rc is not None and time.monotonic() - t0 < 20
    assert group_alive(t.pid) == []  # the background `sleep 300` too, not just the shell
    assert "child started" in t.log.read_text() and t.error.startswith("timeout after 1s")


def test_nothing_a_finished_trial_started_outlives_it(tmp_path):
    t = run_trial(["bash", "-c", "sleep 300 & exit 0"], 30, tmp_path / "t.log")
    assert (t.status, t.rc, group_alive(t.pid)) == ("ok", 0, [])


@pytest.mark.parametrize("rc, text, status", [
    (1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "oom"),
    (1, "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)", "oom"),
    (1, "torch.OutOfMemoryError: out of memory: the peak resident set 0.43 GiB is above the memory cap", "oom"),
    (1, "OSError: [Errno 28] No space left on device", "error"),
    (-9, "", "error"),
    (0, "a warning that mentions out of memory", "ok"),
])
def test_out_of_memory_is_told_apart_from_other_failures(rc, text, status):
    assert classify(rc, text) == status


def test_the_next_trial_waits_while_the_gpu_holds_a_process(tmp_path, monkeypatch):
    """A fake nvidia-smi lists a compute process for its first three calls."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/bash\nn=$(cat {tmp_path}/n 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/n\n"
                    "[ $n -lt 3 ] && echo '4242, 70000 MiB'\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    assert wait_gpu_free(limit_s=30) == []
    assert (tmp_path / "n").read_text().strip() == "4"  # asked until the list came back empty
    (tmp_path / "n").write_text("0")
    assert wait_gpu_free(limit_s=0.2) == ["4242, 70000 MiB"]  # still busy at the limit: said so


def _fake(statuses: dict):
    tried = []

    def trial(n):
        tried.append(n)
        return {"status": statuses.get(n, "ok")}
    return trial, tried


@pytest.mark.parametrize("statuses, longest, why, tried", [
    ({32768: "oom"}, 16384, "out of memory at 32768", [8192, 16384, 32768]),
    ({16384: "error", 65536: "oom"}, 32768, "out of memory at 65536", [8192, 16384, 32768, 65536]),  # not a limit
    ({16384: "timeout"}, 8192, "timeout at 16384 (not a memory limit)", [8192, 16384]),
    ({}, 65536, "reached --max 65536", [8192, 16384, 32768, 65536]),
    ({8192: "oom"}, None, "out of memory at 8192", [8192]),
])
def test_only_out_of_memory_is_the_length_limit(statuses, longest, why, tried):
    trial, seen = _fake(statuses)
    assert search(trial, 8192, 65536, 0, lambda r: r) == (longest, why)
    assert seen == tried


def test_bisection_between_the_longest_success_and_the_oom():
    trial, seen = _fake({32768: "oom", 28672: "oom"})
    assert search(trial, 8192, 65536, 2, lambda r: r) == (24576, "out of memory at 28672")
    assert seen == [8192, 16384, 32768, 24576, 28672]


def test_the_search_stops_when_the_time_is_spent():
    trial, seen = _fake({})
    left = iter([10, 10, 0])
    assert search(trial, 8192, 65536, 0, lambda r: r, lambda: next(left)) == (16384, "out of time before 32768")
    assert seen == [8192, 16384]


def test_an_interrupted_caller_takes_the_running_trial_with_it(tmp_path):
    """SIGTERM to the suite (its handler raises SystemExit) while a trial runs: the trial's group dies too."""
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import signal, sys; from pathlib import Path; from benchmarks.trials import run_trial\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
            f"run_trial(['bash', '-c', 'echo $$ > {tmp_path}/pid; sleep 300 & sleep 300'], 60, Path('{tmp_path}/t.log'))")
    caller = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    for _ in range(200):
        if (tmp_path / "pid").is_file() and (tmp_path / "pid").read_text().strip():
            break
        time.sleep(0.05)
    pgid = int((tmp_path / "pid").read_text())
    assert len(group_alive(pgid)) >= 2  # bash (or the sleep it execs) and the background sleep
    caller.send_signal(signal.SIGTERM)
    assert caller.wait(timeout=30) == 143
    assert group_alive(pgid) == []
