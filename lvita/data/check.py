"""``lvita data check``: read every record of every source once, before booking the GPUs.

    lvita data check --stage FILE [--source NAME] [--workers N] [--decode] [--json] [--set KEY=VALUE]...

Runs the training planner (:mod:`lvita.data.plan`: schema, placeholders, media headers, tiling,
ChatML) on every record of every source with ``ratio > 0`` (or of the one named by ``--source``,
whatever its ratio) and prints per source: records, usable, skipped by reason with the first few
``file:line`` of each, and the distribution of tokens per sample (percentiles; how many exceed
``data.seq_length``: text is truncated there, multimodal samples are skipped), images and tiles per
sample. ``--decode`` also decodes every image and video (slow; finds truncated files whose headers
read, which training would find only when it reaches them: ``bad_media_at_decode``). Exit status 1
when a source's skipped fraction is above ``data.max_skip_fraction``; 2 for a bad stage or path.

Parallelism: each file is cut into ranges (rows, or byte ranges starting at line boundaries for
JSON lines) handed to ``--workers`` spawned processes (not forked: the caller may run threads),
each opening the files itself from the parent's file list and record counts; results are merged in
order, so the output does not depend on the worker count. Trade-off: every worker imports lvita
and holds the tokenizer (a few seconds to start) and, for parquet, one decoded row group;
per-sample figures are kept as int32 arrays (12 bytes a record) for exact percentiles.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from lvita.data.media import MediaError
from lvita.data.planned import PlannedImage
from lvita.data.sources import SourceReader, pass_quotas
from lvita.data.template import SampleError

SHOWN = 3  # first file:line examples kept per reason
_STATE: dict = {}  # a worker's planner and readers


def _units(reader: SourceReader, pieces: int) -> list[tuple]:
    """(file, start, line, end) ranges covering every record of the source, about ``pieces`` per file."""
    out = []
    for i, r in enumerate(reader.readers):
        if r.rows:
            n = len(r)
            step = max(1, -(-n // pieces))
            out += [(i, a, a, min(n, a + step)) for a in range(0, n, step)]
            continue
        size = os.path.getsize(r.path)
        cuts, step, lines = [0], max(1, size // pieces), 0
        with open(r.path, "rb") as f:
            for b in range(step, size, step):  # next line start after b, and the lines before it
                f.seek(b - 1)
                rest = f.readline()
                start = b - 1 + len(rest)
                if start <= cuts[-1] or start >= size:
                    continue
                cuts.append(start)
        with open(r.path, "rb") as f:  # lines before each cut, counted 8 MB at a time
            pos = 0
            for a, z in zip(cuts, cuts[1:] + [size]):
                while pos < a:
                    block = f.read(min(8 << 20, a - pos))
                    lines, pos = lines + block.count(b"\n"), pos + len(block)
                out.append((i, a, lines, z))
    return out


def _init(state: dict) -> None:
    _STATE.clear()
    _STATE.update(state)
    _STATE["readers"] = {n: SourceReader.from_spec(spec) for n, spec in state["readers"].items()}


def _scan(source: str, unit: tuple) -> dict:
    planner, decode, L = _STATE["planner"], _STATE["decode"], _STATE["seq_length"]
    reader = _STATE["readers"][source]
    read_at = lambda s, c: reader.read(tuple(c))[0]  # noqa: E731
    skipped, first = Counter(), {}
    tokens, images, tiles = [], [], []
    records = 0
    for rec in reader.scan(*unit):
        records += 1
        reason, detail, plan = None, "", None
        try:
            plan = planner.plan(rec)
        except SampleError as e:
            reason, detail = e.reason, str(e)
        except MediaError as e:
            reason, detail = "bad_media", str(e)
        if plan is not None and decode:
            try:
                for m in plan.media:  # another tile count than planned is a MediaError
                    planner.fmt.medium_tiles(m, planner.media_source(m.ref, read_at), planner.cfg.min_tiles)
            except MediaError as e:
                reason, detail = "bad_media_at_decode", str(e)
        if reason is not None:
            skipped[reason] += 1
            if len(first.setdefault(reason, [])) < SHOWN:
                first[reason].append(f"{rec.where}: {detail}")
            continue
        tokens.append(plan.tokens)
        images.append(sum(isinstance(m, PlannedImage) for m in plan.media))
        tiles.append(plan.n_tiles)
    return {"records": records, "skipped": skipped, "first": first, "tokens": np.asarray(tokens, np.int32),
            "images": np.asarray(images, np.int32), "tiles": np.asarray(tiles, np.int32), "seq_length": L}


def _summary(name: str, parts: list[dict], max_skip: float) -> dict:
    skipped, first = Counter(), {}
    for p in parts:
        skipped.update(p["skipped"])
        for reason, where in p["first"].items():
            first[reason] = (first.get(reason, []) + where)[:SHOWN]
    records = sum(p["records"] for p in parts)
    tokens, images, tiles = (np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, np.int32)
                             for k in ("tokens", "images", "tiles"))
    L = parts[0]["seq_length"] if parts else 0
    pct = lambda a: {f"p{q}": int(np.percentile(a, q)) for q in (50, 90, 99)} | {"max": int(a.max())} \
        if len(a) else {}  # noqa: E731
    frac = sum(skipped.values()) / max(records, 1)
    return {"source": name, "records": records, "usable": int(len(tokens)), "skipped": dict(skipped),
            "skip_fraction": frac, "over_threshold": frac > max_skip,
            "first": {r: first[r] for r in sorted(first)},
            "tokens": pct(tokens), "over_seq_length": int((tokens > L).sum()),
            "images": pct(images) | ({"mean": float(images.mean())} if len(images) else {}),
            "tiles": pct(tiles) | ({"mean": float(tiles.mean())} if len(tiles) else {})}


def run_check(cfg, fmt, source: str | None = None, workers: int = 1, decode: bool = False) -> list[dict]:
    """Every record of the chosen sources planned (and decoded) in ``fmt`` (the run's InputFormat)."""
    from lvita.config.schema import ConfigError
    from lvita.data.formats import check_schema
    from lvita.data.plan import Planner

    d = cfg.data
    names = [s.name for s in d.sources]
    if source is not None and source not in names:
        raise ConfigError(f"--source {source}: no such source; the stage has {', '.join(names)}")
    chosen = [s for s in d.sources if (s.name == source if source else s.ratio > 0)]
    for s in chosen:
        check_schema(s.format, f"data.sources[{names.index(s.name)}].format")
    readers = {s.name: SourceReader(s.name, d.root, s.paths, s.media_root, s.format) for s in chosen}
    state = {"planner": Planner(d, fmt), "decode": decode,
             "seq_length": d.seq_length, "readers": {n: r.spec() for n, r in readers.items()}}
    jobs = [(n, u) for n, r in readers.items() for u in _units(r, max(1, workers) * 4)]
    if workers <= 1:
        _init(state)
        results = [_scan(n, u) for n, u in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init,
                                 initargs=(state,)) as pool:
            results = list(pool.map(_scan, [n for n, _ in jobs], [u for _, u in jobs], chunksize=1))
    by_name = {s.name: s for s in chosen}
    return [_summary(n, [r for (m, _), r in zip(jobs, results) if m == n], d.max_skip_fraction)
            | {"per_pass": sum(pass_quotas(by_name[n], [len(x) for x in r.readers])), "sampling": by_name[n].sampling()}
            for n, r in readers.items()]


def _line(name: str, d: dict) -> str:
    return " ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()) or "-"


def check(stage: str, sets: list[str], source: str | None, workers: int, decode: bool, as_json: bool) -> int:
    import time

    from lvita.data.stage import open_stage

    cfg, fmt = open_stage(stage, sets)
    t0 = time.perf_counter()
    out = run_check(cfg, fmt, source, workers, decode)
    dt = time.perf_counter() - t0
    bad = [s["source"] for s in out if s["over_threshold"]]
    if as_json:
        print(json.dumps({"stage": cfg.source_file, "seq_length": cfg.data.seq_length, "seconds": dt,
                          "max_skip_fraction": cfg.data.max_skip_fraction, "sources": out, "over_threshold": bad}))
        return 1 if bad else 0
    total = sum(s["records"] for s in out)
    print(f"{cfg.name}: {total} records in {len(out)} source(s), {dt:.1f} s ({total / max(dt, 1e-9):.0f} records/s, "
          f"{workers} worker(s){', pixels decoded' if decode else ', headers only'})")
    for s in out:
        flag = "  OVER data.max_skip_fraction" if s["over_threshold"] else ""
        print(f"\n{s['source']}: {s['records']} records, {s['usable']} usable, {s['records'] - s['usable']} skipped "
              f"({s['skip_fraction']:.1%}){flag}")
        for reason, n in sorted(s["skipped"].items()):
            print(f"  skipped {reason}: {n}")
            for where in s["first"].get(reason, []):
                print(f"    {where}")
        print(f"  per pass: {s['per_pass']:,} records ({s['sampling']})")
        print(f"  tokens/sample: {_line('tokens', s['tokens'])}; {s['over_seq_length']} over data.seq_length="
              f"{cfg.data.seq_length}")
        print(f"  images/sample: {_line('images', s['images'])}; tiles/sample: {_line('tiles', s['tiles'])}")
    if bad:
        print(f"\n{len(bad)} source(s) over data.max_skip_fraction={cfg.data.max_skip_fraction}: {', '.join(bad)}")
    return 1 if bad else 0
