"""Hostile benchmark files: every published benchmark's loader, fed seeded mutations of its own layout.

Each record ends as an Item or a counted Skip (one per record), and a file lvita cannot read at all is
one UserError; any other exception is a bug. The mutations: cells deleted, or replaced by None, NaN,
numbers, lists, dicts, empty or odd strings, undecodable base64 images, image cells naming other rows,
the question column dropped, the file replaced by random bytes. ``LVITA_HOSTILE_SEED`` (default 0) picks
another batch; the first found bug (Video-MME's ``options`` column read back as floats, a NaN iterated) is
kept as its own case below.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lvita.errors import UserError
from lvita.evaluation.items import Item, LoadOptions, Skip
from lvita.evaluation.video import VIDEO_BENCHMARKS
from lvita.evaluation.videomme import REQUIRED
from lvita.evaluation.vlmevalkit import BENCHMARKS as IMAGE_BENCHMARKS
from tests.layouts import write_video

SEED = int(os.environ.get("LVITA_HOSTILE_SEED", "0"))
ODD = [None, "", "x", "A", "B. two", 0, 1, -3, 2.5, float("nan"), [], ["a"], ["a", "b", "c"], {}, {"a": 1}, True,
       "1e309", "\u202e", "nan", "[", "<image 1>"]


def _load(bench, root, tmp_path, media: bool) -> list | None:
    """The loader's output (checked to be Items and Skips), or None when it refused the file (UserError)."""
    try:
        got = list(bench.load(root, LoadOptions(work=tmp_path / f"work-{media}", media=media)))
    except UserError:
        return None
    assert all(isinstance(x, (Item, Skip)) for x in got), got
    return got


def _mutated(rng, good: dict) -> dict:
    rec = dict(good)
    for key in list(rec):
        r = rng.random()
        if r < 0.1:
            del rec[key]
        elif r < 0.3:
            rec[key] = ODD[rng.integers(len(ODD))]
    return rec


