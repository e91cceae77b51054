"""Every published layout of Table 1's data (tests/layouts.py): image tokens, labels, skip reasons,
image modes, JSON-array index caching, Hugging Face directories, exact resume, and the CLI."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lvita.data.planned import PlannedImage
from tests.synthetic import tiny_input
from lvita.config.schema import ConfigError, DataConfig, SourceConfig
from lvita.data.media import image_tiles, tile_count
from lvita.data.plan import Embedded, Planner
from lvita.data.sources import Mixture
from lvita.data.stream import DataStream
from lvita.data.template import IGNORE, SampleError
from lvita.data.tokenizer import load_tokenizer, special_token_ids
from lvita.errors import PathError
from tests.layouts import write_layouts

TILE, TPT = 112, 16


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    sources, expect = write_layouts(root)
    return root, sources, expect


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    t = load_tokenizer(tokenizer_dir)
    return t, special_token_ids(t)


def _data(root, sources, **kw) -> DataConfig:
    kw = {"seq_length": 512, "max_frames": 4, "pack_buffer": 4, "max_skip_fraction": 1.0, **kw}
    return DataConfig(root=str(root), sources=[SourceConfig(**s) for s in sources], **kw)


def _records(mix, name):
    reader = mix.readers[name]
    cursor = reader.start()
    for _ in range(reader.size):
        rec, cursor = reader.read(cursor)
        yield rec


def _size(planner, mix, ref):
    src = planner.media_source(ref, mix.read_at)
    with Image.open(src) as im:
        return im.size


def test_every_layout_gives_the_right_image_tokens_labels_and_skip_reasons(layouts, tok):
    root, sources, expect = layouts
    t, sp = tok
    cfg = _data(root, sources)
    mix, planner = Mixture(cfg, 0), Planner(cfg, tiny_input(t))
    seen, cauldron = {}, []
    for s in sources:
        for rec in _records(mix, s["name"]):
            try:
                plan = planner.plan(rec)
            except (SampleError, Exception) as e:  # noqa: BLE001 - the reason is what is asserted
                seen[rec.raw.get("id")] = (getattr(e, "reason", "bad_media"), None)
                continue
            learned = t.decode([plan.input_ids[i + 1] for i, x in enumerate(plan.targets) if x != IGNORE])
            assert learned.endswith("<|im_end|>")
            answer = learned[: -len("<|im_end|>")]
            # image tokens: 16 per planned tile, each image / frame in its own <img> ... </img>
            assert plan.input_ids.count(sp["img_context"]) == TPT * plan.n_tiles
            groups = sum(1 if isinstance(m, PlannedImage) else m.frames for m in plan.media)
            assert plan.input_ids.count(sp["img_start"]) == plan.input_ids.count(sp["img_end"]) == groups
            n_images = sum(isinstance(m, PlannedImage) for m in plan.media)
            for m in plan.media:
                if isinstance(m, PlannedImage):
                    assert m.max_tiles == max(1, 12 // n_images)
                    assert m.tiles == tile_count(*_size(planner, mix, m.ref), 1, m.max_tiles, TILE)
                else:  # 8 frames at 4 fps -> 2 s at 1 fps -> 2 frames; 5 frame files -> max_frames 4
                    assert m.frames == (4 if "frames" in str(m.ref) else 2)
            if s["name"] in ("recap", "onevision", "cauldron"):
                assert all(isinstance(m.ref, Embedded) for m in plan.media)
            rid = rec.raw.get("id") or ("text:" + answer if s["name"] == "text" else None)
            if s["name"] == "cauldron":
                cauldron.append((answer, plan.n_tiles, len(plan.media)))
                continue
            outcome = "bad_media_at_decode" if rid == "ll-truncated" else "ok"
            seen[rid] = (outcome, answer)
            if rid in ("ll-noph", "ll-multi", "rc-0", "ov-0", "vid-0"):  # the placeholder opens the first user turn
                first_user = t.decode(plan.input_ids).split("<|im_start|>user\n", 1)[1]
                assert first_user.startswith("<img>")
    cd = {k: v for k, v in expect.items() if k.startswith("cd-")}
    assert [c[0] for c in cauldron] == [cd["cd-0"][1], cd["cd-1"][1]]
    assert [c[2] for c in cauldron] == [1, 2]  # one <image> inserted per image of `images`
    assert seen == {k: v for k, v in expect.items() if not k.startswith("cd-")}


def test_text_forms_fold_context_input_and_system_like_their_cards(layouts, tok):
    root, sources, _ = layouts
    t, sp = tok
    cfg = _data(root, [s for s in sources if s["name"] == "text"])
    mix, planner = Mixture(cfg, 0), Planner(cfg, tiny_input(t))
    texts = [t.decode(planner.plan(r).input_ids) for r in _records(mix, "text")]
    dolly = next(x for x in texts if "Summarise." in x)
    assert "<|im_start|>user\nSummarise.\n\nDolly is a sheep.<|im_end|>" in dolly
    alpaca = next(x for x in texts if "Read the paper." in x)
    assert "user\nRead the paper.\n\nA long paper.<|im_end|>" in alpaca
    hermes = next(x for x in texts if "Paris." in x)
    assert hermes.startswith("<|im_start|>system\nYou are wise.<|im_end|>")  # the record's own system turn
    lima = next(x for x in texts if "Bye?" in x)
    assert lima.count("<|im_start|>assistant") == 2 and lima.count("<|im_start|>user") == 2
    blue = next(x for x in texts if "Name a colour." in x)
    assert "Name a colour.<|im_end|>" in blue  # empty context adds nothing


def test_forced_format_and_bad_keys(layouts, tok, tmp_path):
    root, sources, _ = layouts
    t, sp = tok
    llava = [dict(s, format="cauldron") for s in sources if s["name"] == "llava"]
    cfg = _data(root, llava)
    mix = Mixture(cfg, 0)
    with pytest.raises(SampleError) as e:
        Planner(cfg, tiny_input(t)).plan(next(_records(mix, "llava")))
    assert e.value.reason == "empty_conversation" and "texts" in str(e.value)
    with pytest.raises(ConfigError, match=r"data.sources\[0\].format='llava'"):
        Mixture(_data(root, [dict(llava[0], format="llava")]), 0)
    from lvita.config.schema import load_stage
    from lvita.config.validate import validate
    from tests.conftest import stage_dict, write_stage

    cfg = stage_dict(t.name_or_path, root, tmp_path / "o")
    cfg["data"]["sources"] = [dict(llava[0], format="xml", media_root="nowhere")]
    stage = load_stage(write_stage(tmp_path / "s.json", cfg))
    with pytest.raises(ConfigError, match=r"data.sources\[0\].format='xml'"):
        validate(stage, 1)
    cfg["data"]["sources"][0]["format"] = "sharegpt"
    layout = validate(load_stage(write_stage(tmp_path / "s.json", cfg)), 1)
    assert any("media_root" in m and "nowhere" in m for m in layout.missing)
    cfg["data"]["sources"][0]["mediaroot"] = "x"
    with pytest.raises(ConfigError, match=r"unknown key 'data.sources\[0\].mediaroot'"):
        load_stage(write_stage(tmp_path / "s.json", cfg))


def test_real_world_image_modes_become_rgb(layouts):
    root, _, _ = layouts
    im = root / "llava" / "images"
    for name in ("gqa/images/cmyk.jpg", "ocr/gray.png", "ocr/rgba.png", "ocr/palette.png", "web/anim.gif"):
        x = image_tiles(im / name, TILE, 1, 1)
        assert x.shape == (1, 3, TILE, TILE) and x.dtype == torch.uint8
    deep = image_tiles(im / "ocr/deep.png", TILE, 1, 1)  # 16-bit 40000 -> 155 in 8 bits, not clipped to 255
    assert int(deep.min()) == int(deep.max()) == 40000 // 257
    gif = image_tiles(im / "web/anim.gif", TILE, 1, 1)  # the first frame, not the blue second one
    assert not (gif[0, 2] > 200).all()
    with open(im / "ocr/gray.png", "rb") as f:  # embedded bytes decode like the file
        assert torch.equal(image_tiles(io.BytesIO(f.read()), TILE, 1, 1), image_tiles(im / "ocr/gray.png", TILE, 1, 1))


def test_stream_skips_faults_with_their_reasons(layouts, tok):
    root, sources, _ = layouts
    t, sp = tok
    chosen = [s for s in sources if s["name"] in ("llava", "llava-video")]
    s = DataStream(_data(root, chosen, pack_buffer=1), tiny_input(t), 1, 0, log=lambda *a: None)
    while s.state_dict()["records"] < s.mixture.pass_size:
        s.next_global_batch()
    assert s.skipped_total == {"bad_media": 4, "placeholder_mismatch": 1, "bad_media_at_decode": 1}
    s.close()


def test_resume_is_exact_across_json_array_and_datasets_sources(layouts, tok):
    root, sources, _ = layouts
    t, sp = tok
    chosen = [s for s in sources if s["name"] in ("llava", "recap", "onevision", "cauldron")]
    cfg = _data(root, chosen, max_tiles=2, same_source=False, seq_length=384, pack_buffer=8)
    a = DataStream(cfg, tiny_input(t), 2, 3, log=lambda *x: None)
    for _ in range(3):
        a.next_global_batch()
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    assert state["pending"] and len(json.dumps(state)) < 2000  # cursors only, no media bytes
    expect = [a.next_global_batch() for _ in range(8)]
    b = DataStream(cfg, tiny_input(t), 2, 3, log=lambda *x: None)
    b.load_state_dict(state)
    got = [b.next_global_batch() for _ in range(8)]
    sources_seen = set()
    for x, y in zip(expect, got):
        for p, q in zip(x, y):
            assert torch.equal(p.input_ids, q.input_ids) and torch.equal(p.targets, q.targets)
            assert torch.equal(p.tiles, q.tiles)
            sources_seen |= {m["source"] for m in p.samples}
    assert sources_seen == {"llava", "recap", "onevision", "cauldron"}
    a.close(), b.close()


def test_json_array_index_is_cached_invalidated_and_atomic(tmp_path, monkeypatch):
    from lvita.data import jsonarray

    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"id": i, "s": "é]," * i} for i in range(50)]))
    arr = jsonarray.JsonArray(p)
    assert len(arr) == 50 and arr.read(7)["id"] == 7 and arr.read(49)["s"] == "é]," * 49
    idx = jsonarray.index_path(p)
    assert idx.parent == tmp_path and idx.name == ".a.json.lvita-index"
    assert not list(tmp_path.glob("*.tmp"))  # written to a temporary file, then renamed
    monkeypatch.setattr(jsonarray, "scan", lambda path: (_ for _ in ()).throw(AssertionError("re-indexed")))
    assert jsonarray.JsonArray(p).read(3)["id"] == 3  # loaded, not rebuilt
    monkeypatch.undo()
    p.write_text(json.dumps([{"id": i} for i in range(60)]))
    os.utime(p, ns=(1, 1))  # size and mtime changed: rebuilt
    assert len(jsonarray.JsonArray(p)) == 60
    monkeypatch.setenv("LVITA_CACHE_DIR", str(tmp_path / "cache"))  # e.g. a read-only data folder
    assert len(jsonarray.JsonArray(p)) == 60 and list((tmp_path / "cache" / "index").glob("*-a.json.lvita-index"))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1}, {"id": 2,]')
    with pytest.raises(jsonarray.JsonArrayError, match=r"bad.json: not a valid JSON array: .* at byte 12"):
        jsonarray.JsonArray(bad)


def test_hf_dataset_dict_directory_uses_its_train_split(tmp_path):
    import datasets

    from lvita.data.tables import source_files

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"query": ["a?", "b?"], "response": ["A.", "B."]}),
                               "test": datasets.Dataset.from_dict({"query": ["c?"], "response": ["C."]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    mix = Mixture(DataConfig(root=str(tmp_path), sources=[SourceConfig("dd", ["dd"])]), 0)
    assert [mix.next().raw["query"] for _ in range(3)] == ["a?", "b?", "a?"]
    datasets.DatasetDict({"validation": dd["test"]}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(PathError, match="no 'train'; name one split's folder"):
        source_files("nt", str(tmp_path), ["nt"])
    with pytest.raises(PathError, match="nothing matches"):
        source_files("g", str(tmp_path), ["dd/*/nope-*.parquet"])


def _check_stage(tokenizer_dir, root, sources, out, **data):
    from tests.conftest import stage_dict

    cfg = stage_dict(tokenizer_dir, root, out, iterations=2)
    cfg["data"].update(sources=sources, seq_length=384, max_frames=4, max_tiles=2, max_skip_fraction=0.5, **data)
    return cfg


def test_data_check_and_preview_on_a_stage_mixing_every_layout(layouts, tokenizer_dir, tmp_path, capsys):
    from lvita.cli import main
    from tests.conftest import write_stage

    root, sources, expect = layouts
    stage = str(write_stage(tmp_path / "s.json", _check_stage(tokenizer_dir, root, sources, tmp_path / "o")))
    assert main(["data", "check", "--stage", stage, "--json", "--decode", "--workers", "2"]) == 0
    got = {s["source"]: s for s in json.loads(capsys.readouterr().out)["sources"]}
    assert {n: (s["records"], s["usable"]) for n, s in got.items()} == {
        "long-vita": (3, 3), "llava": (16, 11), "llava-video": (3, 2), "recap": (3, 3), "onevision": (3, 3),
        "cauldron": (2, 2), "text": (11, 11)}
    assert got["llava"]["skipped"] == {"bad_media": 3, "placeholder_mismatch": 1, "bad_media_at_decode": 1}
    assert "truncated.jpg: image file is truncated" in got["llava"]["first"]["bad_media_at_decode"][0]
    assert "llava_v1_5_mix665k.json:record 11: missing image" in got["llava"]["first"]["bad_media"][0]
    assert got["text"]["images"]["max"] == 0 and got["cauldron"]["images"]["max"] == 2
    assert got["llava"]["tiles"]["max"] == 3  # one image at up to 2 tiles + thumbnail
    # headers only (no --decode), one worker: the truncated JPEG passes; the same figures otherwise
    assert got["llava"]["per_pass"] == 16 and got["llava"]["sampling"] == "ratio 1 of the source per pass"
    capped = [dict(s, max_samples=5) if s["name"] == "llava" else s for s in sources]
    capped_stage = str(write_stage(tmp_path / "c.json", _check_stage(tokenizer_dir, root, capped, tmp_path / "o")))
    assert main(["data", "check", "--stage", capped_stage, "--source", "llava"]) == 0
    assert "per pass: 5 records (ratio 1 of the source, at most 5 records per pass)" in capsys.readouterr().out
    assert main(["data", "check", "--stage", stage, "--json", "--source", "llava"]) == 0
    one = json.loads(capsys.readouterr().out)["sources"][0]
    assert (one["records"], one["usable"], one["skipped"].get("bad_media_at_decode")) == (16, 12, None)
    assert one["tokens"]["max"] == got["llava"]["tokens"]["max"]
    # over the threshold: exit 1, and the text report names the source
    assert main(["data", "check", "--stage", stage, "--set", "data.max_skip_fraction=0.2"]) == 1
    out = capsys.readouterr().out
    assert "llava: 16 records, 12 usable, 4 skipped (25.0%)  OVER data.max_skip_fraction" in out
    assert "llava-video: 3 records, 2 usable" in out and "tokens/sample: p50" in out
    assert main(["data", "check", "--stage", stage, "--source", "nope"]) == 2
    assert "no such source" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('[{"id": 1}, {"id": ')  # a cut download: one line, exit 2
    broken = str(write_stage(tmp_path / "b.json", _check_stage(tokenizer_dir, tmp_path, [
        {"name": "cut", "paths": ["broken.json"]}], tmp_path / "o")))
    assert main(["data", "check", "--stage", broken]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.json: not a valid JSON array" in err[0] and "re-download" in err[0]
    assert main(["data", "preview", "--stage", stage, "--n", "6", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {s["source"] for r in rows for s in r["samples"]} >= {"llava", "text"}
    assert all(s["image_tokens"] % TPT == 0 for r in rows for s in r["samples"])


def test_training_steps_on_a_stage_mixing_every_layout(layouts, tokenizer_dir, tmp_path):
    from tests.conftest import write_stage
    from tests.distributed import run_world
    from tests.test_training import _metrics, _train

    root, sources, _ = layouts
    cfg = _check_stage(tokenizer_dir, root, sources, tmp_path / "o", same_source=False, reset_position_ids=False)
    losses = run_world(_train, 2, str(write_stage(tmp_path / "s.json", cfg)), ["parallel.pipeline=2"])[0]
    assert len(losses) == 2 and all(np.isfinite(losses))
    metrics = _metrics(tmp_path / "o")
    assert metrics[-1]["skipped"], "the faulty records are counted, not fatal"


def test_check_ranges_cover_every_json_line_once_with_its_line_number(tmp_path):
    from lvita.data.check import _units
    from lvita.data.sources import SourceReader

    lines = [json.dumps({"i": i, "pad": "x" * (i % 13)}) if i % 10 else "" for i in range(200)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    reader = SourceReader("a", str(tmp_path), ["a.jsonl"])
    for pieces in (1, 3, 7, 64):
        got = [(r.raw["i"], r.where.rsplit(":", 1)[1]) for u in _units(reader, pieces) for r in reader.scan(*u)]
        assert got == [(i, str(i + 1)) for i in range(200) if i % 10]


def _open_array(path):
    from lvita.data.jsonarray import JsonArray

    return len(JsonArray(path)), JsonArray(path).read(123)["id"]


def test_json_array_index_built_by_many_processes_at_once(tmp_path):
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    p = tmp_path / "many.json"
    p.write_text(json.dumps([{"id": i, "t": "word " * 50} for i in range(20000)]))
    with ProcessPoolExecutor(4, mp_context=get_context("spawn")) as pool:
        got = list(pool.map(_open_array, [str(p)] * 4))
    assert got == [(20000, 123)] * 4
    assert sorted(x.name for x in tmp_path.iterdir()) == [".many.json.lvita-index", ".many.json.lvita-index.lock",
                                                          "many.json"]  # no temporary file left behind


def test_packed_sequences_of_every_layout_carry_their_tiles_and_labels(layouts, tok):
    root, sources, _ = layouts
    t, sp = tok
    s = DataStream(_data(root, sources, max_tiles=2, same_source=True), tiny_input(t), 4, 1, log=lambda *a: None)
    seen = set()
    for _ in range(6):
        for seq in s.next_global_batch():
            ctx = seq.input_ids == sp["img_context"]
            assert seq.tiles.shape == (int(ctx.sum()) // TPT, 3, TILE, TILE)
            for m in seq.samples:
                assert int(ctx[m["start"]:m["end"]].sum()) == m["image_tokens"]
                labelled = int((seq.targets[m["start"]:m["end"]] != IGNORE).sum())
                # the truncated JPEG's labels are dropped when its pixels fail to decode
                assert labelled == (0 if m["id"] == "ll-truncated" else m["labels"]) and m["labels"] > 0
                seen.add(m["source"])
            assert len({m["source"] for m in seq.samples}) == 1  # same_source packing
    assert seen == {x["name"] for x in sources}
    s.close()


def test_a_source_of_many_files_holds_one_open_at_a_time(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(150):
        d = tmp_path / "repo" / f"subset{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([{"query": f"q{i}", "response": "r"}]), d / f"train-{i:05d}.parquet")
        (d / f"extra-{i:05d}.jsonl").write_text(json.dumps({"query": f"j{i}", "response": "r"}) + "\n")
    before = len(os.listdir("/proc/self/fd"))
    mix = Mixture(DataConfig(root=str(tmp_path), sources=[SourceConfig("many", ["repo"])]), 0)
    got = [mix.next().raw["query"] for _ in range(600)]
    assert len(os.listdir("/proc/self/fd")) - before <= 3
    assert sorted(set(got)) == sorted([f"q{i}" for i in range(150)] + [f"j{i}" for i in range(150)])
