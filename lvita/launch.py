"""``deepspeed`` for schedulers: the same launcher, but a signal stop ends in exit 0 on every route.

    python -m lvita.launch --num_gpus 8 --module lvita.train --stage FILE      # any deepspeed arguments

Runs DeepSpeed's own runner (``deepspeed.launcher.runner.main``) in this process with three changes:

- SIGTERM and SIGUSR1 to this process are passed on to the training ranks (the processes below
  DeepSpeed's ``launch``) instead of ending the runner; SIGINT (Ctrl-C) is passed on as SIGTERM
  (the terminal's Ctrl-C reaches the ranks themselves, and a rank quits at once on its second SIGINT).
  A signal before the ranks exist ends the start instead (nothing to save; a non-zero status). The ranks finish their step, save and exit 0
  (lvita.training.stopping), so ``launch`` and this process exit 0 once the checkpoint is complete:
  a batch script that ``wait``s for it waits for the save.
- When DeepSpeed's ``launch`` exits non-zero, the ranks' own word decides: each rank of this node
  notes a completed stop (its step, reason and checkpoint) in a folder this process makes
  (``LVITA_STOP_RECORD``) after its save and closing, just before it exits 0. With a note from every
  rank of the node (``LOCAL_SIZE``), all for one checkpoint whose manifest checks out, this process
  exits 0 and says so. That is the route where a scheduler signals every process of the job
  (``scancel``, ``scancel --full``, preemption): ``launch`` then gets the SIGTERM too, waits for the
  ranks (30 s, then SIGKILL) and exits 1 whatever they did. Without such notes (a rank crashed, was
  killed, or SIGKILLed during the save) the launcher's non-zero status stays.
- This process is the ranks' subreaper (Linux ``PR_SET_CHILD_SUBREAPER``): when ``launch`` dies of
  a signal it does not handle (SIGUSR1 sent to every process, SIGKILL), the ranks, which notice and
  save, become its children; it waits for them and counts their exit statuses, instead of returning
  while they still save (DeepSpeed's runner treats a launch killed by a signal as success).

Plain ``deepspeed`` dies of the signal at once (it installs no handler for a local run); its ranks
still save and exit (they notice the runner is gone), but nothing waits for them and its status is
143 (SIGTERM), 138 (SIGUSR1) or, when the signal reaches ``launch`` as well, still 143 (README:
"Running under a scheduler").

Trade-off: for a launch that reaches other nodes by pdsh, DeepSpeed's runner installs its own
handler (it kills the remote processes) and remote ranks note nothing here; start one launcher per
node instead (``--no_ssh --node_rank N``, as Slurm and Kubernetes set-ups do), each wrapped by this
module.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from lvita.training.stopping import RECORD_ENV, SIGNALS

_launchers: list[subprocess.Popen] = []  # what DeepSpeed's runner started: its ``launch`` first
_signalled: list[str] = []
_ranks: set[int] = set()  # launch's children (the ranks) as seen while it lived


class _Recording:
    """``subprocess`` for DeepSpeed's runner, with Popen noted (the runner drops launch's status
    when it died of a signal)."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802 (subprocess's name)
        p = subprocess.Popen(*args, **kwargs)
        _launchers.append(p)
        if len(_launchers) == 1:
            threading.Thread(target=_note_ranks, args=(p,), name="lvita-launch-ranks", daemon=True).start()
        return p


def _note_ranks(launch: subprocess.Popen) -> None:
    """The ranks are ``launch``'s children: note their pids while it lives (once a second)."""
    while launch.poll() is None:
        try:
            _ranks.update(c.pid for c in psutil.Process(launch.pid).children())
        except psutil.Error:
            pass
        time.sleep(1)


