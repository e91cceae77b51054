"""The process grid: pipeline x data x sequence, and the one place process groups are created.

DeepSpeed's pipeline engine knows only a pipe axis and a data axis. Sequence-parallel ranks are
folded into its data axis (size data x sequence): for pipeline stage p the data axis holds ranks
``p*D .. p*D+D-1`` (D = data x sequence), and each run of ``sequence`` consecutive ranks in it is
one sequence-parallel group that works on the same samples. DeepSpeed therefore averages
gradients over data x sequence ranks; the loss scale multiplies by the sequence degree to undo
the extra averaging (see lvita.parallel.sequence). Inside a sequence group, with ring > 1,
Ulysses groups are runs of ``ulysses`` consecutive ranks (the all-to-all stays within a node
when ulysses <= GPUs per node) and ring groups take one rank of each (yunchang's
``use_ulysses_low`` layout).

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
    sequence_rank: int  # = ring_rank * ulysses + ulysses_rank
    data_rank: int  # which slice of the global batch this rank's group trains on
    ulysses_group: object | None = None  # consecutive ranks of the sequence group (ring > 1 only)
    ring_group: object | None = None  # ranks of the sequence group ``ulysses`` apart (ring > 1 only)

    @property
    def sequence(self) -> int:
        return self.ulysses * self.ring


def build_topology(pipeline: int, ulysses: int = 1, ring: int = 1) -> Topology:
    """Collective: every rank must call it (every rank takes part in creating every group).

    With ring > 1 the Ulysses and ring subgroups are also handed to yunchang (its process groups
    are a module-level singleton read when ``LongContextAttention`` is built)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sp = ulysses * ring
    if world % (pipeline * sp):
        raise ValueError(f"world {world} is not divisible by pipeline {pipeline} x sequence {sp}")
    width = world // pipeline  # DeepSpeed's data axis
    ds_topo = PipeDataParallelTopology(num_pp=pipeline, num_dp=width)
    own = own_ulysses = own_ring = None
    for p in range(pipeline):
        for g in range(width // sp):
            ranks = [p * width + g * sp + i for i in range(sp)]
            group = dist.new_group(ranks) if sp > 1 else None
            if rank in ranks:
                own = group
            if ring == 1:
                continue
            for j in range(ring):  # Ulysses groups: runs of ``ulysses`` consecutive ranks
                sub = ranks[j * ulysses:(j + 1) * ulysses]
                group = dist.new_group(sub)
                own_ulysses = group if rank in sub else own_ulysses
            for u in range(ulysses):  # ring groups: one rank of each Ulysses group
                sub = ranks[u::ulysses]
                group = dist.new_group(sub)
                own_ring = group if rank in sub else own_ring
    if ring > 1:
        from yunchang.globals import PROCESS_GROUP

        from lvita.parallel.internals import check

        check(PROCESS_GROUP, "yunchang_groups", "yunchang's process groups")  # set, not silently added
        PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = own_ulysses, own_ring
    coord = ds_topo.get_coord(rank)
    return Topology(pipeline, width // sp, ulysses, ring, ds_topo, own, coord.data % sp, coord.data // sp,
                    own_ulysses, own_ring)
