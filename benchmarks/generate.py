"""Decode speed of context-parallel generation: sharded KV cache vs the paper's fixed-length recompute.

    python benchmarks/generate.py [--lengths 8192 32768] [--sp 2] [--new 8] [--preset tiny]

For each prompt length, in one run: ``--sp`` CPU processes (gloo) prefill a text prompt of random
token ids, then greedily decode ``--new`` tokens (a) with the sharded KV cache and (b) re-running
the sharded prefill over a fixed-length sequence for every token (Long-VITA's official inference).
Prints prefill seconds, decode tokens/s and the cache/recompute ratio. The model is the preset
with random weights (the LM-head rows of the stop tokens zeroed so that every run decodes
``--new`` tokens); both modes must produce the same tokens, which is checked. On CPU the ratio is
what to read; absolute figures belong to a GPU run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.distributed import run_world  # noqa: E402  the repository's one multi-process helper


def _model(preset: str, specials: dict):
    from lvita.model.longvita import LongVita

    model = LongVita(preset, specials["img_context"], seed=0).eval().requires_grad_(False)
    with torch.no_grad():
        model.head.lm_head.weight[[specials["im_end"], specials["endoftext"]]] = 0
    return model


def _run(rank: int, preset: str, tokenizer: str, length: int, new: int, sp: int) -> dict:
    from lvita.model.presets import tokens_per_tile
    from lvita.infer.cp_generate import ContextParallel, cp_generate
    from lvita.parallel.topology import build_topology, init_distributed
    from lvita.data.tokenizer import load_tokenizer, special_token_ids

    specials = special_token_ids(load_tokenizer(tokenizer))
    model = _model(preset, specials)
    init_distributed()
    cp = ContextParallel(build_topology(1, ulysses=sp), tokens_per_tile(preset), specials["img_context"])
    ids = torch.randint(10, 1000, (length,), generator=torch.Generator().manual_seed(length))
    pixels = torch.zeros(0, 3, 1, 1)
    out = {}
    cp_generate(model, ids[:256], pixels, specials, 2, cp=cp)  # warm-up
    for mode in ("cache", "recompute"):
        t0 = time.perf_counter()
        gen = cp_generate(model, ids, pixels, specials, new, cp=cp, mode=mode)
        decode = time.perf_counter() - t0 - gen.prefill_s  # the new - 1 tokens after the first
        out[mode] = {"prefill_s": gen.prefill_s, "decode_tok_s": (new - 1) / decode, "tokens": gen.tokens}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--new", type=int, default=8, help="generated tokens per run (the first comes with the prefill)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokenizer", default="demo_out/tokenizer", help="`lvita demo --data-only` makes it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{args.preset}, sp={args.sp} CPU processes (gloo), {args.new} new tokens, greedy")
    print("| prompt tokens | prefill s (cache) | decode tok/s, sharded KV cache | decode tok/s, fixed-length recompute "
          "| cache / recompute |\n|---|---|---|---|---|")
    for length in args.lengths:
        r = run_world(_run, args.sp, args.preset, args.tokenizer, length, args.new, args.sp, timeout=3600)[0]
        assert r["cache"]["tokens"] == r["recompute"]["tokens"], "the two modes decoded different tokens"
        c, f = r["cache"]["decode_tok_s"], r["recompute"]["decode_tok_s"]
        print(f"| {length} | {r['cache']['prefill_s']:.2f} | {c:.2f} | {f:.3f} | {c / f:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
