"""``lvita data show --save`` against released Long-VITA's own data code (fixtures, no official code here).

``tests/fixtures/longvita_official/data_fixtures.json`` holds what the official ``preprocess`` and
``ImageProcessor`` produced (``make_data_fixtures.py`` there: versions, settings, how to rerun) for
the records ``inputs.write_inputs`` writes: a square, a wide, a tall and a one-tile image, three
images in two turns, a video file, a frame folder, text with and without a system turn. This test
writes the same files, runs ``lvita data show --id ... --save`` on each through the real CLI entry
point (in this process) and compares: ids and labels exactly, the tiles' statistics within 1e-3.
"""
from __future__ import annotations

from lvita.model.formats import LONGVITA
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "longvita_official"
sys.path.insert(0, str(FIXTURES))
from inputs import MAX_FPS, MAX_FRAMES, MAX_TILES, tile_stats, write_inputs  # noqa: E402

OFFICIAL = json.loads((FIXTURES / "data_fixtures.json").read_text())
# Tile statistics (per tile and channel: sum, row- and column-weighted sums over 448 x 448 pixels of
# normalised float32 values). Noise floor: both sides normalise the same uint8 pixels in float32
# ((x/255 - mean)/std), at most an ulp (~2.4e-7) apart per pixel; measured difference 0.0.
# Bug signal: one pixel one level off moves a sum by 1/255/0.229 = 0.017; a padding colour off by
# one level (124 instead of 123) by ~1100 on a padded frame; a wrong tile order or resampling by 1e2-1e5.
TILE_TOL = 1e-3


def _unruns(runs) -> list[int]:
    return [t for t, n in runs for _ in range(n)]


@pytest.fixture(scope="module")
def official_stage(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("official")
    write_inputs(root / "data")
    stage = root / "stage.json"
    stage.write_text(json.dumps({
        "name": "official", "output_dir": str(root / "out"), "precision": "fp32",
        "deepspeed": "ds_configs/pipeline_fp32_cpu.json",
        "model": {"preset": "longvita-14b", "tokenizer": str(tokenizer_dir)},  # 448 px tiles, 256 tokens
        "train": {"global_batch": 1, "micro_batch": 1},
        "data": {"root": str(root / "data"), "seq_length": 32768, "max_tiles": MAX_TILES,
                 "max_frames": MAX_FRAMES, "video_fps": float(MAX_FPS),
                 "sources": [{"name": "released", "paths": ["records.jsonl"]}]}}))
    return stage


def test_the_fixture_tokenizer_is_the_one_the_tests_build(tokenizer_dir):
    from lvita.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir, LONGVITA)
    items = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest() == \
        OFFICIAL["vocab_fingerprint"], ("the demo tokenizer changed since the fixtures were made: rerun "
                                         "tests/fixtures/longvita_official/make_data_fixtures.py")


@pytest.mark.parametrize("record", sorted(OFFICIAL["records"]))
def test_data_show_saves_what_the_official_code_encodes(official_stage, tmp_path, capsys, record):
    from lvita.cli import main

    out = tmp_path / f"{record}.npz"
    assert main(["data", "show", "--stage", str(official_stage), "--id", record, "--save", str(out)]) == 0
    got = np.load(out)
    want = OFFICIAL["records"][record]
    assert got["input_ids"].tolist() == _unruns(want["input_ids"])
    assert got["labels"].tolist() == _unruns(want["labels"])
    assert got["position_ids"].tolist() == list(range(len(got["input_ids"])))
    assert got["pixel_values"].dtype == np.float32
    stats = np.asarray(tile_stats(got["pixel_values"])) if len(got["pixel_values"]) else np.zeros((0, 9))
    assert stats.shape == (len(want["tiles"]), 9)
    if len(stats):
        assert np.abs(stats - np.asarray(want["tiles"])).max() <= TILE_TOL
    text = capsys.readouterr().out
    assert f"record {record} of source 'released'" in text


def test_data_show_prints_collapsed_runs_and_trained_spans(official_stage, capsys):
    from lvita.cli import main

    assert main(["data", "show", "--stage", str(official_stage), "--id", "wide"]) == 0
    text = capsys.readouterr().out
    body = text.split("---\n", 1)[1]
    assert body.startswith("<|im_start|>user\n<img><IMG_CONTEXT>x256</img>\n"
                           + "<patch><PATCH_CONTEXT>x256</patch>" * 3 + "\nDescribe")
    assert "<|im_start|>assistant\n\u27e6A wide strip.<|im_end|>\n\u27e7" in body
    assert main(["data", "show", "--stage", str(official_stage), "--source", "released", "--index", "6"]) == 0
    assert "<vid><VID_CONTEXT>x256</vid>" * 64 in capsys.readouterr().out  # the frame folder: 64 frames


@pytest.mark.parametrize("args, message", [
    (["--id", "nope"], "--id nope: no record with that id in sources released"),
    (["--index", "9"], "--index 9: source 'released' has 9 records (0..8)"),
    (["--source", "other", "--index", "0"], "--source other: no such source; the stage has released"),
    (["--id", "wide", "--set", "data.seq_length=100"], "too_long_multimodal"),
])
def test_data_show_bad_input_is_one_error_line_and_exit_2(official_stage, capsys, args, message):
    from lvita.cli import main

    assert main(["data", "show", "--stage", str(official_stage)] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lvita data show: error: ") and message in err[0], err
