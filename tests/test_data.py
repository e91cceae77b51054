"""Template labels, packing (reset vs preserved positions), layout-independent batches, bad samples."""
from __future__ import annotations

import json

import pytest
import torch

from tests.synthetic import tiny_input
from lvita.config.schema import DataConfig, SourceConfig
from lvita.data.media import tile_grid
from lvita.data.stream import DataStream, own_rows, rank_micro_batches
from lvita.data.formats import normalise_messages
from lvita.data.template import IGNORE, SampleError, encode_conversation
from lvita.data.tokenizer import load_tokenizer, special_token_ids
from lvita.errors import PathError


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    t = load_tokenizer(tokenizer_dir)
    return t, special_token_ids(t)


def test_labels_only_on_assistant_content_and_im_end(tok):
    t, sp = tok
    msgs = normalise_messages({"conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                 {"from": "gpt", "value": "Red."}]})
    ids, targets = encode_conversation(msgs, t, sp, "You are a helpful assistant.", [[4]])
    learned = [ids[i + 1] for i, x in enumerate(targets) if x != IGNORE]
    assert t.decode(learned) == "Red.<|im_end|>"
    assert ids.count(sp["img_context"]) == 4 and ids.count(sp["img_start"]) == 1
    assert t.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<img>")
    assert targets[-1] == IGNORE and len(ids) == len(targets)


@pytest.mark.parametrize("sample, reason", [
    ({"messages": []}, "empty_conversation"),
    ({"id": 1}, "empty_conversation"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "malformed_message"),
])
def test_malformed_conversations(sample, reason):
    with pytest.raises(SampleError) as e:
        normalise_messages(sample)
    assert e.value.reason == reason


def _cfg(root, reset=True, same=True, seq=192, **kw) -> DataConfig:
    sources = kw.pop("sources", [SourceConfig("captions", ["captions.jsonl"]), SourceConfig("text", ["text.jsonl"])])
    return DataConfig(root=str(root), seq_length=seq, reset_position_ids=reset, same_source=same, sources=sources,
                      pack_buffer=kw.pop("pack_buffer", 8), **kw)


def _stream(tok, root, reset=True, same=True, seq=192, gb=4, seed=1, own_rows=None, log=None, **kw):
    t, sp = tok
    return DataStream(_cfg(root, reset, same, seq, **kw), tiny_input(t), global_batch=gb,
                      seed=seed, own_rows=own_rows, log=log or (lambda *a: None))


def test_reset_positions_restart_per_sample(tok, dataset_dir):
    s = _stream(tok, dataset_dir, reset=True)
    for seq in s.next_global_batch():
        assert seq.input_ids.shape == (192,)
        for x in seq.samples:
            assert seq.position_ids[x["start"]:x["end"]].tolist() == list(range(x["end"] - x["start"]))
        starts = [x["start"] for x in seq.samples] + ([192 - seq.pad] if seq.pad else [])
        assert seq.cu_seqlens == starts + [192]
        assert len({x["source"] for x in seq.samples}) == 1  # same_source
        assert seq.tiles.shape[0] * 16 == int((seq.input_ids == 5).sum())
        assert (seq.targets[192 - seq.pad:] == IGNORE).all()
    s.close()


def test_preserved_positions_run_over_the_sequence(tok, dataset_dir):
    s = _stream(tok, dataset_dir, reset=False, same=False)
    batch = s.next_global_batch() + s.next_global_batch()
    for seq in batch:
        assert seq.position_ids.tolist() == list(range(192)) and seq.cu_seqlens is None
    assert any(len({x["source"] for x in seq.samples}) > 1 for seq in batch)
    s.close()


def test_images_are_tiled_and_labels_follow_the_template(tok, dataset_dir):
    from PIL import Image

    s = _stream(tok, dataset_dir)
    for seq in s.next_global_batch():
        n = 0
        for plan in seq.plans:
            for m in plan.media:
                w, h = Image.open(m.ref).size
                cols, rows = tile_grid(w, h, 1, m.max_tiles, 112)
                assert m.tiles == cols * rows + (cols * rows > 1)
                n += m.tiles
        assert seq.tiles.shape == (n, 3, 112, 112) and seq.tiles.dtype == torch.uint8  # normalised on the device
    s.close()


def test_many_images_get_fewer_tiles_before_the_sample_is_dropped(tok, tmp_path):
    from PIL import Image

    (tmp_path / "im").mkdir()
    Image.new("RGB", (448, 224), "red").save(tmp_path / "im" / "wide.png")  # 4x2 grid + thumbnail = 9 tiles
    msg = [{"role": "user", "content": "<image>" * 4 + "compare"}, {"role": "assistant", "content": "same"}]
    with open(tmp_path / "m.jsonl", "w") as f:
        f.write(json.dumps({"id": "m", "images": ["im/wide.png"] * 4, "messages": msg}) + "\n")
    t, sp = tok
    stream = DataStream(_cfg(tmp_path, seq=512, sources=[SourceConfig("m", ["m.jsonl"])], max_tiles=8), tiny_input(t), 1, 0, log=lambda *a: None)
    plan = stream.plan(stream.mixture.next())
    assert len(plan.input_ids) <= 512
    assert [m.tiles for m in plan.media] == [3] * 4  # 8 -> 4 -> 2 tiles max: 2x1 grid + thumbnail fits
    with pytest.raises(SampleError, match="even at 1 tile"):
        DataStream(_cfg(tmp_path, seq=64, sources=[SourceConfig("m", ["m.jsonl"])]), tiny_input(t), 1, 0).plan(
            stream.mixture.read_at("m", (0, 0, 0)))


def test_ratios_give_exact_quotas_per_pass_and_walk_the_source(tmp_path):
    from lvita.data.sources import Mixture

    for name, n in (("a", 40), ("b", 200)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"i": i}) + "\n" for i in range(n))
    cfg = DataConfig(root=str(tmp_path), sources=[SourceConfig("a", ["a.jsonl"], ratio=2.0),
                                                  SourceConfig("b", ["b.jsonl"], ratio=0.25)])
    mix = Mixture(cfg, seed=5)
    assert mix.quota == {"a": 80, "b": 50} and mix.pass_size == 130
    got = [mix.next() for _ in range(4 * 130)]
    for p in range(4):
        part = got[p * 130:(p + 1) * 130]
        assert sum(r.source == "a" for r in part) == 80
        first = part[:65]  # the interleave is random but proportional: within 4 sigma on half a pass
        share = sum(r.source == "a" for r in first) / 65
        assert abs(share - 80 / 130) < 4 * (80 / 130 * 50 / 130 / 65) ** 0.5
    b = [r.raw["i"] for r in got if r.source == "b"]
    assert b == list(range(200))  # ratio 0.25: four passes read every record of b once, in order
    a = [r.raw["i"] for r in got if r.source == "a"]
    assert a == list(range(40)) * 8  # ratio 2: twice per pass
    other = Mixture(cfg, seed=6)
    assert [r.source for r in got[:130]] != [other.next().source for _ in range(130)]  # the seed matters


