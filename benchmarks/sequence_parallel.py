"""Ulysses sequence parallelism at a fixed total sequence length: step time and activation memory
per rank for sp = 1, 2, 4, side by side in one run (CPU, gloo, one process per rank).

    python benchmarks/sequence_parallel.py [--length 4096] [--preset tiny] [--steps 3]

Each configuration runs forward + backward of the whole decoder (tiny preset, one packed sequence
with reset position ids) on its shard. "activation MB" is the size of every tensor autograd saves
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

from lvita.train import free_port


def _worker(rank, sp, port, length, preset, steps, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(sp))
    import torch.distributed as dist

    from lvita.model.attention import set_attention
    from lvita.model.longvita import LongVita
    from lvita.parallel.topology import init_distributed
    from lvita.parallel.ulysses import UlyssesAttention

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // sp))
    init_distributed()
    model = LongVita(preset, image_token_id=5, seed=0)
    if sp > 1:
        set_attention(model, UlyssesAttention(dist.group.WORLD, sp))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (1, length), generator=g)
    pos = torch.cat([torch.arange(n) for n in (length // 4, length // 4, length // 2)]).unsqueeze(0)
    n = length // sp
    ids, pos = ids[:, rank * n:(rank + 1) * n], pos[:, rank * n:(rank + 1) * n]
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


def measure(sp: int, length: int, preset: str, steps: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, sp, port, length, preset, steps, queue))
             for port in [free_port()] for r in range(sp)]
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
    rows = {sp: measure(sp, args.length, args.preset, args.steps) for sp in (1, 2, 4)}
    base_t, base_m = rows[1]
    print(f"{args.length} tokens, preset {args.preset}")
    print(f"{'sp':>3s} {'step s':>8s} {'activation MB/rank':>19s} {'time ratio':>11s} {'memory ratio':>13s}")
    for sp, (t, m) in rows.items():
        print(f"{sp:3d} {t:8.3f} {m:19.1f} {t / base_t:11.2f} {m / base_m:13.3f}")


if __name__ == "__main__":
    main()
