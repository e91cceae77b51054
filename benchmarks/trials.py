"""Benchmark trials: child processes that cannot outlive their time or leave the GPU busy for the next.

    from benchmarks.trials import run_trial
    t = run_trial([sys.executable, "-m", "lvita.train", "--stage", "s.json"], timeout=120, log=Path("a.log"))
    t.status, t.rc, t.wall_s, t.error       # status: "ok" | "oom" | "timeout" | "error"

Each trial runs in its own process group (a new session), and that group is killed whole when the
trial ends, by timeout or otherwise, or when the caller is interrupted while it runs (an exception in
the caller, e.g. SystemExit from a SIGTERM handler): a launcher, its ranks, a compiler they started. Its output goes to
``log`` as it comes, so a killed trial's log is still there. Before returning, the next trial's start
waits until no process of the group is alive and the GPU holds no compute process (nvidia-smi; nothing
to wait for without it), so a trial that is slow to die cannot make the next one fail as if out of
memory. The status tells out-of-memory (CUDA's, the caching allocator's, lvita's memory cap) apart from
a timeout and from any other failure (a crash, a full disk, a bad argument), which callers must not read
as a memory limit. Trade-off: a wall-clock timeout, no attempt to stop a trial gently.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OOM = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation", re.I)


@dataclass
class Trial:
    status: str  # ok | oom | timeout | error
    rc: int | None
    wall_s: float
    log: Path
    pid: int  # the trial's process group (its leader's pid)
    error: str = ""  # the log's last lines when not ok


def classify(rc: int, text: str) -> str:
    """A finished process's status from its exit code and output (timeouts are decided by the caller)."""
    if rc == 0:
        return "ok"
    return "oom" if OOM.search(text) else "error"


def group_alive(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``, read from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            alive.append(int(stat.parent.name))
    return alive


def kill_group(pgid: int, wait_s: float = 30.0) -> None:
    """SIGKILL every process of the group and wait (up to ``wait_s``) until none is alive."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    end = time.monotonic() + wait_s
    while group_alive(pgid) and time.monotonic() < end:
        time.sleep(0.1)


def gpu_processes() -> list[str]:
    """Compute processes on the GPUs, as nvidia-smi lists them ([] without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def wait_gpu_free(limit_s: float = 60.0) -> list[str]:
    """Wait until the GPU holds no compute process; returns what still holds it after ``limit_s``."""
    end = time.monotonic() + limit_s
    while (busy := gpu_processes()) and time.monotonic() < end:
        time.sleep(0.5)
    return busy


def run_trial(cmd: list[str], timeout: float, log: Path, env: dict | None = None, cwd: Path = REPO) -> Trial:
    """Run ``cmd`` in its own process group for at most ``timeout`` seconds (see the module docstring)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(timeout, 0.1)), False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        finally:  # also after a normal exit, and when the caller is interrupted (SIGTERM, Ctrl-C)
            kill_group(proc.pid)
        rc = proc.wait() if rc is None else rc
    wall = time.monotonic() - t0
    busy = wait_gpu_free()
    text = log.read_text(errors="replace")
    status = "timeout" if timed_out else classify(rc, text)
    error = "" if status == "ok" else (f"timeout after {timeout:.0f}s; " if timed_out else "") + text[-1500:]
    if busy:
        error += f"\n[trials] the GPU still held processes a minute after the trial: {busy}"
    return Trial(status, rc, round(wall, 1), log, proc.pid, error)
