"""Logits-masked LM head: prefill memory and time with the full head vs the last position only
(Long-VITA section 3.4, Table 4), and the training loss's memory with chunked vs full logits.

    python benchmarks/lm_head.py [--lengths 1024 2048 4096 8192 16384] [--repeats 3] [--train-length 4096]
    python benchmarks/lm_head.py --preset longvita-1.5b --device cuda --lengths 8192 32768 65536
    python benchmarks/lm_head.py --preset longvita-1.5b --device cuda --find-max

Prefill (``torch.no_grad``) runs the embeddings and every decoder layer on one
causal text sequence, then either the full head (``lm_head`` over all S positions: (S, vocab)
fp32 logits, then the last row) or the logits-masked head (``lm_head`` over the last position
only, what :mod:`lvita.generate` does). The training rows run loss + backward of the whole model
at ``--train-length`` (half the positions labelled) with ``model.logits_chunk`` 0 (logits for every
position), the previous lvita loss (all labelled rows' logits at once, kept by autograd) and the
chunked loss at two chunk sizes.

Every configuration runs in a fresh subprocess. Memory: on CUDA, ``torch.cuda.max_memory_allocated``
minus what was allocated before the run (exact); on CPU, the peak resident set during the run
(VmHWM, reset through /proc/self/clear_refs) minus the resident set before it: the real memory the
run took, allocator overhead included (large tensors are mmapped and returned on free). Time:
median of ``--repeats`` runs after one warm-up, one torch thread by default (``--threads``: with 2
OpenMP threads on a 2-core machine that other jobs share, every op waits on the slower thread and
times swing 10x). ``--find-max`` doubles the prompt length for each
head until it fails (CUDA out of memory; on CPU, an address-space limit of ``--cpu-limit-gb``),
then bisects ``--refine`` times between the last success and the first failure.

Default preset ``tiny-vocab152k``: the ``tiny`` preset with Qwen2.5's 151,936-token vocabulary,
defined here at run time (not in presets.py) so the head has realistic size on a CPU. Its decoder
is tiny (hidden 160), so the head dominates its prefill FLOPs and the time ratio overstates what a
real model gains; the memory of the logits is the real thing. Trade-off: no KV cache is built (both
heads share the same trunk, so the difference is the head alone).
"""
from __future__ import annotations

import argparse
import copy
import queue as queue_module
import resource
import statistics
import time

import torch
import torch.multiprocessing as mp

CPU_PRESET = "tiny-vocab152k"
HEADS = {"full": "full head (all S positions)", "masked": "logits-masked head (last position)"}
TRAIN_MODES = {"full": "logits_chunk 0: logits at every position", "gathered": "labelled rows, all at once (previous)",
               "8192": "logits_chunk 8192 (default)", "1024": "logits_chunk 1024"}


