"""Driver for :mod:`tests.hostile`: write a seeded hostile source, read it back, plan it, list crashes.

    python -m tests.hostile_run --records 5000 --seed 1 [--per-record 2] [--prompt]

Records go to disk (JSONL and JSON-array files) and come back through
:class:`lvita.data.sources.SourceReader` one cursor at a time, so a reader crash on one line is
counted and the next line is still read; a share is also planned as in-memory Records holding real
``{"bytes": ...}`` entries (what parquet rows give). Every distinct crash (type, file:line) is
printed once with its first record and setting.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tests.hostile import hostile_record, write_media, write_sources


@dataclass(frozen=True)
class Setting:
    fmt: str = "internvl"
    min_tiles: int = 1
    max_tiles: int = 12
    seq_length: int = 512
    max_images: int = 16
    max_frames: int = 8

    def data(self, root: str = ".", **kw):
        from lvita.config.schema import DataConfig

        return DataConfig(root=root, seq_length=self.seq_length, min_tiles=self.min_tiles, max_tiles=self.max_tiles,
                          max_images=self.max_images, max_frames=self.max_frames, video_fps=2.0,
                          system_prompt="" if self.fmt == "longvita" else "You are a helpful assistant.", **kw)


GRID = [Setting(fmt, lo, hi, L, mi, mf) for fmt in ("internvl", "longvita")
        for (lo, hi), L, mi, mf in [((1, 1), 64, 16, 8), ((2, 2), 512, 4, 2), ((1, 12), 4096, 20, 16),
                                    ((4, 6), 65536, 8, 4), ((1, 12), 512, 16, 8), ((1, 1), 4096, 20, 1),
                                    ((2, 2), 64, 20, 16), ((4, 6), 512, 1, 8)]]

_PLANNERS: dict = {}


def plan_record(record, setting: Setting, tokenizers: dict):
    """THE one call into the planner. ``tokenizers``: format name -> the tiny preset's InputFormat in it."""
    from lvita.data.plan import Planner

    key = (setting, id(tokenizers[setting.fmt]))
    if key not in _PLANNERS:
        _PLANNERS[key] = Planner(setting.data(), tokenizers[setting.fmt])
    return _PLANNERS[key].plan(record)


def load_tokenizers(tokenizer_dir) -> dict:
    """Format name -> the tiny preset's InputFormat (tokenizer with the format's tokens, special ids)."""
    from lvita.data.input_format import InputFormat
    from lvita.model.formats import MODEL_FORMATS
    from lvita.model.presets import spec_of

    return {f.name: InputFormat.load(spec_of("tiny", f), tokenizer_dir) for f in MODEL_FORMATS}


@dataclass
class Crash:
    kind: str  # exception type
    message: str
    at: str  # file:line of the raise
    trace: str

    @property
    def key(self) -> tuple:
        return self.kind, self.at


def crash_of(e: BaseException) -> Crash:
    frames = traceback.extract_tb(e.__traceback__)
    last = next((f for f in reversed(frames) if "/lvita/" in f.filename), frames[-1] if frames else None)
    at = f"{last.filename.split('/lvita/')[-1]}:{last.lineno}" if last else "?"
    return Crash(type(e).__name__, str(e)[:200], at, "".join(traceback.format_exception(e))[-3000:])


def outcome(call):
    """Run ``call()`` -> its result, "skip:<reason>" for SampleError/MediaError, or a Crash."""
    from lvita.data.media import MediaError
    from lvita.data.template import SampleError

    try:
        return call()
    except SampleError as e:
        return f"skip:{e.reason}" if e.reason else Crash("SampleError", "empty reason", "?", str(e))
    except MediaError:
        return "skip:bad_media"
    except Exception as e:  # noqa: BLE001 - what this module exists to find
        return crash_of(e)


