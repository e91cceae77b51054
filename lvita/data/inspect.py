"""``lvita data preview`` and ``lvita data stats``: look at what a stage will train on.

    lvita data preview --stage stages/demo/2_general.json [--n 4] [--json]
    lvita data stats --stage stages/demo/2_general.json [--n 64]

Both run the stage's real data path (mixture, template, tiling plan, packer) in one process,
without decoding pixels. ``preview`` prints the first N packed sequences: length, padding, and
per sample its source, id, token span, images/frames, image tokens and labelled tokens, and
where position ids restart; ``--json`` gives one object per sequence. ``stats`` packs N
sequences and prints packing efficiency (real tokens / all tokens), samples/s and tokens/s of
the planner, skipped samples by reason, and per-source counts against the configured ratios.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter

from lvita.data.packer import PackedSequence
from lvita.data.plan import describe


def open_stream(stage: str, sets: list[str], n: int):
    from lvita.data.stage import open_stage
    from lvita.data.stream import DataStream

    cfg, fmt = open_stage(stage, sets)
    return cfg, DataStream(cfg.data, fmt, n, cfg.seed, own_rows=[],
                           log=lambda *a: print(*a, file=sys.stderr))  # skipped records, on stderr


def sequence_json(seq: PackedSequence) -> dict:
    samples = [{"source": m["source"], "id": m["id"], "start": m["start"], "end": m["end"],
                "image_tokens": m["image_tokens"], "labels": m["labels"]} for m in seq.samples]
    return {"length": len(seq.input_ids), "pad": seq.pad, "samples": samples,
            "position_ids": seq.position_ids.tolist(), "cu_seqlens": seq.cu_seqlens}


def preview(stage: str, sets: list[str], n: int, as_json: bool) -> int:
    _, stream = open_stream(stage, sets, n)
    for i in range(n):
        seq = stream.next_sequence()
        if as_json:
            print(json.dumps(sequence_json(seq)))
            continue
        print(f"sequence {i}: {len(seq.input_ids)} tokens, {len(seq.samples)} samples, {seq.pad} padding, "
              f"position ids restart at {seq.cu_seqlens[:-1] if seq.cu_seqlens else [0]}")
        for m, plan in zip(seq.samples, seq.plans):
            media = ", ".join(f"{describe(m)}" for m in plan.media) or "text only"
            print(f"  [{m['start']:>6}, {m['end']:>6}) {m['source']:<14} {m['id']:<18} {media}; "
                  f"{m['image_tokens']} image tokens, {m['labels']} labelled")
    for reason, count in sorted(stream.skipped.items()):  # stderr under --json: stdout stays JSON lines
        print(f"skipped {reason}: {count}", file=sys.stderr if as_json else sys.stdout)
    return 0


def measure(stream, n: int) -> dict:
    t0 = time.perf_counter()
    seqs = [stream.next_sequence() for _ in range(n)]
    dt = time.perf_counter() - t0
    tokens = sum(len(s.input_ids) for s in seqs)
    real = tokens - sum(s.pad for s in seqs)
    per_source = Counter(m["source"] for s in seqs for m in s.samples)
    samples = sum(per_source.values())
    return {"sequences": n, "efficiency": real / tokens, "samples": samples, "samples_per_s": samples / dt,
            "tokens_per_s": tokens / dt, "seconds": dt, "per_source": dict(per_source),
            "skipped": dict(stream.skipped)}


def stats(stage: str, sets: list[str], n: int) -> int:
    cfg, stream = open_stream(stage, sets, n)
    r = measure(stream, n)
    print(f"{cfg.name}: {n} sequences of {cfg.data.seq_length} tokens in {r['seconds']:.1f} s")
    print(f"  packing efficiency {r['efficiency']:.2%} (real tokens / all tokens)")
    print(f"  {r['samples_per_s']:.0f} samples/s, {r['tokens_per_s']:.0f} tokens/s (planning and packing, "
          f"no pixel decoding)")
    quota, total = stream.mixture.quota, stream.mixture.pass_size
    print(f"  {'source':<16}{'samples':>9}{'share':>9}{'configured':>12}")
    for name in quota:
        got = r["per_source"].get(name, 0)
        print(f"  {name:<16}{got:>9}{got / max(r['samples'], 1):>9.1%}{quota[name] / total:>12.1%}")
    for reason, count in sorted(r["skipped"].items()):
        print(f"  skipped {reason}: {count}")
    return 0
