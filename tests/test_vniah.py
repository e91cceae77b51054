"""V-NIAH (lvita.evaluation.vniah): the needle lands at the frame each depth asks for, in the pixels the
decoder gets; the haystack is the video at 1 fps; prompt ids are lvita.infer.prompt's; the teacher
scoring gives the verdicts of an explicit teacher-forced forward; the grid, results.json and the
heatmap are written; a rerun resumes without decoding finished cells; bad input is clear."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lvita.data.input_format import InputFormat
from lvita.evaluation import vniah, vniah_heatmap
from lvita.evaluation.vniah_data import load_needles, needle_index, prompt_ids, question_text
from lvita.ckpt.hf import write_hf_dir
from lvita.errors import PathError
from lvita.infer.decode import generate
from lvita.infer.prompt import MediaOptions, build_prompt
from lvita.model.longvita import LongVita
from lvita.model.presets import spec_of
from tests.layouts import write_video
from tests.test_generate import _always_b

RED = (255, 0, 0)
QUESTION = "\nFind the frame with a red card. What colour is it?\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def haystack(tmp_path_factory):
    # 24 frames at 2 fps: the 1-fps frames are video frames 0, 2, 4, ... whose grey is 60 j % 256
    return write_video(tmp_path_factory.mktemp("hay") / "hay.mp4", frames=24, fps=2, size=64)


def _grey(j: int) -> int:
    return 60 * j % 256


def _longva_needles(root: Path, answers: list[str], colours=None) -> Path:
    """LongVA's needle_datasets/ layout: dataset.json + images/."""
    (root / "images").mkdir(parents=True)
    rows = []
    for k, a in enumerate(answers):
        Image.new("RGB", (80, 60), (colours or [RED] * len(answers))[k]).save(root / "images" / f"n{k}.png")
        rows.append({"path": f"n{k}.png", "prompt": QUESTION, "answer": a})
    (root / "dataset.json").write_text(json.dumps(rows))
    return root


def _tok_model(tokenizer_dir, fmt: str, seed: int = 5):
    """-> (tokenizer, special ids, the tiny model's InputFormat in ``fmt``, the model)."""
    spec = spec_of("tiny", fmt)
    f = InputFormat.load(spec, tokenizer_dir)
    return f.tok, f.specials, f, LongVita(spec, f.context_ids, seed=seed).eval().requires_grad_(False)


def _recording(calls: list):
    def decode(model, ids, pixels, specials, max_new_tokens, max_context):
        calls.append((list(ids), pixels.clone(), max_new_tokens))
        return generate(model, ids, pixels, specials, max_new_tokens, max_context)
    return decode


@pytest.mark.parametrize("fmt", ["internvl", "longvita"])
def test_the_needle_lands_at_the_frame_each_depth_asks_for(fmt, tokenizer_dir, haystack, tmp_path):
    t, sp, spec, model = _tok_model(tokenizer_dir, fmt)
    needles, skipped = load_needles(_longva_needles(tmp_path / "needles", ["red"]))
    assert skipped == [] and needles[0].question == QUESTION and needles[0].name == "n0.png"
    hay, about = vniah.haystack_tiles(haystack, 10, spec)
    assert (about["step"], about["frames_at_1fps"], tuple(hay.shape)) == (2, 12, (10, 3, 112, 112))
    calls = []
    rows = vniah.run_grid(model, spec, _recording(calls), needles, hay, [4, 10], [0, 25, 50, 100])
    want = {(4, 0): 0, (4, 25): 1, (4, 50): 2, (4, 100): 4, (10, 0): 0, (10, 25): 2, (10, 50): 5, (10, 100): 10}
    assert [(r["frames"], r["depth"]) for r in rows] == list(want) and len(calls) == 8
    ctx = sp["vid_context"] if fmt == "longvita" else sp["img_context"]
    for ((n, d), index), row, (ids, pixels, new) in zip(want.items(), rows, calls):
        assert pixels.shape == (n + 1, 3, 112, 112) and pixels.dtype == torch.uint8
        centre = pixels[:, :, 56, 56].int()  # (frames, RGB) at the tile's centre
        red = ((centre[:, 0] > 200) & (centre[:, 1] < 60) & (centre[:, 2] < 60)).nonzero().flatten().tolist()
        assert red == [index] == [row["needle_index"]] == [needle_index(d, n)]
        greys = torch.cat([centre[:index], centre[index + 1:]])  # the haystack, in order, at 1 fps
        # mpeg4 + yuv420 noise on a flat grey: <= 3 levels (measured); a sampling off by one video frame: 30
        assert (greys - torch.tensor([[_grey(j)] * 3 for j in range(n)])).abs().max() <= 5
        assert ids.count(ctx) == (n + 1) * spec.tpt and new == len(row["answer_tokens"])
    if fmt == "longvita":  # the 80x60 needle is padded to a square with the mean colour, as training's frames
        assert calls[0][1][0, :, 2, 56].tolist() == [123, 116, 103]


