"""``deepspeed`` for schedulers: the same launcher, but a SIGTERM/SIGUSR1 ends the run cleanly.

    python -m lvita.launch --num_gpus 8 --module lvita.train --stage FILE      # any deepspeed arguments

Runs DeepSpeed's own runner (``deepspeed.launcher.runner.main``) in this process with one change:
SIGTERM and SIGUSR1 are passed on to the training ranks (the processes below DeepSpeed's ``launch``)
instead of ending the runner. The ranks finish their step, save and exit 0 (lvita.training.stopping), so
``launch`` and this process exit 0 once the checkpoint is complete: a batch script that ``wait``s for
it waits for the save. Plain ``deepspeed`` dies of the signal at once (it installs no handler for a
local run); its ranks still save and exit (they notice the runner is gone), but nothing waits for them.

Trade-off: for a launch that reaches other nodes by pdsh, DeepSpeed's runner installs its own
handler (it kills the remote processes); start one launcher per node instead (``--no_ssh
--node_rank N``, as Slurm and Kubernetes set-ups do), each wrapped by this module.
"""
from __future__ import annotations

import os
import signal
import sys

import psutil

from lvita.training.stopping import SIGNALS


def _forward(signum, frame) -> None:
    me = os.getpid()
    try:
        ranks = [p for p in psutil.Process(me).children(recursive=True) if p.ppid() != me]
    except psutil.Error:
        ranks = []
    for p in ranks:
        try:
            p.send_signal(signum)
        except psutil.Error:
            pass
    os.write(2, f"lvita.launch: {signal.Signals(signum).name}: passed to {len(ranks)} training processes; "
                f"they finish their step, save and exit\n".encode())


def main(argv=None) -> int:
    from deepspeed.launcher import runner

    for sig in SIGNALS:  # (no siginterrupt(False): the handler must run while the runner waits)
        signal.signal(sig, _forward)
    runner.main(argv)  # exits with the ranks' status when it is not 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
