"""Packing efficiency and speed of the data path, for text-only, image-heavy and the demo mixtures.

    lvita demo --data-only && python benchmarks/packer.py [--stage stages/demo/2_general.json] [--n 256]

Runs the stage's real planner and packer (mixture, ChatML template, InternVL tile counts from
image headers, best-fit packing) in one process and reports, side by side: packing efficiency
(real tokens / all tokens), samples/s and packed tokens/s of planning + packing, and separately
the pixel decoding rate of one worker thread (images/videos -> normalised tiles), which is what
``data.workers`` threads run in the background for each rank's own rows. Also the efficiency
against ``data.pack_buffer``. Goal: demo stage 2 packs at >= 97%.
"""
from __future__ import annotations

import argparse
import json
import time

from lvita.config.schema import load_stage
from lvita.data.inspect import measure, open_stream

MIXTURES = {
    "text-only": ["text_short", "text_long"],
    "image-heavy": ["captions", "multi_image", "comic"],
    "stage mixture": None,
}


def _sources(stage: str, keep: list[str] | None) -> list[str]:
    """``--set`` overrides keeping only the sources named in ``keep`` (each at ratio 1)."""
    if keep is None:
        return []
    chosen = [{"name": s.name, "paths": s.paths, "ratio": 1.0} for s in load_stage(stage, []).data.sources
              if s.name in keep]
    return ["data.sources=" + json.dumps(chosen)]


def decode_rate(stream, n: int) -> tuple[float, float]:
    """Tiles/s and seconds for decoding the pixels of ``n`` packed sequences in this thread."""
    seqs = [stream.next_sequence() for _ in range(n)]
    t0 = time.perf_counter()
    tiles = sum(stream.decode(s)[0].tiles.shape[0] for s in seqs)
    dt = time.perf_counter() - t0
    return tiles / dt, dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="stages/demo/2_general.json")
    ap.add_argument("--n", type=int, default=256, help="packed sequences per measurement")
    args = ap.parse_args()
    print(f"{args.stage}, {args.n} sequences per row")
    print(f"{'mixture':<15}{'efficiency':>11}{'samples/s':>11}{'tokens/s':>11}{'decode tiles/s':>16}")
    for name, keep in MIXTURES.items():
        sets = _sources(args.stage, keep)
        _, stream = open_stream(args.stage, sets, args.n)
        r = measure(stream, args.n)
        rate, _ = decode_rate(stream, min(args.n, 32))
        print(f"{name:<15}{r['efficiency']:>11.2%}{r['samples_per_s']:>11.0f}{r['tokens_per_s']:>11.0f}{rate:>16.0f}")
    print(f"\n{'pack_buffer':<15}{'efficiency':>11}{'samples/s':>11}")
    for buffer in (32, 64, 128, 256, 512):
        _, stream = open_stream(args.stage, [f"data.pack_buffer={buffer}"], args.n)
        r = measure(stream, args.n)
        print(f"{buffer:<15}{r['efficiency']:>11.2%}{r['samples_per_s']:>11.0f}")


if __name__ == "__main__":
    main()