def register_cpu_preset() -> None:
    from lvita.model.presets import PRESETS

    if CPU_PRESET not in PRESETS:
        PRESETS[CPU_PRESET] = copy.deepcopy(PRESETS["tiny"])
        PRESETS[CPU_PRESET]["llm"]["vocab_size"] = 151936


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class _Peak:
    """Peak memory of a block above what was in use when it started (bytes)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set (VmHWM)
            self.base = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = _rss_kb("VmHWM") * 1024 - self.base


def _model(preset: str, device: str, dtype: torch.dtype, logits_chunk: int = 0):
    from lvita.model.longvita import LongVita

    register_cpu_preset()
    with torch.device(device):
        model = LongVita(preset, image_token_id=5, seed=0, logits_chunk=logits_chunk)
    return model.to(dtype)


def _trunk(model, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # one causal sequence
    tile = model.embed.tile
    hidden = model.embed(ids, torch.zeros(0, 3, tile, tile, device=ids.device))
    for layer in model.layers:
        hidden = layer(hidden, pos)
    return hidden


def prefill(model, ids: torch.Tensor, head: str) -> torch.Tensor:
    """Next-token logits (vocab,) fp32 after the prompt ``ids`` (1, S)."""
    hidden = _trunk(model, ids)
    if head == "full":
        return model.head.lm_head(model.head(hidden)).float()[0, -1].clone()  # frees the (S, vocab)
    return model.head.lm_head(model.head(hidden[:, -1:])).float()[0, -1]


def train_loss(model, ids: torch.Tensor, labels: torch.Tensor, mode: str) -> torch.Tensor:
    normed = model.head(_trunk(model, ids))
    if mode != "gathered":
        return model.head.loss_sum(normed, labels)[0]
    keep = labels != -100  # the loss before model.logits_chunk: one (labelled, vocab) logits tensor
    logits = model.head.lm_head(normed[keep]).float()
    return torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum")


def _tokens(length: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (1, length), generator=g)
    labels = torch.randint(10, vocab, (1, length), generator=g)
    labels[torch.rand(1, length, generator=g) < 0.5] = -100
    return ids.to(device), labels.to(device)


def _child(job: dict, queue) -> None:
    try:
        if job["cpu_limit_gb"] and job["device"] == "cpu":
            limit = int(job["cpu_limit_gb"] * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        torch.set_num_threads(job["threads"])
        dtype = getattr(torch, job["dtype"])
        train = job["kind"] == "train"
        chunk = int(job["mode"]) if job["mode"].isdigit() else 0  # the training rows' logits_chunk
        model = _model(job["preset"], job["device"], dtype, chunk)
        vocab = model.head.lm_head.weight.shape[0]
        sync = torch.cuda.synchronize if job["device"].startswith("cuda") else (lambda: None)

        def once(length):
            ids, labels = _tokens(length, vocab, job["device"])
            if train:
                model.zero_grad(set_to_none=False)  # gradients stay allocated from the warm-up
                train_loss(model, ids, labels, job["mode"]).backward()
                return None
            with torch.no_grad():
                return prefill(model, ids, job["mode"])

        once(min(job["length"], 256))  # warm-up: kernels, thread pools, allocator
        times = []
        with _Peak(job["device"]) as peak:
            for _ in range(job["repeats"]):
                sync()
                t0 = time.perf_counter()
                out = once(job["length"])
                sync()
                times.append(time.perf_counter() - t0)
        logits = None if out is None else out.cpu().numpy()  # pickled by value: the child may be gone
        queue.put(("ok", statistics.median(times), peak.bytes, logits))
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        queue.put(("oom", type(e).__name__, 0, None))
    except RuntimeError as e:
        if "allocate" in str(e) or "out of memory" in str(e):
            queue.put(("oom", str(e).splitlines()[0][:80], 0, None))
        else:
            raise


def run(job: dict) -> tuple:
    """One configuration in a fresh process -> (status, seconds, peak bytes, logits or None)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(job, queue))
    proc.start()
    result = None
    while result is None:
        alive = proc.is_alive()  # before the get: a child that exits after putting is still read
        try:
            result = queue.get(timeout=5)
        except queue_module.Empty:
            if not alive:
                result = (f"killed (exit code {proc.exitcode})", 0.0, 0, None)
    proc.join()
    return result