def test_sample_caps_give_min_of_ratio_times_records_and_cap_per_pass(tmp_path):
    """max_samples caps a source's records per pass at min(ratio x N, cap); with per_file the official loader's
    rule holds per data file: min(int(ratio x N_f), cap), each file read on (and wrapped) by itself."""
    from lvita.data.sources import Mixture

    for name, n in (("x1", 30), ("x2", 7), ("y", 50)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"f": name, "i": i}) + "\n" for i in range(n))
    cfg = DataConfig(root=str(tmp_path), sources=[
        SourceConfig("x", ["x1.jsonl", "x2.jsonl"], ratio=0.5, max_samples=10, per_file=True),
        SourceConfig("y", ["y.jsonl"], ratio=0.5, max_samples=20),
        SourceConfig("z", ["y.jsonl"], ratio=0.1, max_samples=20)])
    mix = Mixture(cfg, seed=3)
    # x: file 1 min(int(15), 10) = 10, file 2 min(int(3.5), 10) = 3; y: min(25, 20) = 20; z: min(5, 20) = 5
    assert mix.lane_quota == {"x#0": 10, "x#1": 3, "y": 20, "z": 5}
    assert mix.quota == {"x": 13, "y": 20, "z": 5} and mix.pass_size == 38
    got = [mix.next() for _ in range(3 * 38)]
    for p in range(3):
        part = got[p * 38:(p + 1) * 38]
        per_file = {f: sum(r.source == "x" and r.raw["f"] == f for r in part) for f in ("x1", "x2")}
        assert per_file == {"x1": 10, "x2": 3}
        assert sum(r.source == "y" for r in part) == 20 and sum(r.source == "z" for r in part) == 5
    assert [r.raw["i"] for r in got if r.raw["f"] == "x2"] == [0, 1, 2, 3, 4, 5, 6, 0, 1]  # wraps within x2
    assert [r.raw["i"] for r in got if r.raw["f"] == "x1"] == list(range(30))  # three passes walk x1 once
    state = mix.state_dict()
    again = Mixture(cfg, seed=3)
    again.load_state_dict(state)
    assert [(r.source, r.raw) for r in (mix.next() for _ in range(40))] == \
        [(r.source, r.raw) for r in (again.next() for _ in range(40))]


