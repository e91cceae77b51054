"""Prediction files as users have them, read into the rows a scorer takes.

Owns reading predictions back for scoring and resuming: lvita's own ``predictions.jsonl`` (one
:func:`lvita.evaluation.items.prediction_row` per line: id, prediction, answer, choices, meta), a JSONL
of just ``{"id", "prediction"}`` (VLMEvalKit's ``index`` is read as ``id``), and VLMEvalKit's own result
file (``<model>_<dataset>.xlsx``, or a ``.tsv`` / ``.csv`` of it, with ``index`` and ``prediction``
columns). Rows with only an id and a prediction are joined to the benchmark's own items (answers,
options, categories come from the benchmark files, loaded without decoding any media).

    rows, report = scoring_rows(bench, Path("run/predictions.jsonl"))                       # lvita's own
    rows, report = scoring_rows(bench, Path("MyModel_MMStar.xlsx"), data=Path("LMUData/MMStar.tsv"))

A prediction cell is passed on as VLMEvalKit's pandas reads it (``str`` of the cell; an empty cell, which
pandas reads as NaN, becomes ""), so the scorer's own read-back rule (what VLMEvalKit's xlsx round trip
does to a prediction) applies once, the same way for every source. Trade-off: a whole table is read into
memory (the largest benchmark, MMBench, has a few thousand rows).
"""
from __future__ import annotations

import json
from pathlib import Path

from lvita.errors import PathError, UserError
from lvita.evaluation.items import Benchmark, Item, LoadOptions, prediction_row

TABLES = (".xlsx", ".tsv", ".csv")


def read_predictions(path: Path, cut_torn: bool = False) -> list[dict]:
    """The rows of a JSONL prediction file in file order (first row per id; ``index`` read as ``id``). A last
    line without its newline is a torn write: dropped (and cut from the file when ``cut_torn``). Any other
    bad line is a UserError naming the file and line."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    complete = data[:data.rfind(b"\n") + 1]
    if cut_torn and len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    rows, seen = [], set()
    for lineno, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if isinstance(row, dict) and "id" not in row and "index" in row:
                row = {"id": row.pop("index"), **row}
            if not isinstance(row, dict) or "id" not in row or "prediction" not in row:
                raise ValueError("a row must be an object with 'id' (or 'index') and 'prediction'")
        except ValueError as e:
            raise UserError(f"{path}:{lineno}: not a prediction row ({e}); remove the line or the file "
                            "to answer that item again") from None
        row["id"] = plain_id(row["id"])
        if row["id"] not in seen:
            seen.add(row["id"])
            rows.append(row)
    return rows


def plain_id(value) -> str:
    """An id as lvita's items carry it: a string; 12 and 12.0 (a numeric column) are "12"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def cell_text(value) -> str:
    """A prediction cell as VLMEvalKit's code sees it after pandas: ``str`` of it; NaN (an empty cell) -> ""."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def read_table(path: Path) -> list[dict]:
    """VLMEvalKit's result file -> [{"id", "prediction"}] in file order (first row per index)."""
    import pandas as pd

    try:
        if path.suffix == ".xlsx":
            df = pd.read_excel(path)
        else:
            df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    except ImportError as e:  # openpyxl is a dependency; a broken install says which module is missing
        raise UserError(f"--score-only {path}: cannot read .xlsx here ({e})") from None
    except Exception as e:  # pandas/openpyxl raise many types for a file that is not a table
        raise PathError(f"--score-only {path}: cannot read it as a table ({type(e).__name__}: {e})") from None
    if missing := [c for c in ("index", "prediction") if c not in df.columns]:
        raise PathError(f"--score-only {path}: no column {missing[0]!r} (columns: {', '.join(map(str, df.columns))});"
                        " expected VLMEvalKit's result file with 'index' and 'prediction'")
    rows, seen = [], set()
    for index, prediction in zip(df["index"].tolist(), df["prediction"].tolist()):
        key = plain_id(index)
        if key not in seen:
            seen.add(key)
            rows.append({"id": key, "prediction": cell_text(prediction)})
    return rows


def is_full_row(row: dict) -> bool:
    """A row lvita's driver wrote (it carries what the scorer needs), not just an id and a prediction."""
    return "answer" in row and "meta" in row


def scoring_rows(bench: Benchmark, path: Path, data: Path | None = None, work: Path | None = None):
    """(rows to score in the benchmark's item order, report) for a prediction file of any kind above.
    ``data``: the benchmark's files, needed unless every row is lvita's full row. The report counts
    ``unanswered`` items (in the benchmark, no prediction), ``unknown_ids`` (a prediction for no item) and the
    loader's skips."""
    path = Path(path)
    if not path.is_file():
        raise PathError(f"--score-only {path}: no such file (expected predictions.jsonl, an id/prediction JSONL "
                        "or VLMEvalKit's result .xlsx/.tsv/.csv)")
    given = read_table(path) if path.suffix in TABLES else read_predictions(path)
    if given and all(is_full_row(r) for r in given) and data is None:
        return given, {"source": "lvita predictions", "rows": len(given)}
    if data is None:
        raise UserError(f"--score-only {path}: its rows hold only ids and predictions; pass --data with the "
                        f"{bench.name} files to read answers, options and categories from")
    if not Path(data).exists():
        raise PathError(f"--data {data}: no such file or folder (the {bench.name} files)")
    by_id = {r["id"]: r["prediction"] for r in given}
    opts = LoadOptions(work=work or path.parent / f".{bench.name}-work", media=False)
    rows, unanswered, skipped = [], [], []
    for entry in bench.load(Path(data), opts):
        if not isinstance(entry, Item):
            skipped.append({"id": entry.id, "reason": entry.reason, "detail": entry.detail})
        elif entry.id in by_id:
            rows.append(prediction_row(entry, by_id.pop(entry.id)))
        else:
            unanswered.append(entry.id)
    return rows, {"source": "table" if path.suffix in TABLES else "id/prediction JSONL", "rows": len(given),
                  "unanswered": {"count": len(unanswered), "ids": unanswered[:20]},
                  "unknown_ids": {"count": len(by_id), "ids": list(by_id)[:20]},
                  "skipped_by_loader": {"count": len(skipped), "items": skipped[:20]}}