def _png(rng) -> str:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("name", sorted(IMAGE_BENCHMARKS))
def test_vlmevalkit_tsv_loaders_account_for_every_row(name, tmp_path):
    bench, refused, rows_seen = IMAGE_BENCHMARKS[name], 0, 0
    for case in range(40):
        rng = np.random.default_rng([SEED, case])
        n = int(rng.integers(1, 7))
        cols = [c for c in ("index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "split")
                if c in ("index", "question") or rng.random() < 0.8]
        if rng.random() < 0.05:
            cols.remove("question")
        rows = []
        for i in range(n):
            odd = lambda: str(ODD[rng.integers(len(ODD))])  # noqa: E731
            row = {c: odd() if rng.random() < 0.3 else f"text {c}" for c in cols}
            row["index"] = str(i) if rng.random() < 0.8 else odd()
            if "image" in cols:  # a PNG, another row's index, a list cell, or undecodable base64
                row["image"] = [_png(rng), str(rng.integers(-2, n + 2)), "['0', '1']",
                                base64.b64encode(rng.bytes(16)).decode(), odd()][rng.integers(5)]
            if "question" in cols and rng.random() < 0.5:
                row["question"] = "What is in <image 1>?"
            if "answer" in cols:
                row["answer"] = ["A", "B", "Yes", "No", "", "hello", "['a', 'b']", "E"][rng.integers(8)]
            rows.append(row)
        path = tmp_path / f"{case}.tsv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols, delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)
        if rng.random() < 0.05:
            path.write_bytes(rng.bytes(64))
        for media in (True, False):
            got = _load(bench, path, tmp_path / str(case), media)
            if got is None:
                refused += 1
                continue
            assert len(got) == len(pd.read_csv(path, sep="\t")), (case, [getattr(x, "reason", "item") for x in got])
            rows_seen += len(got)
    assert rows_seen > 100 and refused < 20  # the batch reached the loaders (most files are readable)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clip") / "v.mp4", frames=8, fps=4, size=32)


def _video_layout(name: str, root, clip, rng, n: int):
    """One video benchmark's folder with ``n`` mutated records -> (the --data path, records written)."""
    if name == "MVBench":
        (root / "json").mkdir(parents=True)
        (root / "video" / "star" / "Charades_v1_480").mkdir(parents=True)
        shutil.copy(clip, root / "video" / "star" / "Charades_v1_480" / "a.mp4")
        good = {"video": "a.mp4", "question": "Next?", "candidates": ["sit", "run"], "answer": "run", "start": 1, "end": 2}
        recs = [_mutated(rng, good) for _ in range(n)]
        (root / "json" / "action_sequence.json").write_text(json.dumps(recs))
        return root, recs
    if name == "LongVideoBench":
        (root / "videos").mkdir(parents=True)
        shutil.copy(clip, root / "videos" / "v1.mp4")
        good = {"video_path": "v1.mp4", "question": "Who?", "candidates": ["a", "b", "c"], "correct_choice": 1,
                "duration_group": 15, "question_category": "S2E"}
        recs = [dict(_mutated(rng, good), id=f"v1_{i}") for i in range(n)]
        (root / "lvb_val.json").write_text(json.dumps(recs))
        return root, recs
    if name == "MLVU":
        (root / "MLVU" / "json").mkdir(parents=True)
        (root / "MLVU" / "video" / "1_plotQA").mkdir(parents=True)
        shutil.copy(clip, root / "MLVU" / "video" / "1_plotQA" / "p.mp4")
        good = {"video": "p.mp4", "duration": 8, "question": "What?", "candidates": ["x", "y"], "answer": "y",
                "question_type": "plotQA"}
        recs = [_mutated(rng, good) for _ in range(n)]
        (root / "MLVU" / "json" / "1_plotQA.json").write_text(json.dumps(recs))
        return root, recs
    (root / "video").mkdir(parents=True)
    (root / "videomme").mkdir()
    shutil.copy(clip, root / "video" / "vid1.mp4")
    good = dict(video_id="001", duration="short", domain="Knowledge", sub_category="Astronomy", task_type="OCR",
                videoID="vid1", question="How many?", options=["A. one", "B. two"], answer="B")
    # parquet columns hold one type: odd strings and missing cells (NaN) here, odd option lists below
    strings = [str(v) for v in ODD] + [None]
    recs = []
    for i in range(n):
        rec = {k: (strings[rng.integers(len(strings))] if rng.random() < 0.25 else v) for k, v in good.items()
               if k != "options" and rng.random() > 0.05}
        options = [["A. one", "B. two"], ["one", "two"], [], ["B. x", "A. y"], ["A. x"], None][rng.integers(6)]
        if options is not None:
            rec["options"] = options
        recs.append(dict(rec, question_id=f"q{i}"))
    if rng.random() < 0.2:  # a column of numbers where the option lists belong (it reads back as floats)
        recs = [dict(r, options=[float("nan"), 2.5][rng.integers(2)]) for r in recs]
    return root, recs


def _write_parquet(root, recs) -> bool:
    try:  # pyarrow refuses some mixes of types in one column: such a batch is not a Video-MME file at all
        pd.DataFrame(recs).to_parquet(root / "videomme" / "test-00000-of-00001.parquet")
    except Exception:
        return False
    return True


@pytest.mark.parametrize("name", sorted(VIDEO_BENCHMARKS))
def test_video_loaders_account_for_every_record(name, clip, tmp_path):
    bench, seen = VIDEO_BENCHMARKS[name], 0
    for case in range(25):
        rng = np.random.default_rng([SEED, case, 1])
        root, recs = _video_layout(name, tmp_path / str(case), clip, rng, int(rng.integers(1, 6)))
        if name == "Video-MME" and not _write_parquet(root, recs):
            continue
        for media in (True, False):
            got = _load(bench, root, tmp_path / f"w{case}", media)
            if got is None:  # only Video-MME refuses a readable file: a required column absent from every row
                assert name == "Video-MME" and set(REQUIRED) - set(pd.DataFrame(recs).columns), (name, case)
                continue
            assert len(got) == len(recs), (case, [getattr(x, "reason", "item") for x in got])
            seen += len(got)
    assert seen > 50


def test_videomme_options_column_of_numbers_is_skipped_per_row(clip, tmp_path):
    """Found by the generator above: an options column of numbers (a missing cell reads as NaN) crashed."""
    root = tmp_path / "vmme"
    (root / "video").mkdir(parents=True)
    (root / "videomme").mkdir()
    shutil.copy(clip, root / "video" / "vid1.mp4")
    row = dict(video_id="001", duration="short", domain="K", sub_category="A", task_type="OCR", videoID="vid1",
               question="How many?", answer="B")
    pd.DataFrame([dict(row, question_id="q0", options=float("nan")), dict(row, question_id="q1", options=2.5)]
                 ).to_parquet(root / "videomme" / "test-00000-of-00001.parquet")  # a float64 options column
    got = list(VIDEO_BENCHMARKS["Video-MME"].load(root, LoadOptions(work=tmp_path / "w")))
    assert [(type(x).__name__, x.reason) for x in got] == [("Skip", "bad_record")] * 2
