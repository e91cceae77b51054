"""Stopping a run on purpose: signals, a launcher that went away, and ``train.time_limit``.

Owns *when* every rank stops early and that they all stop at the same step. lvita.train makes one
:class:`Stopper` per run; after each optimizer step it calls :meth:`Stopper.agree`, which every rank
must call (one all-reduce MAX of two integers over the world: the stop reason, and whether any
rank's optimizer skipped the step, for lvita.training.guard):

    stopper = Stopper(time_limit_s, log)          # installs SIGTERM/SIGUSR1/SIGINT handlers in this rank
    for step in ...:
        engine.train_batch(...)
        reason, skipped = stopper.agree(step_time, skipped)  # the same on every rank
        if reason: save through lvita.ckpt.checkpoint, print stopper.message(...), return (exit 0)
    stopper.close()                               # handlers back (after a stop: signals ignored)

A rank asks to stop when

- it receives SIGTERM (what Slurm, Kubernetes and most schedulers send before taking the machines),
  SIGUSR1 (Slurm's ``--signal=USR1@<seconds>`` ahead of the time limit) or SIGINT (Ctrl-C; a second
  SIGINT ends the process at once without saving, even inside a collective);
- its DeepSpeed launcher went away: DeepSpeed's runner (``deepspeed ...``) installs no signal
  handler for a local run, so a SIGTERM ends it at once and leaves its ``launch`` child and the ranks
  running with parent 1. Each rank therefore remembers its parent (``launch``) and that process's
  parent (the runner) and asks to stop when either changes (a SIGKILL of ``launch`` included);
  a rank not started by DeepSpeed's launch (``python -m lvita.train``, nohup) does not watch;
- ``train.time_limit`` would pass before the next step and the save end: the next step is predicted
  by the longest step so far and the save by the longest save so far (before any: one step).

Handlers are installed just before the first step: a signal during start-up (model build, resume,
universal conversion) ends the process at once, with nothing new to save. After that a handler
only sets a flag: the step in progress finishes, then the ranks agree at its end, so every rank
saves the same step through the normal crash-safe path. Signals that arrive while
stopping (a scheduler or ``launch`` repeating SIGTERM during the save) are noted and otherwise
ignored: the save completes, and if a SIGKILL ends it first, the previous complete checkpoint stays
``latest`` (lvita.ckpt.checkpoint writes the manifest and ``latest`` last).

Trade-offs: the launcher is polled once per step (two reads of /proc), so a rank notices a vanished
runner only at the end of its current step; the runner itself dies of the signal (exit 143 or 138)
since it is DeepSpeed's code; ``python -m lvita.launch`` (a drop-in for ``deepspeed``) forwards the
signal to the ranks instead and exits 0 after their save. The time limit is counted from this
process's start, so each requeued run gets the whole allocation again; it never stops a run before
its first step, so every requeue makes progress.

After the stop's save and the run's closing each rank notes its clean stop for ``python -m
lvita.launch`` (:func:`record_stop`): DeepSpeed's ``launch`` exits 1 when it is signalled too
(``scancel``), and those notes let the wrapper report the clean save as exit 0 all the same.
"""
from __future__ import annotations

import os
import signal
import time

import psutil

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C (a second one quits at once)
REASONS = {1: "signal", 2: "launcher gone", 3: "time limit"}
LAUNCH_MODULE = "deepspeed.launcher.launch"
RECORD_ENV = "LVITA_STOP_RECORD"  # a folder lvita.launch makes: each rank of its node records its clean stop there


def record_stop(step: int, reason: str, tag_dir) -> None:
    """After a stop's save and the run's closing, just before the rank exits 0: note it in the
    folder ``LVITA_STOP_RECORD`` names (set by lvita.launch; nothing without it). lvita.launch reads
    these notes when DeepSpeed's launcher exits non-zero after a signal (its own SIGTERM handler
    exits 1 once the ranks are gone): a note from every rank of the node, for one complete
    checkpoint, turns that status into 0."""
    folder = os.environ.get(RECORD_ENV)
    if not folder:
        return
    import json

    note = {"rank": int(os.environ.get("RANK", "0")), "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
            "local_size": int(os.environ.get("LOCAL_SIZE", "1")), "pid": os.getpid(), "step": step,
            "reason": reason, "checkpoint": str(tag_dir)}
    path = os.path.join(folder, f"rank{note['rank']}.json")
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(note, f)
        os.replace(path + ".tmp", path)
    except OSError as e:  # lvita.launch is gone with its folder: it then reports nothing anyway
        os.write(2, f"lvita.train: could not record the stop in {folder}: {e}\n".encode())


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):
        return []


