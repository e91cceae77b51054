"""Peak host memory of one global batch of a long-video stage, per rank: before (every rank of a
data-parallel group decodes every pixel of its rows, normalised to float32 on the host) and now
(pipeline stage 0 only, a sequence rank only its shard's tiles, uint8 until the device).

    PYTHONPATH=$PWD python benchmarks/host_memory.py --pipeline 4 --ulysses 2 --rows 4 --frames 32

Makes a synthetic long-video dataset (frame-directory videos, 448 px tiles, 256 tokens per tile,
as the real presets), plans one global batch the way every rank does, then, in a fresh process
per rank role, decodes what that rank decoded before / decodes now and reports the rise of the
peak resident set (``ru_maxrss``) over the resident set after planning. ``before`` is the old
``DataStream.decode`` verbatim (all tiles, ``media.normalise`` on the host). The ratio that
matters is per rank of the layout (pipeline x sequence ranks, data 1): before, each of them held
the whole batch in float32; now stage 0's sequence ranks hold their shards in uint8 and the other
stages hold no pixels. Trade-off: a fresh process per role keeps the measurements apart, at the
cost of a tokenizer training and a planning pass per role (a few seconds each).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

TILE, TPT = 448, 256


def make_dataset(root: Path, rows: int, frames: int) -> Path:
    from lvita.data.tokenizer import train_demo_tokenizer
    from tests.layouts import write_frame_videos

    write_frame_videos(root, rows, frames, size=(160, 120))
    train_demo_tokenizer(root / "tok")
    return root


def _stream(root: Path, rows: int, frames: int, pixels):
    from lvita.config.schema import DataConfig, SourceConfig
    from lvita.data.stream import DataStream
    from lvita.data.tokenizer import load_tokenizer, special_token_ids

    tok = load_tokenizer(root / "tok")
    unit = 64  # any ulysses x ring up to 16 with zigzag
    seq = -(-(frames * TPT + 256) // unit) * unit  # one video per row
    cfg = DataConfig(root=str(root), seq_length=seq, sources=[SourceConfig("videos", ["videos.jsonl"])],
                     max_frames=frames, pack_buffer=1, workers=1, prefetch=1)
    return DataStream(cfg, tok, special_token_ids(tok), TILE, TPT, rows, seed=0, log=lambda *a: None,
                      pixels=pixels), special_token_ids(tok)


def old_decode(stream, seq):
    """``DataStream.decode`` before issue 16 (every tile, float32 on the host), for the baseline."""
    import torch

    from lvita.data.media import normalise, video_tiles

    tiles = []
    for s in seq.plans:
        got = [video_tiles(stream._source(m[1]), stream.tile, m[2], m[3]) for m in s.media]
        tiles += [normalise(g) for g in got]
    seq.tiles = torch.cat(tiles) if tiles else torch.zeros(0, 3, stream.tile, stream.tile)
    return seq


def measure(root: Path, rows: int, frames: int, role: str, stage: int, seq_rank: int, ulysses: int) -> dict:
    """In this process: plan one global batch, then decode what ``role`` decodes; -> peak rise in MB."""
    import psutil

    from lvita.data.stream import PixelShare

    stream, specials = _stream(root, rows, frames, PixelShare())
    stream.pixels = PixelShare(stage == 0, seq_rank, ulysses, 1, specials["img_context"])
    batch = [stream.next_sequence() for _ in range(rows)]  # planning: what every rank does
    import lvita.model.longvita  # noqa: F401 - media.normalise's import, done before the baseline is taken

    base = psutil.Process().memory_info().rss
    if role == "before":
        batch = [old_decode(stream, s) for s in batch]
    else:
        batch = [stream.decode(s)[0] for s in batch]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    held = sum(s.tiles.nbytes for s in batch)
    return {"peak_rise_mb": max(peak - base, 0) / 2**20, "tiles_mb": held / 2**20,
            "tiles": sum(s.tiles.shape[0] for s in batch), "dtype": str(batch[0].tiles.dtype)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", type=int, default=4)
    ap.add_argument("--ulysses", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4, help="global batch (data parallel 1, micro 1)")
    ap.add_argument("--frames", type=int, default=32, help="frames (tiles) per video, one video per row")
    ap.add_argument("--_measure", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        root, role, stage, seq_rank = args._measure[0], args._measure[1], *map(int, args._measure[2:4])
        print(json.dumps(measure(Path(root), args.rows, args.frames, role, stage, seq_rank, args.ulysses)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp), args.rows, args.frames)

        def run(role, stage, seq_rank):
            out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--frames", str(args.frames),
                                  "--ulysses", str(args.ulysses), "--_measure", str(root), role, str(stage),
                                  str(seq_rank)], capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        # Before, every rank of the layout decoded the same thing: one measurement stands for all.
        before = run("before", 0, 0)
        now = {(p, r): run("now", p, r) for p in range(min(args.pipeline, 2)) for r in range(args.ulysses)}
        for p in range(2, args.pipeline):  # stages > 0 are alike
            for r in range(args.ulysses):
                now[(p, r)] = now[(1, r)]
    ranks = args.pipeline * args.ulysses
    print(f"layout: pipeline {args.pipeline} x ulysses {args.ulysses} (data 1, {ranks} ranks); global batch "
          f"{args.rows} rows x 1 video of {args.frames} frames; {TILE} px tiles, {TPT} tokens per tile\n")
    print(f"{'rank role':<28}{'tiles':>7}{'dtype':>15}{'tiles MB':>10}{'peak rise MB':>14}")
    print(f"{'before: every rank':<28}{before['tiles']:>7}{before['dtype']:>15}{before['tiles_mb']:>10.1f}"
          f"{before['peak_rise_mb']:>14.1f}")
    for (p, r), m in sorted(now.items()):
        if p < 2:
            name = f"now: stage {p}{'+' if p == 1 and args.pipeline > 2 else ''}, sequence rank {r}"
            print(f"{name:<28}{m['tiles']:>7}{m['dtype']:>15}{m['tiles_mb']:>10.1f}{m['peak_rise_mb']:>14.1f}")
    total_before = ranks * before["peak_rise_mb"]
    total_now = sum(m["peak_rise_mb"] for m in now.values())
    held_before, held_now = ranks * before["tiles_mb"], sum(m["tiles_mb"] for m in now.values())
    print(f"\nsum over the {ranks} ranks: peak rise {total_before:.1f} MB before, {total_now:.1f} MB now: "
          f"{total_before / max(total_now, 1e-9):.1f}x less (tiles held: {held_before / max(held_now, 1e-9):.1f}x); "
          f"target: pipeline x 4 = {4 * args.pipeline}x")
    s0 = max(now[(0, r)]["peak_rise_mb"] for r in range(args.ulysses))
    print(f"worst rank now (stage 0): {before['peak_rise_mb'] / max(s0, 1e-9):.1f}x less than before; "
          f"stages > 0: {max(now[(p, r)]['peak_rise_mb'] for p in range(1, args.pipeline) for r in range(args.ulysses)) if args.pipeline > 1 else 0:.1f} MB")


if __name__ == "__main__":
    main()