@pytest.mark.parametrize("fmt", ["internvl", "longvita"])
def test_prompt_ids_are_build_prompts_for_a_video_of_that_many_frames(fmt, tokenizer_dir, tmp_path):
    t, sp, spec, _ = _tok_model(tokenizer_dir, fmt)
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(7):
        Image.new("RGB", (40, 30), (i * 30, 0, 0)).save(folder / f"{i}.png")
    messages = [{"role": "user", "content": question_text(QUESTION)}]
    assert messages[0]["content"].startswith("<video>\nFind the frame")
    for system in (None, "You are a helpful assistant."):
        p = build_prompt(messages, spec, videos=[folder], system_prompt=system, media=MediaOptions(max_frames=64))
        assert p.media[0].frames == 7 and prompt_ids(QUESTION, 7, spec, system) == p.input_ids


def _teacher_forced(model, ids, pixels, answer_ids) -> bool:
    """LongVA's eval_forward: one forward of prompt + answer; every answer position's argmax must match."""
    with torch.no_grad():
        hidden = model.embed(torch.tensor([ids]), pixels)
        hidden = torch.cat([hidden, model.embed.embed_tokens(torch.tensor([answer_ids]))], 1)
        pos = torch.arange(hidden.shape[1]).unsqueeze(0)
        for layer in model.layers:
            hidden = layer(hidden, pos)
        pred = model.head.lm_head(model.head(hidden))[0].argmax(-1)
    n = len(ids)
    return pred[n - 1:n - 1 + len(answer_ids)].tolist() == answer_ids


class _AnswerIds:
    """The tokenizer, except that the needles' answers encode to given ids (a random tiny model's
    favourite ids decode to no text, so no answer text would round-trip to them)."""

    def __init__(self, tok, table: dict):
        self.tok, self.table = tok, table

    def encode(self, text, **kw):
        return list(self.table[text]) if text in self.table else self.tok.encode(text, **kw)

    def __call__(self, *a, **kw):
        return self.tok(*a, **kw)

    def decode(self, *a, **kw):
        return self.tok.decode(*a, **kw)

    def get_vocab(self):
        return self.tok.get_vocab()


def test_teacher_scoring_equals_an_explicit_teacher_forced_forward(tokenizer_dir, haystack, tmp_path):
    t, sp, spec, model = _tok_model(tokenizer_dir, "internvl", seed=7)
    hay, _ = vniah.haystack_tiles(haystack, 8, spec)
    frames, depths = [3, 8], [0, 50, 100]
    needles, _ = load_needles(_longva_needles(tmp_path / "probe", ["x"], [(0, 0, 255)]))
    # answers the model gives in some cells and not in others: its own 3-token greedy outputs at two
    # cells, and one that matches the first two tokens of a cell's output but not the third
    outs = [r["tokens"] for r in vniah.run_grid(model, spec, generate, needles, hay, frames, depths,
                                                scoring="generate", max_new_tokens=3)]
    table = {"a0": outs[0], "a1": outs[-1], "a2": outs[-1][:2] + [outs[0][0]]}
    assert outs[-1][1] != outs[0][0] and len({tuple(o) for o in outs}) > 2
    needles, _ = load_needles(_longva_needles(tmp_path / "needles", list(table), [RED, (0, 0, 255), (0, 255, 0)]))
    calls = []
    answering = type(spec)(_AnswerIds(t, table), sp, spec.tile, spec.tpt, spec.spec)
    rows = vniah.run_grid(model, answering, _recording(calls), needles, hay, frames, depths)
    forced = [_teacher_forced(model, ids, pixels, r["answer_tokens"]) for (ids, pixels, _), r in zip(calls, rows)]
    assert [r["answer_tokens"] for r in rows[:3]] == list(table.values()) and len(rows) == 18
    assert [r["correct"] for r in rows] == forced
    assert 0 < sum(forced) < len(forced)  # both verdicts occur, so the comparison can fail
    assert not any(f for f, r in zip(forced, rows) if r["needle"] == "2")  # a right prefix is not enough