def test_same_source_file_packs_one_data_file_per_sequence():
    """data.same_source "file": a sequence holds samples of one data file (the official loader without
    --cross-dataset-joint); true: of one source; false: any."""
    from lvita.data.packer import Packer, SamplePlan

    def plan(source, file, n):
        return SamplePlan(source, f"{source}{file}", f"{source}{file}.jsonl:1", (file, 0, 0), [1] * n, [1] * n, [])

    samples = [plan("x", 0, 30), plan("x", 1, 30), plan("y", 0, 30), plan("x", 0, 30), plan("x", 1, 30)]
    packs = {}
    for mode in (True, "file", False):
        packer = Packer(100, 5, mode)
        chosen = [packer.add(s) for s in samples][-1]
        packs[mode] = sorted((s.source, s.cursor[0]) for s in chosen)
    assert packs["file"] == [("x", 0), ("x", 0)]
    assert packs[True] == [("x", 0), ("x", 0), ("x", 1)]
    assert packs[False] == [("x", 0), ("x", 1), ("y", 0)]  # the oldest that fill the room


def test_global_batches_do_not_depend_on_the_layout(tok, dataset_dir):
    full = _stream(tok, dataset_dir, gb=4)
    part = _stream(tok, dataset_dir, gb=4, own_rows=own_rows(1, 2, 1, 4))
    for _ in range(3):
        a, b = full.next_global_batch(), part.next_global_batch()
        assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets) for x, y in zip(a, b))
        assert [y.tiles is not None for y in b] == [False, True, False, True]
        for i in (1, 3):
            assert torch.equal(a[i].tiles, b[i].tiles)
    full.close(), part.close()