def find_max(base: dict, head: str, start: int, max_length: int, refine: int) -> tuple[int, float, bool]:
    """Longest prompt (tokens) the head prefills, its time, and whether a failure bounded it (False:
    ``max_length`` stopped the doubling first): doubling, then bisection."""
    good, good_t, bad, length = 0, 0.0, None, start
    while length <= max_length:
        status, t, _, _ = run({**base, "mode": head, "length": length, "repeats": 1})
        print(f"  {head:>6s} {length:>9,d} tokens: {status}" + (f" ({t:.2f} s)" if status == "ok" else ""),
              flush=True)
        if status != "ok":
            bad = length
            break
        good, good_t, length = length, t, length * 2
    for _ in range(refine if bad else 0):
        mid = (good + bad) // 2 // 256 * 256
        if mid in (good, bad):
            break
        status, t, _, _ = run({**base, "mode": head, "length": mid, "repeats": 1})
        print(f"  {head:>6s} {mid:>9,d} tokens: {status}", flush=True)
        good, good_t, bad = (mid, t, bad) if status == "ok" else (good, good_t, mid)
    return good, good_t, bad is not None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=CPU_PRESET)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-length", type=int, default=4096, help="0: skip the training rows")
    ap.add_argument("--train-repeats", type=int, default=1)
    ap.add_argument("--find-max", action="store_true")
    ap.add_argument("--start", type=int, default=4096, help="--find-max: first length")
    ap.add_argument("--max-length", type=int, default=1 << 21, help="--find-max: stop doubling here")
    ap.add_argument("--refine", type=int, default=3, help="--find-max: bisection steps")
    ap.add_argument("--cpu-limit-gb", type=float, default=0.0, help="CPU: address-space limit per run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (CPU)")
    args = ap.parse_args()
    register_cpu_preset()
    from lvita.model.presets import llm_config

    vocab = llm_config(args.preset).vocab_size
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    base = {"preset": args.preset, "device": args.device, "dtype": dtype, "cpu_limit_gb": args.cpu_limit_gb,
            "threads": args.threads, "kind": "prefill"}
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {base['threads']} threads")
    memory = ("torch.cuda.max_memory_allocated above the loaded model" if args.device.startswith("cuda") else
              "peak resident set (VmHWM) above the resident set before the run")
    print(f"preset {args.preset} (vocabulary {vocab:,d}), {dtype}, {where}, torch {torch.__version__}; memory: {memory}\n")

    if args.find_max:
        rows = {h: find_max(base, h, args.start, args.max_length, args.refine) for h in HEADS}
        print("\n| head | longest prompt (tokens) | its prefill s |\n|---|---|---|")
        for h, (n, t, bounded) in rows.items():
            print(f"| {HEADS[h]} | {'' if bounded else '>= '}{n:,d} | {t:.2f} |")
        if rows["full"][0]:
            at_least = "" if rows["masked"][2] else "at least "
            print(f"\nlongest input: {at_least}{rows['masked'][0] / rows['full'][0]:.2f}x with the logits-masked head")
        return

    print("| prompt tokens | full head s | masked head s | time ratio | full head MiB | masked head MiB | "
          "memory ratio | (S, vocab) fp32 logits MiB | max abs diff of next-token logits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.lengths:
        res = {h: run({**base, "mode": h, "length": n, "repeats": args.repeats}) for h in HEADS}
        (fs, ft, fm, fl), (ms, mt, mm, ml) = res["full"], res["masked"]
        logits_mib = n * vocab * 4 / 2**20
        if fs != "ok" or ms != "ok":
            print(f"| {n:,d} | {fs if fs != 'ok' else f'{ft:.3f}'} | {ms if ms != 'ok' else f'{mt:.3f}'} | "
                  f"| | | | {logits_mib:,.0f} | |", flush=True)
            continue
        diff = float(abs(fl - ml).max())
        print(f"| {n:,d} | {ft:.3f} | {mt:.3f} | {mt / ft:.2f} | {fm / 2**20:,.0f} | {mm / 2**20:,.0f} | "
              f"{mm / fm:.3f} | {logits_mib:,.0f} | {diff:.1e} |", flush=True)

    if args.train_length:
        n = args.train_length
        print(f"\nTraining: loss + backward of the whole model, {n:,d} tokens, about half labelled\n")
        print("| loss | step s | peak MiB | memory ratio |\n|---|---|---|---|")
        ref = None
        for mode, name in TRAIN_MODES.items():
            status, t, m, _ = run({**base, "kind": "train", "mode": mode, "length": n, "repeats": args.train_repeats})
            if status != "ok":
                print(f"| {name} | {status} | {t} | |", flush=True)
                continue
            ref = ref or m
            print(f"| {name} | {t:.3f} | {m / 2**20:,.0f} | {m / ref:.3f} |", flush=True)


if __name__ == "__main__":
    main()
