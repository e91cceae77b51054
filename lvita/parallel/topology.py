"""The process grid: pipeline x data x sequence, and the one place process groups are created.

DeepSpeed's pipeline engine knows only a pipe axis and a data axis. Sequence-parallel ranks are
folded into its data axis (size data x sequence): for pipeline stage p the data axis holds ranks
``p*D .. p*D+D-1`` (D = data x sequence), and each run of ``sequence`` consecutive ranks in it is
one sequence-parallel group that works on the same samples. DeepSpeed therefore averages
gradients over data x sequence ranks; the loss scale multiplies by the sequence degree to undo
the extra averaging (see lvita.parallel.sequence).

    init_distributed()                                      # the default group, once per process
    topo = build_topology(pipeline=2, ulysses=2, ring=1)
    PipelineModule(..., topology=topo.deepspeed)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology


def init_distributed() -> None:
    """Join the default process group through DeepSpeed (nccl on GPU, gloo on CPU).

    On CPU, DeepSpeed also JIT-builds a shared-memory all-reduce op whose buffers
    (/dev/shm/deepspeed_allreduce_buffer_*, about 64 MB per rank) are never unlinked: every run
    leaked them until /dev/shm filled memory and the OOM killer ended the test suite. Training only
    uses gloo collectives there, so that op is switched off before DeepSpeed can build it.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(verbose=False)


@dataclass
class Topology:
    pipeline: int
    data: int  # true data-parallel degree (distinct samples)
    ulysses: int
    ring: int
    deepspeed: PipeDataParallelTopology  # pipe x (data * sequence), for PipelineModule
    sequence_group: object | None  # this rank's sequence-parallel group (None when degree 1)
    sequence_rank: int
    data_rank: int  # which slice of the global batch this rank's group trains on

    @property
    def sequence(self) -> int:
        return self.ulysses * self.ring


def build_topology(pipeline: int, ulysses: int = 1, ring: int = 1) -> Topology:
    """Collective: every rank must call it (every rank takes part in creating every group)."""
    if ring > 1:
        raise NotImplementedError("parallel.ring > 1: ring attention is not available yet; use parallel.ulysses")
    world, rank = dist.get_world_size(), dist.get_rank()
    sp = ulysses * ring
    if world % (pipeline * sp):
        raise ValueError(f"world {world} is not divisible by pipeline {pipeline} x sequence {sp}")
    width = world // pipeline  # DeepSpeed's data axis
    ds_topo = PipeDataParallelTopology(num_pp=pipeline, num_dp=width)
    own = None
    for p in range(pipeline):
        for g in range(width // sp):
            ranks = [p * width + g * sp + i for i in range(sp)]
            group = dist.new_group(ranks) if sp > 1 else None
            if rank in ranks:
                own = group
    coord = ds_topo.get_coord(rank)
    return Topology(pipeline, width // sp, ulysses, ring, ds_topo, own, coord.data % sp, coord.data // sp)