def test_layout_independent_micro_batches(tok, dataset_dir):
    s = _stream(tok, dataset_dir, gb=4)
    batch = s.next_global_batch()
    s.close()
    rows = {}
    for dp, micro in [(1, 1), (1, 2), (2, 1), (4, 1)]:
        got, scales = [], set()
        for r in range(dp):
            assert own_rows(r, dp, micro, 4) == [(m * dp + r) * micro + j for m in range(4 // (dp * micro))
                                                 for j in range(micro)]
            for (ids, _, _), (_, scale) in rank_micro_batches(batch, r, dp, micro):
                got += [tuple(x.tolist()) for x in ids]
                scales.add(float(scale) / (4 // micro))  # scale = micro-batches*ranks / labelled
        rows[(dp, micro)] = sorted(got)
        assert len(scales) == 1
    assert len({tuple(v) for v in rows.values()}) == 1


@pytest.mark.parametrize("same", [True, False])
def test_stream_resume_is_exact(tok, dataset_dir, same):
    a = _stream(tok, dataset_dir, gb=2, same=same)
    for _ in range(3):
        a.next_global_batch()
    state = a.state_dict()
    assert state["pending"], "the packer buffer must be part of the state"
    expect = [a.next_global_batch() for _ in range(12)]  # crosses pass boundaries
    assert a.mixture.pass_index >= 1
    b = _stream(tok, dataset_dir, gb=2, same=same)
    b.load_state_dict(state)
    got = [b.next_global_batch() for _ in range(12)]
    for x, y in zip(expect, got):
        for s, t in zip(x, y):
            assert torch.equal(s.input_ids, t.input_ids) and torch.equal(s.tiles, t.tiles)
    a.close(), b.close()


def test_directories_and_parquet_sources(tok, tmp_path, dataset_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(dataset_dir / "text.jsonl")]
    (tmp_path / "d" / "sub").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:10]), tmp_path / "d" / "a.parquet", row_group_size=4)
    with open(tmp_path / "d" / "sub" / "b.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[10:15])
    from lvita.data.sources import Mixture

    mix = Mixture(DataConfig(root=str(tmp_path), sources=[SourceConfig("t", ["d"])]), seed=0)
    ids = [mix.next().raw["id"] for _ in range(15)]
    assert ids == [r["id"] for r in rows[:10]] + [r["id"] for r in rows[10:15]]  # sorted by path: a.parquet, sub/b.jsonl
    assert mix.read_at("t", (0, 5, 5)).raw["id"] == rows[5]["id"]
    (tmp_path / "arr.jsonl").write_text("[" + json.dumps(rows[0]) + "]")  # an array, whatever the suffix
    assert Mixture(DataConfig(root=str(tmp_path), sources=[SourceConfig("x", ["arr.jsonl"])]), seed=0).next().raw == rows[0]
    with pytest.raises(PathError, match="data source 'y'"):
        Mixture(DataConfig(root=str(tmp_path), sources=[SourceConfig("y", ["nope.jsonl"])]), seed=0)


def _bad_dataset(root):
    from tests.conftest import write_dataset

    write_dataset(root, n_captions=8, n_text=8)
    (root / "images" / "corrupt.png").write_bytes(b"not a png")
    good = open(root / "images" / "0.png", "rb").read()
    (root / "images" / "truncated.png").write_bytes(good[:len(good) // 2])  # header fine, pixels not
    qa = lambda q, a="ok": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    bad = [
        "{not json",
        json.dumps({"id": "x1", "images": ["images/missing.png"], "messages": qa("<image>\nhi")}),
        json.dumps({"id": "x2", "images": ["images/0.png"], "messages": qa("<image> and <image>: one image")}),
        json.dumps({"id": "x3", "messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"id": "x4", "images": ["images/corrupt.png"], "messages": qa("<image>")}),
        json.dumps({"id": "x5", "messages": []}),
        json.dumps({"id": "x6", "messages": [{"role": "robot", "content": "beep"}]}),
        json.dumps({"id": "x7", "images": ["images/0.png"] * 3, "messages": qa("<image>" * 3)}),
        json.dumps({"id": "x8", "images": ["images/0.png"], "messages": qa("<image>" + " word" * 400)}),
        json.dumps({"id": "x9", "messages": qa("word " * 400, "late answer")}),
        json.dumps({"id": "x10", "images": ["images/truncated.png"], "messages": qa("<image>")}),
    ]
    with open(root / "captions.jsonl", "a") as f:
        f.writelines(line + "\n" for line in bad)
    return root


def test_every_bad_input_is_skipped_and_counted(tok, tmp_path):
    root = _bad_dataset(tmp_path)
    logged = []
    s = _stream(tok, root, gb=2, log=logged.append, max_images=2, max_skip_fraction=1.0,
                sources=[SourceConfig("captions", ["captions.jsonl"])], pack_buffer=2)
    for _ in range(6):
        s.next_global_batch()
    assert s.skipped_total == {"malformed_json": 1, "bad_media": 2, "placeholder_mismatch": 1,
                               "no_assistant_turn": 1, "empty_conversation": 1, "malformed_message": 1,
                               "too_many_images": 1, "too_long_multimodal": 1, "truncated_no_labels": 1,
                               "bad_media_at_decode": 1}
    assert "captions.jsonl:9" in logged[0] and "malformed_json" in logged[0]
    assert sum("skipped sample" in m for m in logged) == 5  # only the first few are reported
    assert any("truncated.png" in m and "labels dropped" in m for m in logged)
    s.close()


def test_too_many_bad_samples_stop_the_run(tok, tmp_path):
    from lvita.data.stream import DataError

    root = _bad_dataset(tmp_path)
    with open(root / "captions.jsonl", "a") as f:
        f.writelines("{bad\n" for _ in range(120))
    s = _stream(tok, root, gb=2, sources=[SourceConfig("captions", ["captions.jsonl"])])
    with pytest.raises(DataError, match="above data.max_skip_fraction=0.05"):
        for _ in range(50):
            s.next_global_batch()
    s.close()


def test_packing_fills_sequences(tok, dataset_dir):
    """Samples here are 40-110 tokens for 192-token sequences (coarse); demo stage 2 packs at >= 97%
    (benchmarks/packer.py)."""
    eff = {}
    for buffer in (1, 32):
        s = _stream(tok, dataset_dir, gb=8, same=False, reset=True, pack_buffer=buffer)
        seqs = [x for _ in range(4) for x in s.next_global_batch()]
        eff[buffer] = 1 - sum(x.pad for x in seqs) / (192 * len(seqs))
        s.close()
    assert eff[32] > 0.85 and eff[32] > eff[1] + 0.3, eff


def test_data_preview_and_stats_commands(tokenizer_dir, dataset_dir, tmp_path, capsys):
    from lvita.cli import main
    from tests.conftest import stage_dict, write_stage

    stage = str(write_stage(tmp_path / "s.json", stage_dict(tokenizer_dir, dataset_dir, tmp_path / "out")))
    assert main(["data", "preview", "--stage", stage, "--n", "3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert set(r) == {"length", "pad", "samples", "position_ids", "cu_seqlens"} and r["length"] == 192
        assert r["cu_seqlens"] == [s["start"] for s in r["samples"]] + ([192 - r["pad"]] if r["pad"] else []) + [192]
        assert set(r["samples"][0]) == {"source", "id", "start", "end", "image_tokens", "labels"}
        assert r["samples"][-1]["end"] == 192 - r["pad"]
    assert main(["data", "preview", "--stage", stage, "--n", "1"]) == 0
    assert "position ids restart at" in capsys.readouterr().out
    assert main(["data", "stats", "--stage", stage, "--n", "8"]) == 0
    out = capsys.readouterr().out
    assert "packing efficiency" in out and "captions" in out and "text" in out
    assert main(["data", "stats", "--stage", stage, "--set", "data.root=/nonexistent"]) == 2