def _write_parquet_needles(root: Path, answers: list) -> Path:
    """lmms-lab/v_niah_needles as huggingface-cli downloads it: data/test-*.parquet, image {bytes, path}."""
    (root / "data").mkdir(parents=True)
    images = []
    for k in range(len(answers)):
        buf = io.BytesIO()
        Image.new("RGB", (50, 50), RED).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": f"needle{k}.png"})
    table = pa.table({"image": images, "question": [QUESTION] * len(answers), "answer": answers})
    pq.write_table(table, root / "data" / "test-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nconfigs: ...\n---\n")
    return root


def test_cli_writes_grid_and_heatmap_and_a_rerun_resumes(tokenizer_dir, haystack, tmp_path, monkeypatch, capsys):
    t, sp, _, _ = _tok_model(tokenizer_dir, "internvl")
    opening = build_prompt([{"role": "user", "content": "?"}], InputFormat.of("tiny", t)).input_ids[-1]
    model = _always_b(sp, opening, t.encode("B", add_special_tokens=False)[0])  # answers "B" whatever it sees
    hf = write_hf_dir(model.state_dict(), "tiny", tokenizer_dir, tmp_path / "hf", sp["img_context"])
    needles = _write_parquet_needles(tmp_path / "v_niah_needles", ["B", "C", None])
    out = tmp_path / "res"
    # 18 tokens a frame: 6 frames + the needle + text are 189 tokens (+ 1 answer token) <= 200; 10 frames: 261
    argv = ["--benchmark", "vniah", "--model", str(hf), "--haystack", str(haystack), "--needles", str(needles),
            "--haystack-frames", "2,6,10", "--depths", "0,50,100", "--max-context", "200", "--out", str(out)]
    counted = []
    monkeypatch.setattr(vniah, "generate", lambda *a: counted.append(1) or generate(*a))
    from lvita import eval as lveval  # the command users type: lvita eval --benchmark vniah ...

    assert lveval.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["frames"] == [2, 6, 10] and res["depths"] == [0, 50, 100]
    assert res["accuracy"] == {"2": {"0": 0.5, "50": 0.5, "100": 0.5}, "6": {"0": 0.5, "50": 0.5, "100": 0.5},
                               "10": {"0": None, "50": None, "100": None}}
    assert res["mean"] == 0.5 and {n["name"]: n["accuracy"] for n in res["needles"].values()} == \
        {"needle0.png": 1.0, "needle1.png": 0.0}
    assert res["skipped"]["by_reason"] == {"bad_needle": 1, "too_long": 6} and len(counted) == 12
    assert [c["needle_index"] for c in res["cells"][:6:2]] == [0, 1, 2]  # frames 2: depths 0, 50, 100
    assert res["options"]["scoring"] == "teacher" and "--haystack" in res["argv"]
    assert "vniah: 18/18 cells" in capsys.readouterr().err
    png = Image.open(out / "heatmap.png").convert("RGB")
    L, T, W, H = vniah_heatmap.LEFT, vniah_heatmap.TOP, vniah_heatmap.CELL_W, vniah_heatmap.CELL_H
    assert png.size == (L + 3 * W + vniah_heatmap.RIGHT, T + 3 * H + vniah_heatmap.BOTTOM)
    corner = lambda c, r: png.getpixel((L + c * W + 3, T + r * H + 3))  # noqa: E731  (away from the text)
    assert {corner(c, r) for c in (0, 1) for r in range(3)} == {vniah_heatmap.colour(0.5)} == {(0xEB, 0xB8, 0x39)}
    assert {corner(2, r) for r in range(3)} == {vniah_heatmap.EMPTY}

    counted.clear()  # a rerun decodes nothing and writes the same results
    assert vniah.main(argv) == 0 and counted == []
    assert json.loads((out / "results.json").read_text())["grid"] == res["grid"]
    lines = (out / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 18
    (out / "cells.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # interrupted mid-line
    assert vniah.main(argv) == 0 and len(counted) == 12 - 5  # the 5 kept cells are not decoded again
    assert json.loads((out / "results.json").read_text())["grid"] == res["grid"]

    assert vniah.main(argv + ["--scoring", "generate"]) == 2  # other settings: refused, not mixed
    assert "its cells were made with max_new_tokens=None (this run: 32), scoring='teacher' (this run: 'generate')" \
        in capsys.readouterr().err


def test_heatmap_colours_follow_accuracy():
    grid = {(100, 0): 0.0, (100, 50): 1.0, (200, 0): 0.5, (200, 50): None}
    img = vniah_heatmap.draw(grid, [100, 200], [0, 50], "t")
    at = lambda c, r: img.getpixel((vniah_heatmap.LEFT + c * 64 + 3, vniah_heatmap.TOP + r * 36 + 3))  # noqa: E731
    assert (at(0, 0), at(0, 1), at(1, 0), at(1, 1)) == ((0xF0, 0x49, 0x6E), (0x9A, 0xD5, 0xB3), (0xEB, 0xB8, 0x39),
                                                        vniah_heatmap.EMPTY)
    assert vniah_heatmap.colour(0.25) == (round((0xF0 + 0xEB) / 2), round((0x49 + 0xB8) / 2), round((0x6E + 0x39) / 2))


def test_bad_input_is_clear(tokenizer_dir, haystack, tmp_path, capsys):
    needles = _longva_needles(tmp_path / "needles", ["red", ""])
    (needles / "images" / "n1.png").unlink()
    got, skipped = load_needles(needles)
    assert len(got) == 1 and [(s.id, s.reason) for s in skipped] == [("1", "bad_needle")]
    base = ["--model", str(tmp_path / "nomodel"), "--haystack", str(haystack), "--needles", str(needles)]
    assert vniah.main(base + ["--haystack-frames", "200"]) == 2  # refused before any model is loaded
    assert "12 frames at 1 fps (24 frames at 2 fps), --haystack-frames asks for 200" in capsys.readouterr().err
    assert vniah.main(base + ["--depths", "0,120"]) == 2 and "percents in 0..100" in capsys.readouterr().err
    with pytest.raises(PathError, match="no \\*.parquet"):
        load_needles(tmp_path)
    assert vniah.parse_grid("200:1000:200", "frames", True) == [200, 400, 600, 800, 1000]
    assert vniah.parse_grid("0:100:12.5", "depths", False)[:3] == [0, 12.5, 25]
    assert vniah.contains_answer("It is Yellow.", "yellow") and not vniah.contains_answer("Because", "B")
    # a letter answer is an option letter, not a word: the article "a" is not option A (it was, as a word match)
    assert not vniah.contains_answer("It is a teddy bear in Times Square.", "A")
    assert vniah.contains_answer("A. A teddy bear", "A") and vniah.contains_answer("The answer is (C).", "C")
    assert not vniah.contains_answer("A or B", "A")  # two option letters: no option (VLMEvalKit's rule)


def _cp_main(rank, argv):
    return vniah.main(argv)


def test_context_parallel_run_gives_the_single_process_cells(tokenizer_dir, haystack, tmp_path):
    from tests.distributed import run_world

    t, sp, spec, model = _tok_model(tokenizer_dir, "internvl", seed=3)
    with torch.no_grad():  # no early stop: every cell decodes all its tokens
        model.head.lm_head.weight[[sp["im_end"], sp["endoftext"]]] = 0
    hf = write_hf_dir(model.state_dict(), "tiny", tokenizer_dir, tmp_path / "hf", sp["img_context"])
    needles = _longva_needles(tmp_path / "needles", ["red", "blue"], [RED, (0, 0, 255)])
    base = ["--model", str(hf), "--haystack", str(haystack), "--needles", str(needles), "--haystack-frames", "2,5",
            "--depths", "50", "--scoring", "generate", "--max-new-tokens", "3", "--device", "cpu"]
    assert vniah.main(base + ["--out", str(tmp_path / "single")]) == 0
    assert run_world(_cp_main, 2, base + ["--out", str(tmp_path / "cp"), "--sp", "2"]) == [0, 0]
    cells = {k: [json.loads(x) for x in (tmp_path / k / "cells.jsonl").open()] for k in ("single", "cp")}
    assert len(cells["cp"]) == 4  # rank 0 alone wrote
    assert [c["tokens"] for c in cells["cp"]] == [c["tokens"] for c in cells["single"]]
    assert all(len(c["tokens"]) == 3 for c in cells["cp"]) and len({tuple(c["tokens"]) for c in cells["cp"]}) > 1