def plan_invariants(plan, setting: Setting, specials: dict, tpt: int) -> list[str]:
    """What a SamplePlan must satisfy; -> the broken ones (empty: all hold)."""
    bad = []
    ids, targets = plan.input_ids, plan.targets
    if len(ids) > setting.seq_length:
        bad.append(f"{len(ids)} ids > seq_length {setting.seq_length}")
    if len(targets) != len(ids):
        bad.append(f"{len(targets)} targets for {len(ids)} ids")
    if all(t == -100 for t in targets):
        bad.append("no target")
    ctx = [specials["img_context"]] + ([specials["patch_context"], specials["vid_context"]]
                                       if setting.fmt == "longvita" else [])
    slots = sum(ids.count(c) for c in ctx)
    if slots != tpt * plan.n_tiles:
        bad.append(f"{slots} context tokens for {plan.n_tiles} tiles x {tpt}")
    from lvita.data.planned import PlannedImage, PlannedVideo

    for m in plan.media:
        if m.tiles < 1 or (isinstance(m, PlannedImage) and not setting.min_tiles <= m.max_tiles <= setting.max_tiles):
            bad.append(f"medium {m}")
        if isinstance(m, PlannedVideo) and m.frames > setting.max_frames:
            bad.append(f"video of {m.frames} frames > max_frames {setting.max_frames}")
    if sum(isinstance(m, PlannedImage) for m in plan.media) > setting.max_images:
        bad.append("too many images")
    return bad


def decode_plan(plan, setting: Setting, record) -> None:
    """Decode every planned medium's pixels as training does; MediaError (or a Crash) when they do not."""
    planner = _PLANNERS[next(k for k in _PLANNERS if k[0] == setting)]
    for m in plan.media:  # another tile count than planned is a MediaError
        planner.fmt.medium_tiles(m, planner.media_source(m.ref, lambda source, cursor: record), setting.min_tiles)


def prompt_of(record, setting: Setting, tokenizers: dict):
    """build_prompt fed a record's conversation (cut before its last assistant turn) and media, as
    given (relative paths made absolute under the record's base; wrong types passed on)."""
    from lvita.data.formats import normalise
    from lvita.infer.prompt import MediaOptions, build_prompt
    raw = record.raw if isinstance(record.raw, dict) else {}
    conv = raw.get("messages", raw.get("conversations"))
    try:
        sample = normalise(raw, "auto")
        messages, images, videos = sample.messages, sample.images, sample.videos
    except Exception:  # noqa: BLE001 - an unusable record: feed build_prompt the raw turns instead
        messages, images, videos = conv, raw.get("images", []), raw.get("videos", [])
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and \
            messages[-1].get("role", messages[-1].get("from")) in ("assistant", "gpt"):
        messages = messages[:-1]
    base = record.base
    fix = lambda e: str(base / e) if isinstance(e, str) and e and "://" not in e else e  # noqa: E731
    images = [fix(e) for e in images] if isinstance(images, list) else images
    videos = [fix(e) for e in videos] if isinstance(videos, list) else videos
    return build_prompt(messages, tokenizers[setting.fmt], images, videos,
                        None if setting.fmt == "longvita" else "You are a helpful assistant.",
                        MediaOptions(setting.min_tiles, setting.max_tiles, setting.max_frames, 2.0),
                        max_context=setting.seq_length)


def run_records(records: list, tokenizers: dict, grid=GRID, settings_per_record: int = 1, seed: int = 0,
                decode: bool = False, prompt: bool = False):
    """Plan every Record under ``settings_per_record`` settings of ``grid`` (rotating); ``decode``: also
    decode the planned media; ``prompt``: also feed build_prompt -> (counts by outcome, {crash key:
    (Crash, record, setting)}, [(invariant failures, record, setting)])."""
    from collections import Counter


    counts, crashes, broken = Counter(), {}, []

    def note(got, rec, s, stage=""):
        if isinstance(got, Crash):
            counts[f"{stage}crash:{got.kind}"] += 1
            crashes.setdefault((stage,) + got.key, (got, rec, s))
        elif isinstance(got, str):
            counts[stage + got] += 1
        else:
            counts[stage + "ok"] += 1

    for i, rec in enumerate(records):
        for j in range(settings_per_record):
            s = grid[(i * settings_per_record + j + seed) % len(grid)]
            got = outcome(lambda: plan_record(rec, s, tokenizers))
            note(got, rec, s)
            if not isinstance(got, (Crash, str)):
                bad = plan_invariants(got, s, tokenizers[s.fmt].specials, tokenizers[s.fmt].tpt)
                if bad:
                    broken.append((bad, rec, s))
                if decode:
                    note(outcome(lambda: decode_plan(got, s, rec)), rec, s, "decode:")
            if prompt:
                note(outcome(lambda: prompt_of(rec, s, tokenizers)), rec, s, "prompt:")
    return counts, crashes, broken


