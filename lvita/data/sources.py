"""Training sources read as streams, and the seeded mixture that interleaves them.

A source is named and lists paths under ``data.root``: JSONL files, directories of them
(``*.jsonl`` found recursively, sorted), or parquet files (one sample per row, same keys). Records
are read lazily from a cursor (file, byte offset or row, line), so millions of lines are never
held in memory, and any record can be read again from its cursor (that is how the packer's
buffer is restored on resume). Media paths in a record are relative to its file's directory.

The mixture works in passes. In each pass source s contributes ``round(ratio_s x records_s)``
records (at least one when the ratio is above 0; capped by ``max_samples``), read on from where
the previous pass stopped and wrapping round the end, so a ratio of 0.1 walks through the whole
source in ten passes and a ratio of 2 reads it twice per pass. Which source supplies the k-th
record of a pass is a seeded draw weighted by the quotas still open, so the order depends only on
the seed and the config (never on the parallel layout), and the state to resume is a few integers.

    mix = Mixture(cfg.data, seed=1234)
    record = mix.next()          # Record(source, raw line or row, where "file:line", cursor, base dir)
    mix.state_dict(); mix.load_state_dict(state)

Trade-off: records of one source come in file order (shuffle big files once beforehand); the
interleave of sources is random. Counting a JSONL source's records scans it once at start-up.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lvita.config import DataConfig


@dataclass
class Record:
    source: str
    raw: object  # parsed JSON (dict expected), or a JSONDecodeError for a malformed line
    where: str  # "file:line" or "file:row N", for error messages
    cursor: tuple  # (file index, offset or row, line): read_at(cursor) gives this record again
    base: Path  # media paths are relative to this directory


class SourceReader:
    def __init__(self, name: str, root: str, paths: list[str]):
        self.name = name
        self.files: list[Path] = []
        for p in paths:
            full = Path(p) if Path(p).is_absolute() else Path(root) / p
            if full.is_dir():
                found = sorted(full.rglob("*.jsonl")) + sorted(full.rglob("*.parquet"))
                if not found:
                    raise FileNotFoundError(f"data source '{name}': directory {full} has no *.jsonl or *.parquet")
                self.files += found
            elif full.is_file():
                self.files.append(full)
            else:
                raise FileNotFoundError(f"data source '{name}': {full} does not exist")
        self._handle: tuple[int, object] | None = None
        self._parquet: dict[int, object] = {}  # open ParquetFile per file index
        self._parquet_cache: dict[tuple[int, int], list[dict]] = {}
        self.size = sum(self._count(i) for i in range(len(self.files)))
        if self.size == 0:
            raise ValueError(f"data source '{name}' has no records in {[str(f) for f in self.files]}")

    def _is_parquet(self, i: int) -> bool:
        return self.files[i].suffix == ".parquet"

    def _parquet_file(self, i: int):
        if i not in self._parquet:
            import pyarrow.parquet as pq

            self._parquet[i] = pq.ParquetFile(self.files[i])
        return self._parquet[i]

    def _count(self, i: int) -> int:
        if self._is_parquet(i):
            return self._parquet_file(i).metadata.num_rows
        with open(self.files[i], "rb") as f:
            head = f.read(64).lstrip()
            if head.startswith(b"["):
                raise ValueError(f"{self.files[i]}: a JSON array; sources must be JSON lines (one object per "
                                 f"line), e.g. convert with: jq -c '.[]' FILE > FILE.jsonl")
            f.seek(0)
            return sum(1 for line in f if line.strip())

    def start(self) -> tuple:
        return (0, 0, 0)

    def read(self, cursor: tuple) -> tuple[Record, tuple]:
        """The record at ``cursor`` (or the next one after blank lines) and the cursor after it;
        wraps round to the first file at the end."""
        i, off, line = cursor
        for _ in range(len(self.files) + 1):
            if self._is_parquet(i):
                if off < self._parquet_file(i).metadata.num_rows:
                    return self._parquet_row(i, off), (i, off + 1, off + 1)
            else:
                f = self._file(i)
                f.seek(off)
                while True:
                    raw = f.readline()
                    if not raw:
                        break
                    start, off, line = off, off + len(raw), line + 1
                    if raw.strip():
                        where = f"{self.files[i]}:{line}"
                        try:
                            parsed = json.loads(raw)
                        except json.JSONDecodeError as e:
                            parsed = e
                        return Record(self.name, parsed, where, (i, start, line - 1), self.files[i].parent), \
                            (i, off, line)
            i, off, line = (i + 1) % len(self.files), 0, 0
        raise ValueError(f"data source '{self.name}' has no records")

    def _file(self, i: int):
        if self._handle is None or self._handle[0] != i:
            if self._handle is not None:
                self._handle[1].close()
            self._handle = (i, open(self.files[i], "rb"))
        return self._handle[1]

    def _parquet_row(self, i: int, row: int) -> Record:
        pf = self._parquet_file(i)
        start = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row < start + n:
                if (i, g) not in self._parquet_cache:
                    self._parquet_cache = {(i, g): pf.read_row_group(g).to_pylist()}  # one group at a time
                raw = self._parquet_cache[(i, g)][row - start]
                return Record(self.name, raw, f"{self.files[i]}:row {row}", (i, row, row), self.files[i].parent)
            start += n
        raise IndexError(f"{self.files[i]} has no row {row}")


class Mixture:
    def __init__(self, data: DataConfig, seed: int):
        self.seed = seed
        self.readers = {s.name: SourceReader(s.name, data.root, s.paths) for s in data.sources if s.ratio > 0}
        self.quota = {}
        for s in data.sources:
            if s.ratio > 0:
                q = max(1, round(s.ratio * self.readers[s.name].size))
                self.quota[s.name] = min(q, s.max_samples) if s.max_samples is not None else q
        self.names = list(self.quota)
        self.pass_index, self.draw = 0, 0
        self.taken = {n: 0 for n in self.names}
        self.cursor = {n: self.readers[n].start() for n in self.names}

    @property
    def pass_size(self) -> int:
        return sum(self.quota.values())

    def next(self) -> Record:
        if self.draw == self.pass_size:
            self.pass_index, self.draw = self.pass_index + 1, 0
            self.taken = {n: 0 for n in self.names}
        open_ = [(n, self.quota[n] - self.taken[n]) for n in self.names if self.taken[n] < self.quota[n]]
        x = random.Random(f"{self.seed}/{self.pass_index}/{self.draw}").random() * sum(r for _, r in open_)
        for name, remaining in open_:
            x -= remaining
            if x < 0:
                break
        record, self.cursor[name] = self.readers[name].read(self.cursor[name])
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
            raise ValueError(f"the data state was saved with sources {sorted(state['taken'])}, but this stage "
                             f"reads {sorted(self.names)}; resume with the same data.sources")
        self.pass_index, self.draw = int(state["pass"]), int(state["draw"])
        self.taken = {n: int(v) for n, v in state["taken"].items()}
        self.cursor = {n: tuple(c) for n, c in state["cursor"].items()}
