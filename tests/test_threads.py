"""CPU threads per process: the cores are split between a node's local ranks, on GPU nodes too,
unless the user set OMP_NUM_THREADS; the choice is logged (lvita.training.loop.cpu_threads)."""
from __future__ import annotations

import torch

from lvita.training import loop
from lvita.training.loop import cpu_threads


def test_cores_are_split_per_local_rank_on_gpu_and_cpu_nodes():
    for cuda in (True, False):
        n, why = cpu_threads(96, 8, {}, cuda)
        assert n == 12 and "96 cores / 8 local" in why and ("GPU node" in why) == cuda
    assert cpu_threads(2, 4, {}, True)[0] == 1  # never 0
    assert cpu_threads(16, 0, {}, True)[0] == 16


def test_omp_num_threads_set_by_the_user_wins():
    n, why = cpu_threads(96, 8, {"OMP_NUM_THREADS": "3"}, True)
    assert n is None and "OMP_NUM_THREADS=3" in why


def test_training_applies_and_logs_the_split_with_cuda(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loop.os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "4")
    lines = []
    try:
        torch.set_num_threads(1)
        loop._share_cpu_threads(lines.append)
        assert torch.get_num_threads() == 2
        assert lines == ["[threads] 2 torch CPU thread(s) per process: 8 cores / 4 local process(es) on a GPU "
                         "node; set OMP_NUM_THREADS to choose otherwise"]
    finally:
        torch.set_num_threads(before)