def _forward(signum, frame) -> None:
    if not _launchers:  # nothing started yet, nothing to save: end here, as without this handler
        os.write(2, f"lvita.launch: {signal.Signals(signum).name} before the launch: exiting\n".encode())
        raise SystemExit(128 + signum)
    _signalled.append(signal.Signals(signum).name)
    launchers = {p.pid for p in _launchers}
    try:
        ranks = [p for p in psutil.Process().children(recursive=True) if p.pid not in launchers]
    except psutil.Error:
        ranks = []
    passed = signal.SIGTERM if signum == signal.SIGINT else signum  # a rank quits at its 2nd SIGINT: Ctrl-C
    for p in ranks:  # reached the ranks too (one process group); this one only asks them to stop
        try:
            p.send_signal(passed)
        except psutil.Error:
            pass
    if not ranks:  # launch has not started them yet: nothing to save, end the start (launch exits 1)
        os.write(2, f"lvita.launch: {signal.Signals(signum).name} before the ranks started: ending the "
                    f"launch\n".encode())
        try:
            _launchers[0].send_signal(signal.SIGTERM)
        except OSError:
            pass
        return
    os.write(2, f"lvita.launch: {signal.Signals(signum).name}: passed to {len(ranks)} training processes"
                f"{' as SIGTERM' if passed != signum else ''}; "
                f"they finish their step, save and exit\n".encode())


def _subreaper() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):  # not Linux: orphaned ranks go to init, as with deepspeed
        pass


def _reap_orphans() -> dict[int, int]:
    """Wait for the ranks that came to this process when ``launch`` died: {pid: exit status}.
    (Other orphans, such as a rank's own helpers, are not waited for.)"""
    statuses = {}
    for pid in sorted(_ranks):
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped by launch, as usual
            continue
        statuses[pid] = os.waitstatus_to_exitcode(status)
    return statuses


def _status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code if code >= 0 else 128 - code  # died of signal N: the shell's 128 + N
    print(code, file=sys.stderr)
    return 1


def clean_stop(folder: Path, orphans: dict[int, int]) -> tuple[bool, str]:
    """Whether every rank of this node noted a completed stop for one complete checkpoint (and those
    that came to this process exited 0): (verdict, what was found)."""
    from lvita.ckpt.checkpoint import read_manifest
    from lvita.errors import UserError

    notes = []
    for f in sorted(folder.glob("rank*.json")):
        try:
            notes.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            return False, f"unreadable stop note {f.name}"
    if not notes:
        return False, "no rank noted a completed stop"
    size = notes[0]["local_size"]
    local = sorted(n["local_rank"] for n in notes)
    if local != list(range(size)):
        return False, f"{len(notes)} of {size} ranks of this node noted a completed stop"
    tags = {n["checkpoint"] for n in notes}
    if len(tags) != 1:
        return False, f"the ranks noted different checkpoints: {sorted(tags)}"
    bad = {n["rank"]: orphans[n["pid"]] for n in notes if orphans.get(n["pid"], 0) != 0}
    if bad:
        return False, f"ranks exited non-zero after their stop: {bad}"
    (tag,) = tags
    try:
        read_manifest(Path(tag))
    except UserError as e:
        return False, str(e)
    reasons = sorted({n["reason"] for n in notes})
    return True, f"all {size} ranks of this node saved {tag} (stopped on {', '.join(reasons)}) and exited"


def main(argv=None) -> int:
    from deepspeed.launcher import runner

    folder = Path(tempfile.mkdtemp(prefix="lvita-launch-"))
    os.environ[RECORD_ENV] = str(folder)  # the runner passes its environment down to launch and the ranks
    _subreaper()
    runner.subprocess = _Recording()
    for sig in SIGNALS:  # (no siginterrupt(False): the handler must run while the runner waits)
        signal.signal(sig, _forward)
    try:
        try:
            runner.main(argv)  # exits with launch's status when it is above 0
            code = 0
        except SystemExit as e:
            code = _status(e.code)
        if _launchers and _launchers[0].returncode is not None and _launchers[0].returncode < 0:
            code = code or _status(_launchers[0].returncode)  # launch died of a signal: not a success
        orphans = _reap_orphans()
        if any(orphans.values()) and code == 0:
            code = 1
        if code != 0 and _launchers:
            ok, found = clean_stop(folder, orphans)
            via = f" after {', '.join(dict.fromkeys(_signalled))} here" if _signalled else ""
            if ok:
                print(f"lvita.launch: DeepSpeed's launcher ended with status {code}{via}; {found} cleanly: "
                      f"exit 0", file=sys.stderr, flush=True)
                code = 0
            elif _signalled or any(folder.glob("rank*.json")):
                print(f"lvita.launch: DeepSpeed's launcher ended with status {code}{via}; not a clean stop "
                      f"({found}): exit {code}", file=sys.stderr, flush=True)
        return code
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
