"""Row-addressable files: parquet, arrow, JSON arrays, JSON lines; and which files a source path names.

Owns opening one data file and reading record k (or the line at a byte offset) from it, and the
rules that turn a source's ``paths`` into a sorted list of files:

- a file; a glob (``the_cauldron/*/train-*.parquet``); a directory, searched recursively for
  ``*.jsonl``, ``*.json``, ``*.parquet``, ``*.arrow`` (hidden folders such as ``.cache`` and the
  ``datasets`` metadata files skipped), sorted by path;
- a Hugging Face dataset directory: one written by ``datasets.save_to_disk`` (its ``*.arrow``
  shards, in order), a ``DatasetDict`` (its ``train`` split), or a downloaded dataset repository
  (parquet/json/arrow files in subfolders, e.g. the_cauldron's ``<subset>/train-*.parquet``).

A reader holds its file open only while it is being read: ``close()`` is called when the source
moves on to another file, so a source of thousands of parquet shards never holds thousands of
descriptors (arrow shards stay memory-mapped). Readers: ``JsonLines`` (sequential, cursor = byte
offset and line), ``JsonArray`` (:mod:`lvita.data.jsonarray`), ``ParquetRows`` (pyarrow: one
row group at a time, the row converted alone), ``ArrowRows`` (``datasets.Dataset.from_file``:
memory-mapped, every row addressable). Images stored with the ``datasets`` Image feature come back as
``{"bytes": ..., "path": ...}`` dicts.

Trade-off: parquet is read with pyarrow rather than ``datasets.load_dataset``, which would first
copy the whole dataset (hundreds of GB for LLaVA-OneVision) into an arrow cache; a parquet row
group is the unit of reading, so each reader holds one decoded row group (tens to hundreds of MB
for image sets) at a time.
"""
from __future__ import annotations

import bisect
import glob
import json
from pathlib import Path

from lvita.data.jsonarray import JsonArray, is_json_array
from lvita.errors import PathError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
METADATA = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"}


def source_files(name: str, root: str, paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else Path(root) / p
        if glob.has_magic(str(full)):
            matches = [Path(m) for m in sorted(glob.glob(str(full), recursive=True))]
            if not matches:
                raise PathError(f"data source '{name}': nothing matches {full}")
        elif full.exists():
            matches = [full]
        else:
            raise PathError(f"data source '{name}': {full} does not exist")
        for m in matches:
            found = _in_directory(name, m) if m.is_dir() else [m]
            if not found:
                raise PathError(f"data source '{name}': directory {m} has no *.jsonl, *.json, *.parquet "
                                f"or *.arrow files")
            files += found
    return files


def _in_directory(name: str, d: Path) -> list[Path]:
    if (d / "dataset_dict.json").is_file():  # a DatasetDict written by save_to_disk
        splits = json.loads((d / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise PathError(f"data source '{name}': {d} is a DatasetDict with splits {splits} and no "
                            f"'train'; name one split's folder in paths, e.g. {d / (splits or ['x'])[0]}")
        d = d / "train"
    if (d / "state.json").is_file():  # one Dataset written by save_to_disk: its shards in order
        shards = [d / s["filename"] for s in json.loads((d / "state.json").read_text()).get("_data_files", [])]
        if shards:
            return shards
    return sorted((f for f in d.rglob("*") if f.suffix in DATA_SUFFIXES and f.is_file() and f.name not in METADATA
                   and not any(part.startswith(".") for part in f.relative_to(d).parts)),
                  key=lambda f: f.relative_to(d).as_posix())


def open_file(path: Path, size: int | None = None):
    """The reader for one data file (``size``: a JSON-lines file's known record count, to skip the scan)."""
    if path.suffix == ".parquet":
        return ParquetRows(path)
    if path.suffix == ".arrow":
        return ArrowRows(path)
    return JsonArray(path) if is_json_array(path) else JsonLines(path, size)


class JsonLines:
    """JSON lines read sequentially; ``size`` counts non-blank lines (one scan at start-up)."""

    rows = False

    def __init__(self, path: Path, size: int | None = None):
        self.path, self._f = Path(path), None
        if size is None:
            with open(self.path, "rb") as f:
                size = sum(1 for line in f if line.strip())
        self.size = size

    def __len__(self) -> int:
        return self.size

    def reopen(self) -> "JsonLines":
        return JsonLines(self.path, self.size)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def read_line(self, off: int, line: int):
        """-> (parsed or JSONDecodeError, where, start offset, line index, next offset, next line),
        or None at the end of the file."""
        if self._f is None:
            self._f = open(self.path, "rb")
        self._f.seek(off)
        while True:
            raw = self._f.readline()
            if not raw:
                return None
            start, off, line = off, off + len(raw), line + 1
            if raw.strip():
                try:
                    parsed = json.loads(raw)
                # not UTF-8, or nested too deep for the parser: the planner skips it as malformed_json
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                    parsed = e
                return parsed, f"{self.path}:{line}", start, line - 1, off, line


class ParquetRows:
    rows = True

    def __init__(self, path: Path, starts: list[int] | None = None):
        self.path, self.pf = Path(path), None  # opened while this file is being read (close() frees it)
        if starts is None:
            import pyarrow.parquet as pq

            with pq.ParquetFile(self.path) as pf:  # row-group sizes from the footer only
                starts = [0]
                for g in range(pf.metadata.num_row_groups):
                    starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        self.starts = starts
        self._group: tuple[int, object] | None = None

    def __len__(self) -> int:
        return self.starts[-1]

    def reopen(self) -> "ParquetRows":
        return ParquetRows(self.path, self.starts)

    def close(self) -> None:
        if self.pf is not None:
            self.pf.close()
        self.pf, self._group = None, None

    def read(self, row: int) -> dict:
        g = bisect.bisect_right(self.starts, row) - 1
        if self.pf is None:
            import pyarrow.parquet as pq

            self.pf = pq.ParquetFile(self.path)
        if self._group is None or self._group[0] != g:
            self._group = (g, self.pf.read_row_group(g))
        return self._group[1].slice(row - self.starts[g], 1).to_pylist()[0]


class ArrowRows:
    rows = True

    def __init__(self, path: Path, table=None):
        self.path = Path(path)
        if table is None:
            import datasets

            table = datasets.Dataset.from_file(str(self.path)).data.table  # memory-mapped pyarrow Table
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def reopen(self) -> "ArrowRows":
        return ArrowRows(self.path, self.table)  # immutable and memory-mapped: shared by threads

    def close(self) -> None:
        pass  # the memory map stays (pages are the OS's to drop)

    def read(self, row: int) -> dict:
        return self.table.slice(row, 1).to_pylist()[0]
