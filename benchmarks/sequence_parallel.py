"""Sequence parallelism at a fixed total sequence length: step time and activation memory per rank
for Ulysses 2/4, zigzag ring 2/4 and hybrid Ulysses 2 x ring 2 against one process, side by side
in one run (CPU, gloo, one process per rank).

    python benchmarks/sequence_parallel.py [--length 4096] [--preset tiny] [--steps 3]

Each configuration runs forward + backward of the whole decoder (tiny preset, one causal
sequence with position ids 0..L-1, as in stages 3-4) on its shard. "activation MB" is the size of every tensor autograd saves
for backward on one rank (measured with saved-tensor hooks: exact and deterministic, unlike RSS);
it should fall close to 1/sp. Times are CPU wall times with 2 cores shared by all ranks, so read
the ratios, not the absolute numbers; GPU figures for the longvita-1.5b preset are still owed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.multiprocessing as mp

from lvita.training.loop import free_port


def _worker(rank, ulysses, ring, port, length, preset, steps, queue):
    sp = ulysses * ring
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(sp))
    import torch.distributed as dist

    from lvita.model.attention import set_attention
    from lvita.model.longvita import LongVita
    from lvita.parallel.hybrid import sequence_attention
    from lvita.parallel.sequence import shard_indices
    from lvita.parallel.topology import build_topology, init_distributed

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // sp))
    init_distributed()
    topo = build_topology(1, ulysses, ring)
    model = LongVita(preset, image_token_id=5, seed=0)
    if ulysses * ring > 1:
        set_attention(model, sequence_attention(topo))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (1, length), generator=g)
    pos = torch.arange(length).unsqueeze(0)  # one causal sequence (stages 3-4)
    idx = shard_indices(length, topo.sequence_rank, ulysses, ring)
    ids, pos = ids[:, idx], pos[:, idx]
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    times, act = [], 0
    for _ in range(steps):
        saved.clear()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = model.embed(ids, torch.zeros(0, 3, 112, 112))
            for layer in model.layers:
                h = layer(h, pos)
            loss = model.head(h).float().pow(2).mean()
        loss.backward()
        times.append(time.perf_counter() - t0)
        act = sum(saved)
    dist.barrier()
    if rank == 0:
        queue.put((statistics.median(times[1:] or times), act / 2**20))
    dist.destroy_process_group()


def measure(ulysses: int, ring: int, length: int, preset: str, steps: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, ulysses, ring, port, length, preset, steps, queue))
             for port in [free_port()] for r in range(ulysses * ring)]
    for p in procs:
        p.start()
    result = queue.get(timeout=1800)
    for p in procs:
        p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    layouts = [(1, 1), (2, 1), (4, 1), (1, 2), (1, 4), (2, 2)]  # (ulysses, ring)
    rows = {lay: measure(*lay, args.length, args.preset, args.steps) for lay in layouts}
    base_t, base_m = rows[(1, 1)]
    print(f"{args.length} tokens, preset {args.preset}")
    print(f"{'layout':>18s} {'sp':>3s} {'step s':>8s} {'activation MB/rank':>19s} {'time ratio':>11s} "
          f"{'memory ratio':>13s}")
    for (u, r), (t, m) in rows.items():
        name = "single process" if u * r == 1 else " x ".join(
            x for x in (f"ulysses {u}" if u > 1 else "", f"ring {r}" if r > 1 else "") if x)
        print(f"{name:>18s} {u * r:3d} {t:8.3f} {m:19.1f} {t / base_t:11.2f} {m / base_m:13.3f}")


if __name__ == "__main__":
    main()
