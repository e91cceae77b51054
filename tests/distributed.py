"""The one helper for multi-process tests: run a function in N CPU processes joined by gloo.

    results = run_world(fn, 2, arg1, arg2)   # fn(rank, arg1, arg2) runs in each process
    code, out, err = run_command(["check", "--stage", "s.json"], tmp_path)   # `lvita check ...`

``fn`` must be a module-level function (it is pickled by name). Each process gets the caller's
environment and working directory at the call, plus what a launcher would set (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) and ``THREADS`` torch threads; the return values come back in rank order. A
failing rank fails the test with its traceback; a run that leaves shared memory behind in
/dev/shm fails too.

Processes come from a fork server that imported torch, DeepSpeed, transformers and lvita once
(``_PRELOAD``), as ``spawn`` would but without paying those imports (about 15 s of CPU on the CI
machine) for every process of every test. The server forks from a clean import state, never
from the test process, so no test's state leaks into another's world. On a machine with CUDA the
processes are spawned instead: a process that has asked CUDA for its devices (DeepSpeed does, on
import) cannot hand a working CUDA to its forks.
"""
from __future__ import annotations

import glob
import io
import os
import random
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


# Rendezvous ports: a band per xdist worker below Linux's ephemeral range (32768-60999). A port from
# bind(0) is an ephemeral one: between the pick and the rendezvous's bind, another test's gloo connection
# or the other worker's pick may take it (EADDRINUSE, seen with concurrent launcher runs). In a band of
# its own, below the ephemeral range, only this worker picks and nothing connects from it.
PORT_BAND = 1500


def wait_for_file(proc, path, seconds: float) -> bool:
    """Poll until ``path`` exists, ``proc`` (a Popen) exits or ``seconds`` pass; True while ``proc`` still
    runs (the crash tests kill it then: a process that already exited, or a deadline, kills nothing)."""
    deadline = time.time() + seconds
    while not path.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return proc.poll() is None


def launch_trainer(stage, out, *sets: str, nproc: int = 2):
    """``lvita.train`` on ``stage`` under DeepSpeed's launcher (``nproc`` CPU ranks, OMP 1 thread as run_world's
    processes, so the same arithmetic), ``output_dir=out`` and ``--set`` each of ``sets``; a Popen in its own
    process group (:func:`sigkill_after` reaches every rank), output merged into stdout."""
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
           str(free_port()), "--module", "lvita.train", "--stage", str(stage), "--set", f"output_dir={out}"]
    for item in sets:
        cmd += ["--set", item]
    return subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def sigkill_after(proc, path, seconds: float = 400) -> str:
    """Wait for ``path`` (a checkpoint's manifest), then SIGKILL ``proc``'s whole process group (a launcher and its
    ranks, started with ``start_new_session``); -> its output. Fails when ``proc`` ended or ``path`` never came."""
    import signal

    alive = wait_for_file(proc, path, seconds)
    os.killpg(proc.pid, signal.SIGKILL)
    text, _ = proc.communicate(timeout=60)
    assert alive and path.is_file(), text[-4000:]
    return text


def newest_step(ckpt_dir) -> int:
    """The step of the newest complete checkpoint: the one resume takes (``latest`` may lag it after a kill)."""
    from lvita.ckpt.checkpoint import complete_tags

    return int(complete_tags(ckpt_dir)[-1].removeprefix("global_step"))


def free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    low = 20000 + (int(worker) % 8 if worker.isdigit() else 0) * PORT_BAND
    rng = random.Random(os.getpid() * 1_000_003 + time.monotonic_ns())
    for _ in range(100):
        port = rng.randrange(low, low + PORT_BAND)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use, or a listener of an earlier test in TIME_WAIT
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + PORT_BAND - 1} after 100 tries")

# torch CPU threads per test process: 1 (two xdist workers on two cores); LVITA_TEST_THREADS=2 reruns the
# suite with other reduction splits, to find tolerances that hold on one machine only (tests/README.md)
THREADS = os.environ.get("LVITA_TEST_THREADS", "1")


_PRELOAD = ["tests._preload"]


def _context():
    if torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (first call)
    return ctx


def _entry(rank, world, port, fn, args, queue, env, cwd):
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=THREADS)
    import torch

    torch.set_num_threads(int(THREADS))
    try:
        buf = io.BytesIO()
        torch.save(fn(rank, *args), buf)  # bytes, not shared-memory tensors: the process exits
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(fn, world: int, *args, timeout: float = 600):
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    env, cwd = dict(os.environ), os.getcwd()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue, env, cwd)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                break
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed run failed\n" + "\n".join(errors))
    leaked = sorted(glob.glob(f"/dev/shm/*_{port}_*"))  # DeepSpeed's CPU shm buffers fill memory
    for path in leaked:
        os.unlink(path)
    assert not leaked, f"the run left shared memory behind: {leaked}"
    return [results[r] for r in range(world)]


def _command_entry(argv, out_path, err_path, env, cwd):
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):  # the fds themselves: C-level writes land too
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    import sys

    from lvita.cli import main

    sys.argv = ["lvita", *argv]
    sys.exit(main(argv))


def run_command(argv: list[str], tmp_dir, timeout: float = 300) -> tuple[int, str, str]:
    """``lvita ARGV`` in a fresh process from the same server (so without its imports):
    (exit status, stdout, stderr). An uncaught exception exits 1 with its traceback on stderr, as
    the console script would."""
    ctx = _context()
    out, err = (os.path.join(tmp_dir, f"{os.getpid()}.{n}") for n in ("out", "err"))
    proc = ctx.Process(target=_command_entry, args=(list(argv), out, err, dict(os.environ), os.getcwd()))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        raise AssertionError(f"lvita {' '.join(argv)}: still running after {timeout}s")
    with open(out) as o, open(err) as e:
        return proc.exitcode, o.read(), e.read()
