"""Decode speed of context-parallel generation: sharded KV cache vs the paper's fixed-length recompute,
and the sharded KV cache's decode attention before and after issue 16.

    python benchmarks/generate.py [--lengths 8192 32768] [--sp 2] [--new 8] [--preset tiny]
                                  [--modes cache-before cache recompute] [--repeats 1]

For each prompt length, in one run: ``--sp`` CPU processes (gloo) prefill a text prompt of random
token ids, then greedily decode ``--new`` tokens with each mode:

- ``cache``: the sharded KV cache (lvita.infer.sharded_kv: grouped heads in the cache's dtype,
  preallocated head-major cache written in place);
- ``cache-before``: the same with the decode attention and cache of before issue 16, kept here
  only for this comparison (:class:`_CatCache`, :func:`_expanded_decode_attention`): K/V expanded
  to fp32 and repeated per query head for every layer and token, the cache grown by torch.cat;
- ``recompute``: re-running the sharded prefill over a fixed-length sequence for every token
  (Long-VITA's official inference).

Prints prefill seconds, decode tokens/s and the ratios. The model is the preset with random
weights (the LM-head rows of the stop tokens zeroed so that every run decodes ``--new`` tokens);
all modes must produce the same tokens, which is checked. On CPU the ratios are what to read;
absolute figures belong to a GPU run.
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


class _CatCache:
    """Before issue 16: (B, S_r, Hkv, D) per layer, grown by torch.cat for every owned token."""

    def __init__(self, n_layers: int, rank: int, world: int, reserve: int = 0):
        self.k, self.v = [None] * n_layers, [None] * n_layers
        self.rank, self.world = rank, world

    def owns(self, generated_index: int) -> bool:
        return generated_index % self.world == self.rank

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=1)
            self.v[layer] = torch.cat([self.v[layer], v], dim=1)

    def keys(self, layer: int) -> torch.Tensor:
        return self.k[layer]

    def values(self, layer: int) -> torch.Tensor:
        return self.v[layer]


def _expanded_decode_attention(q, k_local, v_local, group, scale=None):
    """Before issue 16: K/V (B, S_r, Hkv, D) to fp32 and repeated per query head, every layer and token."""
    import torch.distributed as dist

    from lvita.infer.sharded_kv import merge_partials

    B, Tq, Hq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    if k_local.shape[1] == 0:
        out, lse = q.new_zeros(B, Tq, Hq, D, dtype=torch.float32), q.new_full((B, Tq, Hq), float("-inf"))
    else:
        rep = Hq // k_local.shape[2]
        kf = k_local.float().repeat_interleave(rep, dim=2) if rep > 1 else k_local.float()
        vf = v_local.float().repeat_interleave(rep, dim=2) if rep > 1 else v_local.float()
        scores = torch.einsum("bqhd,bshd->bhqs", q.float(), kf) * scale
        lse = torch.logsumexp(scores, dim=-1).transpose(1, 2)
        out = torch.einsum("bhqs,bshd->bqhd", torch.softmax(scores, dim=-1), vf)
    packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1)
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed.contiguous(), group=group)
    stacked = torch.stack(gathered)
    return merge_partials(stacked[..., :-1], stacked[..., -1]).to(q.dtype)


def _run(rank: int, preset: str, tokenizer: str, length: int, new: int, sp: int, modes: list[str],
         repeats: int = 1) -> dict:
    from lvita.infer import cp_generate as cpg
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
    current = (cpg.ShardedKVCache, cpg.sharded_decode_attention)
    for rep in range(repeats):  # modes alternate; each keeps its best (least disturbed) repeat
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            before = mode == "cache-before"
            cpg.ShardedKVCache, cpg.sharded_decode_attention = \
                (_CatCache, _expanded_decode_attention) if before else current
            t0 = time.perf_counter()
            gen = cp_generate(model, ids, pixels, specials, new, cp=cp, mode="cache" if before else mode)
            decode = time.perf_counter() - t0 - gen.prefill_s  # the new - 1 tokens after the first
            best = out.get(mode, {}).get("decode_tok_s", 0.0)
            out[mode] = {"prefill_s": gen.prefill_s, "decode_tok_s": max(best, (new - 1) / decode),
                         "tokens": gen.tokens}
    cpg.ShardedKVCache, cpg.sharded_decode_attention = current
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--new", type=int, default=8, help="generated tokens per run (the first comes with the prefill)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeats", type=int, default=1, help="runs per mode, alternating order; best decode rate kept")
    ap.add_argument("--modes", nargs="+", default=["cache-before", "cache", "recompute"],
                    choices=["cache-before", "cache", "recompute"])
    ap.add_argument("--tokenizer", default="demo_out/tokenizer", help="`lvita demo --data-only` makes it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{args.preset}, sp={args.sp} CPU processes (gloo), {args.new} new tokens, greedy, "
          f"best of {args.repeats} alternating run(s) per mode")
    names = {"cache-before": "decode tok/s, cache before issue 16", "cache": "decode tok/s, sharded KV cache",
             "recompute": "decode tok/s, fixed-length recompute"}
    ratios = [("cache", "cache-before"), ("cache", "recompute")]
    ratios = [(a, b) for a, b in ratios if a in args.modes and b in args.modes]
    cols = ["prompt tokens", "prefill s"] + [names[m] for m in args.modes] + [f"{a} / {b}" for a, b in ratios]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for length in args.lengths:
        r = run_world(_run, args.sp, args.preset, args.tokenizer, length, args.new, args.sp, args.modes,
                      args.repeats, timeout=3600)[0]
        tokens = {m: r[m]["tokens"] for m in args.modes}
        assert all(t == tokens[args.modes[0]] for t in tokens.values()), f"the modes decoded different tokens: {tokens}"
        row = [str(length), f"{r[args.modes[0]]['prefill_s']:.2f}"] + [f"{r[m]['decode_tok_s']:.3f}" for m in args.modes]
        row += [f"{r[a]['decode_tok_s'] / r[b]['decode_tok_s']:.2f}x" for a, b in ratios]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