class Stopper:
    def __init__(self, time_limit_s: float | None = None, log=lambda *a: None, install: bool = True):
        self.time_limit_s, self.log = time_limit_s, log
        try:
            self.started = psutil.Process().create_time()  # the process's start: imports count too
        except (psutil.Error, OSError):
            self.started = time.time()
        self.signal_name: str | None = None
        self._repeated = False
        self.stopping = False
        self.longest_step = 0.0
        self.longest_save = 0.0
        self._previous = {}
        # under DeepSpeed's launch: watch it and its parent (the runner); a rank started otherwise
        # (``python -m lvita.train``, nohup, tests) does not care who its parent is
        self.parent = os.getppid()
        self.grandparent = None
        self.siblings: list[psutil.Process] = []  # the other ranks launch started on this node
        if any(LAUNCH_MODULE in part for part in _cmdline(self.parent)):
            try:
                launch = psutil.Process(self.parent)
                self.grandparent = launch.ppid()
                self.siblings = [p for p in launch.children() if p.pid != os.getpid()]
            except (psutil.Error, OSError):
                self.grandparent = -1  # launch is already gone
        self._wakeup = None
        self._sigints = 0  # counted by the watching thread: the second Ctrl-C ends the process
        if install:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
                signal.siginterrupt(sig, False)  # restart system calls (gloo/NCCL sockets, file writes)
            self._watch_signals()

    # -- local state --------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stopping or self.signal_name:
            if not self._repeated:  # os.write: no re-entrant print if the signal lands inside one
                os.write(2, f"lvita.train: {name} again while stopping (pid {os.getpid()}): ignored; this rank "
                            f"saves and exits after its current step\n".encode())
            self._repeated = True
            return
        self.signal_name = name

    def _watch_signals(self) -> None:
        """A thread learns of every signal at once through Python's wakeup fd, even while the main
        thread is blocked in a collective (where the Python handler waits). It only acts when a
        rank of this node has died and the run is not stopping: then DeepSpeed's launch is ending
        the survivors (SIGTERM, SIGKILL 30 s later), no collective save is possible, and this rank
        exits at once, as it did before lvita handled SIGTERM."""
        import socket
        import threading

        r, w = socket.socketpair()
        w.setblocking(False)
        try:
            self._wakeup = (signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False), r, w)
        except ValueError:  # not the main thread
            r.close(), w.close()
            return

        def watch():
            while True:
                try:
                    data = r.recv(64)
                except OSError:
                    data = b""
                if not data:
                    r.close()
                    return
                hit = [b for b in data if b in SIGNALS]
                for _ in range(hit.count(signal.SIGINT)):
                    self._sigints += 1
                    if self._sigints == 1 and os.environ.get("RANK", "0") in ("", "0"):
                        os.write(2, b"lvita.train: SIGINT: stopping after this step with a checkpoint; "
                                    b"Ctrl-C again quits at once without saving\n")
                    if self._sigints == 2:
                        os.write(2, f"lvita.train: SIGINT again: exiting at once without saving (pid "
                                    f"{os.getpid()})\n".encode())
                        os._exit(128 + signal.SIGINT)
                if hit and not self.stopping and self.sibling_lost():
                    os.write(2, f"lvita.train: {signal.Signals(hit[0]).name} after another rank of this node died; "
                                f"exiting at once (pid {os.getpid()})\n".encode())
                    os._exit(128 + hit[0])

        threading.Thread(target=watch, name="lvita-signal-watch", daemon=True).start()

    def sibling_lost(self) -> bool:
        for p in self.siblings:
            try:
                if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
                    return True
            except psutil.Error:
                return True
        return False

    def launcher_gone(self) -> bool:
        if self.grandparent is None:
            return False
        if os.getppid() != self.parent:
            return True
        try:
            return psutil.Process(self.parent).ppid() != self.grandparent
        except (psutil.Error, OSError):
            return True

    def local_reason(self) -> int:
        if self.signal_name:
            return 1
        if self.launcher_gone():
            return 2
        if self.time_limit_s is not None:
            ahead = self.longest_step + (self.longest_save or self.longest_step)
            if time.time() - self.started + ahead >= self.time_limit_s:
                return 3
        return 0

    # -- collective ---------------------------------------------------------------------------------

    def agree(self, step_time: float, skipped: bool = False, group=None) -> tuple[str | None, bool]:
        """Collective (the world, or ``group``): the stop reason every rank agrees on (or None), and
        whether any rank's optimizer skipped the step (lvita.training.guard), in one all-reduce MAX."""
        import torch
        import torch.distributed as dist

        self.longest_step = max(self.longest_step, step_time)
        code, skipped = self.local_reason(), int(skipped)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            from deepspeed.accelerator import get_accelerator

            t = torch.tensor([code, skipped], dtype=torch.int32, device=get_accelerator().current_device_name())
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            code, skipped = (int(v) for v in t.tolist())
        if not code:
            return None, bool(skipped)
        self.stopping = True
        if code == 1:
            return (f"signal {self.signal_name}" if self.signal_name else "a signal to another rank"), bool(skipped)
        return REASONS[code], bool(skipped)

    def saved(self, seconds: float) -> None:
        self.longest_save = max(self.longest_save, seconds)

    def message(self, reason: str, step: int, total: int, tag_dir) -> str:
        limit = f" (train.time_limit: {self.time_limit_s:.0f}s from the start)" if reason == "time limit" else ""
        return (f"lvita.train: stopped at step {step} of {total} on {reason}{limit}; saved {tag_dir}; run the same "
                f"command again to continue from it (resume=auto)")

    def close(self) -> None:
        """Put the previous handlers back, unless the run is stopping: then the process ignores
        SIGTERM/SIGUSR1/SIGINT until it exits (the scheduler repeating itself must not turn the clean exit
        into death by signal; Python keeps an ignored signal ignored through its shutdown, where it
        would reset a Python handler to the default)."""
        if self.stopping and self._previous:
            for sig in self._previous:
                signal.signal(sig, signal.SIG_IGN)
            self._previous = {}
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        if self._wakeup:
            old, r, w = self._wakeup
            signal.set_wakeup_fd(old)
            w.close()  # the watching thread reads EOF and ends
            self._wakeup = None


def say(text: str) -> None:
    """Print a line that must not fail when the terminal or the launcher's pipe is gone."""
    try:
        print(text, flush=True)
    except (BrokenPipeError, OSError):
        pass
