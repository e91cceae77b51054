"""Training sources read as streams, and the seeded mixture that interleaves them.

A source is named and lists paths under ``data.root``: JSONL files, JSON arrays, parquet or arrow
files, globs, directories of them, or Hugging Face dataset directories (:mod:`lvita.data.tables`
says which files a path names and how each is opened). Records are read lazily from a cursor
(file, byte offset or row, line), so millions of records are never held in memory, and any record
can be read again from its cursor (that is how the packer's buffer is restored on resume, and how
decoding threads fetch embedded image bytes). Media paths in a record are relative to the source's
``media_root`` (under ``data.root``), by default to its data file's directory.

The mixture works in passes. In each pass source s contributes ``round(ratio_s x records_s)``
records (at least one when the ratio is above 0; capped by ``max_samples``); with ``per_file`` each
file f of it contributes ``min(int(ratio_s x records_f), max_samples)``, as the official Long-VITA
loader counts (``long_vita/data/dataset_base.py``). Records are read on from where
the previous pass stopped and wrapping round the end, so a ratio of 0.1 walks through the whole
source in ten passes and a ratio of 2 reads it twice per pass. Which source supplies the k-th
record of a pass is a seeded draw weighted by the quotas still open, so the order depends only on
the seed and the config (never on the parallel layout), and the state to resume is a few integers.

    mix = Mixture(cfg.data, seed=1234)
    record = mix.next()          # Record(source, raw record, where "file:line", cursor, media base, format)
    mix.state_dict(); mix.load_state_dict(state)

Trade-off: records of one source come in file order (shuffle big files once beforehand); the
interleave of sources is random. Counting a JSONL source's records scans it once at start-up; a
JSON array is indexed once (cached beside it).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from lvita.config.schema import DataConfig
from lvita.data.errors import DataError
from lvita.data.formats import check_schema
from lvita.data.tables import open_file, source_files


@dataclass
class Record:
    source: str
    raw: object  # parsed JSON or row (dict expected), or a JSONDecodeError for a malformed line
    where: str  # "file:line", "file:record N" or "file:row N", for error messages
    cursor: tuple  # (file index, offset or row, line): read_at(cursor) gives this record again
    base: Path  # relative media paths are relative to this directory
    schema: str = "auto"  # record schema (data.sources[].format; lvita.data.formats)


class SourceReader:
    def __init__(self, name: str, root: str, paths: list[str], media_root: str | None = None,
                 schema: str = "auto", _files=None):
        self.name, self.schema = name, schema
        self.media_root = None if media_root is None else (
            Path(media_root) if Path(media_root).is_absolute() else Path(root) / media_root)
        self._current: int | None = None  # the one file held open
        if _files is not None:  # reopen(): the same files, fresh handles
            self.files, self.readers = _files
            return
        self.files = source_files(name, root, paths)
        self.readers = [open_file(f) for f in self.files]
        for r in self.readers:
            r.close()  # counted; opened again when read
        self.size = sum(len(r) for r in self.readers)
        if self.size == 0:
            raise DataError(f"data source '{name}' has no records in {[str(f) for f in self.files]}")

    def reopen(self) -> "SourceReader":
        """A reader of the same files with its own handles (one per decoding thread)."""
        other = SourceReader(self.name, "", [], None, self.schema, (self.files, [r.reopen() for r in self.readers]))
        other.media_root, other.size = self.media_root, self.size
        return other

    def spec(self) -> tuple:
        """What another process needs to open the same source without scanning it again (picklable)."""
        return self.name, self.files, [len(r) for r in self.readers], self.media_root, self.schema

    @classmethod
    def from_spec(cls, spec: tuple) -> "SourceReader":
        name, files, sizes, media_root, schema = spec
        out = cls(name, "", [], None, schema, (files, [open_file(f, n) for f, n in zip(files, sizes)]))
        out.media_root, out.size = media_root, sum(sizes)
        return out

    def start(self) -> tuple:
        return (0, 0, 0)

    def _base(self, i: int) -> Path:
        return self.media_root if self.media_root is not None else self.files[i].parent

    def _reader(self, i: int):
        if self._current is not None and self._current != i:
            self.readers[self._current].close()
        self._current = i
        return self.readers[i]

    def _row(self, i: int, k: int) -> Record:
        r = self._reader(i)
        kind = "row" if r.path.suffix in (".parquet", ".arrow") else "record"
        return Record(self.name, r.read(k), f"{self.files[i]}:{kind} {k}", (i, k, k), self._base(i), self.schema)

    def scan(self, i: int, start: int, line: int, end: int):
        """Records of file i from row (or byte offset, at line index ``line``) ``start`` up to ``end``."""
        r = self._reader(i)
        if r.rows:
            for k in range(start, min(end, len(r))):
                yield self._row(i, k)
            return
        off = start
        while off < end:
            got = r.read_line(off, line)
            if got is None or got[2] >= end:
                return
            parsed, where, begin, first, off, line = got
            yield Record(self.name, parsed, where, (i, begin, first), self._base(i), self.schema)

    def read(self, cursor: tuple, one_file: bool = False) -> tuple[Record, tuple]:
        """The record at ``cursor`` (or the next one after blank lines) and the cursor after it;
        wraps round to the first file at the end (``one_file``: to the start of the cursor's file)."""
        i, off, line = cursor
        for _ in range(len(self.files) + 1):
            r = self._reader(i)
            if r.rows:
                if off < len(r):
                    return self._row(i, off), (i, off + 1, off + 1)
            else:
                got = r.read_line(off, line)
                if got is not None:
                    parsed, where, start, first, off, line = got
                    return Record(self.name, parsed, where, (i, start, first), self._base(i), self.schema), (i, off, line)
            i, off, line = (i if one_file else (i + 1) % len(self.files)), 0, 0
        raise DataError(f"data source '{self.name}' has no records")


def pass_quotas(s, sizes: list[int]) -> list[int]:
    """Records per pass of source ``s`` (a SourceConfig) whose files hold ``sizes`` records: [one quota], or
    under ``per_file`` one per file (the official rule: min(int(ratio x records_f), max_samples))."""
    cap = (lambda q: min(q, s.max_samples)) if s.max_samples is not None else (lambda q: q)
    if s.per_file:
        return [cap(int(s.ratio * n)) for n in sizes]
    return [cap(max(1, round(s.ratio * sum(sizes))))] if s.ratio > 0 else [0]


class Mixture:
    def __init__(self, data: DataConfig, seed: int):
        self.seed = seed
        for i, s in enumerate(data.sources):
            check_schema(s.format, f"data.sources[{i}].format")
        self.readers = {s.name: SourceReader(s.name, data.root, s.paths, s.media_root, s.format)
                        for s in data.sources if s.ratio > 0}
        # lanes: what a pass draws from, each with its quota and cursor: a source, or with per_file each of its
        # files (min(int(ratio x records_f), max_samples), as the official loader; a file whose share rounds
        # to 0 gives nothing)
        self.lane_quota, self.lane_of = {}, {}
        for s in data.sources:
            if s.ratio <= 0:
                continue
            quotas = pass_quotas(s, [len(r) for r in self.readers[s.name].readers])
            if s.per_file:
                for k, q in enumerate(quotas):
                    self._lane(f"{s.name}#{k}", s.name, k, q)
            else:
                self._lane(s.name, s.name, None, quotas[0])
        self.quota = {}  # records per pass by source
        for lane, q in self.lane_quota.items():
            self.quota[self.lane_of[lane][0]] = self.quota.get(self.lane_of[lane][0], 0) + q
        if not self.lane_quota:
            raise DataError("every data source's share per pass rounds to 0 records (ratio x records per file "
                            "under per_file); raise a ratio or max_samples")
        self.names = list(self.lane_quota)
        self.pass_index, self.draw = 0, 0
        self.taken = {n: 0 for n in self.names}
        self.cursor = {n: (self.lane_of[n][1] or 0, 0, 0) for n in self.names}

    def _lane(self, lane: str, source: str, file: int | None, quota: int) -> None:
        if quota > 0:
            self.lane_quota[lane], self.lane_of[lane] = quota, (source, file)

    @property
    def pass_size(self) -> int:
        return sum(self.lane_quota.values())

    def next(self) -> Record:
        if self.draw == self.pass_size:
            self.pass_index, self.draw = self.pass_index + 1, 0
            self.taken = {n: 0 for n in self.names}
        open_ = [(n, self.lane_quota[n] - self.taken[n]) for n in self.names if self.taken[n] < self.lane_quota[n]]
        x = random.Random(f"{self.seed}/{self.pass_index}/{self.draw}").random() * sum(r for _, r in open_)
        for name, remaining in open_:
            x -= remaining
            if x < 0:
                break
        source, file = self.lane_of[name]
        record, self.cursor[name] = self.readers[source].read(self.cursor[name], one_file=file is not None)
        self.taken[name] += 1
        self.draw += 1
        return record

    def read_at(self, source: str, cursor: tuple) -> Record:
        return self.readers[source].read(tuple(cursor))[0]

    def state_dict(self) -> dict:
        return {"pass": self.pass_index, "draw": self.draw, "taken": dict(self.taken),
                "cursor": {n: list(c) for n, c in self.cursor.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["taken"]) != set(self.names):
            raise DataError(f"the data state was saved with sources {sorted(state['taken'])}, but this stage "
                            f"reads {sorted(self.names)} (name#k: file k of a per_file source); resume with the "
                            f"same data.sources")
        self.pass_index, self.draw = int(state["pass"]), int(state["draw"])
        self.taken = {n: int(v) for n, v in state["taken"].items()}
        self.cursor = {n: tuple(c) for n, c in state["cursor"].items()}