def describe(rec, setting) -> str:
    raw = rec.raw if hasattr(rec, "raw") else rec
    shown = repr(raw)
    return f"setting={setting}\nrecord={shown[:1500]}{' ...' if len(shown) > 1500 else ''}"


# -- the driver ------------------------------------------------------------------------------

def read_back(root: Path, paths: list[str]):
    """-> (Records read through SourceReader, {crash key: (Crash, where, None)} of the reads)."""
    from lvita.data.sources import SourceReader

    reader = SourceReader("hostile", str(root), paths)
    records, crashes = [], {}
    for i, r in enumerate(reader.readers):
        if r.rows:
            cursors = [(i, k, k) for k in range(len(r))]
        else:  # every non-blank line's start, found here so one bad line cannot hide the rest
            cursors, off = [], 0
            with open(r.path, "rb") as f:
                for n, line in enumerate(f):
                    if line.strip():
                        cursors.append((i, off, n))
                    off += len(line)
        for c in cursors:
            got = outcome(lambda: reader.read(c, one_file=True)[0])
            if isinstance(got, Crash):
                crashes.setdefault(("read",) + got.key, (got, f"{r.path} cursor {c}", None))
            else:
                records.append(got)
    return records, crashes


def direct_records(root: Path, pool, n: int, seed: int) -> list:
    """In-memory Records (raw dicts with real bytes in media entries), as a parquet row gives them."""
    from lvita.data.sources import Record

    out = []
    for k in range(n):
        rng = random.Random(f"{seed}/direct/{k}")
        raw = hostile_record(rng, pool, embed=True)
        if rng.random() < 0.02:
            raw = ValueError("Expecting value: line 1 column 1 (char 0)")  # a JSONL line that did not parse
        out.append(Record("direct", raw, f"direct:{k}", (0, k, k), root, rng.choice(["auto"] * 4 + ["messages"])))
    return out


def hostile_source(root: Path, n: int, seed: int, breakers: bool = False) -> tuple:
    """Media pool + n records on disk under ``root`` -> (pool, the source file names, the raw records)."""
    pool = write_media(root, seed)
    raws = [hostile_record(random.Random(f"{seed}/{k}"), pool) for k in range(n)]
    return pool, write_sources(root, raws, random.Random(seed), breakers), raws


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-record", type=int, default=1, help="settings of the grid each record is planned under")
    ap.add_argument("--direct", type=float, default=0.25, help="share of in-memory Records (embedded bytes)")
    ap.add_argument("--decode", action="store_true", help="also decode every planned sample's pixels")
    ap.add_argument("--prompt", action="store_true", help="also feed every record to build_prompt")
    ap.add_argument("--no-breakers", action="store_true", help="leave out the JSONL lines that crash the reader")
    args = ap.parse_args(argv)
    from lvita.data.tokenizer import train_demo_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tmp = Path(tmp)
        tokenizers = load_tokenizers(train_demo_tokenizer(tmp / "tok"))
        n_direct = int(args.records * args.direct)
        pool, paths, _ = hostile_source(tmp / "data", args.records - n_direct, args.seed, not args.no_breakers)
        records, crashes = read_back(tmp / "data", paths)
        records += direct_records(tmp / "data", pool, n_direct, args.seed)
        counts, planned, broken = run_records(records, tokenizers, GRID, args.per_record, args.seed, args.decode,
                                              args.prompt)
        crashes.update(planned)
        print(f"{len(records)} records x {args.per_record} setting(s) in {time.perf_counter() - t0:.1f} s")
        for k, v in sorted(counts.items()):
            print(f"  {k}: {v}")
        for key, (c, rec, s) in crashes.items():
            print(f"\nCRASH {' '.join(key)}: {c.message}\n{describe(rec, s)}\n{c.trace}")
        for bad, rec, s in broken[:20]:
            print(f"\nINVARIANT {bad}\n{describe(rec, s)}")
        print(f"\n{len(crashes)} distinct crash(es), {len(broken)} plan(s) breaking invariants")
    return 1 if crashes or broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
