"""The video benchmarks as published (lvita.evaluation.videomme / mvbench / longvideo): tiny files in each
benchmark's own layout, read into items (ids, options, answers, breakdown keys, time windows, the
Video-MME subtitle lines of the frames the model sees), scored against hand-computed numbers, and
answered end to end by the tiny model (load -> prompt -> answer -> prediction_row -> score)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from lvita.data.media import INTERNVL_FRAMES
from lvita.data.media import LONGVITA_FRAMES
from lvita.data.input_format import InputFormat
from lvita.data.input_format import InternVLInput, LongVitaInput
from lvita.evaluation.items import Item, LoadOptions, Skip, Video, prediction_row
from lvita.evaluation.longvideo import LONGVIDEOBENCH, MLVU
from lvita.evaluation.mvbench import MVBENCH
from lvita.evaluation.scorer import DEFAULT_SCORER, SCORERS
from lvita.evaluation.video_common import first_letter, first_word_matches, mlvu_matches
from lvita.evaluation.videomme import VIDEO_MME, read_srt, subtitle_lines
from lvita.evaluation.wrappers import SERVER
from lvita.data.media import MediaError, normalise, sampled_frames, video_tiles
from lvita.data.tokenizer import load_tokenizer, special_token_ids
from lvita.infer.generate import answer
from lvita.infer.prompt import MediaOptions, build_prompt
from tests.layouts import write_video
from tests.test_eval_image import always_b_hf  # noqa: F401 (a fixture: the tiny model answering "B")
from tests.test_generate import _always_b

SRT = """1
00:00:00,500 --> 00:00:02,500
hello
world

2
00:00:02,500 --> 00:00:04,000
<i>second</i>

3
00:00:08,000 --> 00:00:09,000
late
"""
# vid1: 40 frames at 4 fps (10 s). longvita samples frames 0, 4, .., 36 (0, 1, .., 9 s), internvl the
# centres 2, 6, .., 38 (0.5, 1.5, .., 9.5 s); a cue holds a frame only strictly inside its span
LINES = {"longvita": "hello world\nhello world\nsecond", "internvl": "hello world\nsecond\nlate"}
FRAMES = {"longvita": list(range(0, 40, 4)), "internvl": list(range(2, 40, 4))}


def _split(results):
    results = list(results)
    items = [r for r in results if isinstance(r, Item)]
    return items, {s.id: s.reason for s in results if isinstance(s, Skip)}


@pytest.fixture(scope="module")
def videomme(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videomme")
    write_video(root / "video" / "vid1.mp4", frames=40, fps=4, size=32)
    (root / "subtitle").mkdir()
    (root / "subtitle" / "vid1.srt").write_text(SRT)
    opts = ["A. one", "B. two", "C. three", "D. four"]
    row = dict(video_id="001", duration="short", domain="Knowledge", sub_category="Astronomy",
               task_type="Counting Problem", url="u", videoID="vid1", question="How many?", options=opts)
    rows = [dict(row, question_id="001-1", answer="B"),
            dict(row, question_id="001-2", answer="D", task_type="OCR Problems", question="Which word?"),
            dict(row, question_id="002-1", answer="A", videoID="vid2"),  # no such video
            dict(row, question_id="001-3", answer="B", options=["one", "two"]),  # not "A. ..."
            dict(row, question_id="001-1", answer="C")]  # a repeated id
    (root / "videomme").mkdir()
    pd.DataFrame(rows).to_parquet(root / "videomme" / "test-00000-of-00001.parquet")
    return root


def test_videomme_loader_reads_the_parquet_and_skips_bad_rows(videomme, tmp_path):
    items, skips = _split(VIDEO_MME.load(videomme, LoadOptions(work=tmp_path, frames=64)))
    assert [i.id for i in items] == ["001-1", "001-2"]
    assert skips == {"002-1": "missing_video", "001-3": "bad_record", "001-1": "duplicate_id"}
    first = items[0]
    assert first.choices == {"A": "one", "B": "two", "C": "three", "D": "four"} and first.answer == "B"
    assert first.meta == {"duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
                          "task_type": "Counting Problem", "videoID": "vid1"}
    assert first.videos[0].path == videomme / "video" / "vid1.mp4" and first.videos[0].cues is None
    # the parquet itself as --data gives the same items
    again, _ = _split(VIDEO_MME.load(videomme / "videomme" / "test-00000-of-00001.parquet",
                                     LoadOptions(work=tmp_path)))
    assert [i.id for i in again] == ["001-1", "001-2"]


def test_videomme_prompt_is_long_vitas(videomme, tmp_path):
    item = next(VIDEO_MME.load(videomme, LoadOptions(work=tmp_path)))
    ask = ("Select the best answer to the following multiple-choice question based on the video. "
           "Respond with only the letter (A, B, C, or D) of the correct option.\n")
    assert VIDEO_MME.prompt(item, LongVitaInput) == (
        "<video>\nThese are the frames of a video. " + ask +
        "Question: How many?\nA. one\nB. two\nC. three\nD. four\nOffer a very short reply.")
    assert VIDEO_MME.prompt(item, InternVLInput).endswith("D. four\nAnswer: ")


def test_srt_cues_and_the_lines_of_given_timestamps(videomme):
    cues = read_srt(videomme / "subtitle" / "vid1.srt")
    assert cues == [(500, 2500, "hello world"), (2500, 4000, "second"), (8000, 9000, "late")]
    # frames at 10 fps: 5 -> 500 ms (not strictly inside), 6 -> 600, 25 -> 2500 (boundary), 26, 85
    assert subtitle_lines(cues, [5, 6, 7, 25, 26, 50, 85], 10.0) == "hello world\nhello world\nsecond\nlate"


@pytest.mark.parametrize("fmt", ["longvita", "internvl"])
def test_videomme_subtitles_follow_the_frames_the_model_sees(videomme, tmp_path, fmt):
    item = next(VIDEO_MME.load(videomme, LoadOptions(work=tmp_path, frames=64, fps=1.0, subtitles=True)))
    inputs = {"longvita": LongVitaInput, "internvl": InternVLInput}[fmt]
    frames = sampled_frames(item.videos[0].path, 64, 1.0, inputs.frames)
    assert list(frames) == FRAMES[fmt] and frames.fps == pytest.approx(4.0)
    text = VIDEO_MME.prompt(item, inputs)
    assert item.subtitles == LINES[fmt]
    assert ("This video's subtitles are listed below:\n" + LINES[fmt] + "\nSelect the best answer") in text


def _rows(specs, **base):
    """(answer, prediction, meta) -> prediction rows."""
    return [prediction_row(Item(str(i), "q", choices=base.get("choices"), answer=a, meta=m), p)
            for i, (a, p, m) in enumerate(specs)]


def test_videomme_score_per_duration_by_hand():
    m = lambda d, t="Counting Problem": {"duration": d, "domain": "Knowledge", "sub_category": "Astronomy",
                                         "task_type": t}
    rows = _rows([("B", "B", m("short")),                      # right
                  ("C", "The answer is C.", m("short")),       # prefix removed: right
                  ("A", "Answer: D", m("short", "OCR Problems")),  # wrong
                  ("A", "A man is walking", m("medium")),      # the first capital A-D: right
                  ("D", "I would say D", m("medium")),         # "I" is no option letter; D: right
                  ("B", "reasoning... Answer: B", m("long")),  # the prefix "Answer:" removed, then B: right
                  ("C", "none of them", m("long"))],           # no letter: wrong
                 choices={k: k for k in "ABCD"})
    res = VIDEO_MME.score(rows)
    assert (res["correct"], res["count"]) == (5, 7)
    assert {d: (v["correct"], v["count"]) for d, v in res["duration"].items()} == {
        "short": (2, 3), "medium": (2, 2), "long": (1, 2)}
    assert res["task_type"]["OCR Problems"]["accuracy"] == 0.0
    assert res["per_duration"]["short"]["task_type"]["Counting Problem"]["accuracy"] == 1.0


@pytest.fixture(scope="module")
def mvbench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvbench")
    (root / "json").mkdir()
    write_video(root / "video" / "star" / "Charades_v1_480" / "a.mp4", frames=40, fps=4, size=32)
    clip = root / "video" / "tvqa" / "frames_fps3_hq" / "clip1"
    clip.mkdir(parents=True)
    for i in range(30):  # frame k (0-based) is grey 8k: the level names the frame
        Image.new("RGB", (32, 32), (8 * i,) * 3).save(clip / f"{i + 1:05d}.jpg", quality=100)
    seq = [{"video": "a.mp4", "question": "What next?", "candidates": ["sit", "run", "eat"], "answer": "run",
            "start": 1.0, "end": 6.0},
           {"video": "a.mp4", "question": "Then?", "candidates": ["sit", "run"], "answer": "fly"},  # not a candidate
           {"video": "gone.mp4", "question": "?", "candidates": ["x", "y"], "answer": "x"}]
    epi = [{"video": "clip1", "question": "Why?", "candidates": ["a", "b"], "answer": "b", "start": 2, "end": 5}]
    (root / "json" / "action_sequence.json").write_text(json.dumps(seq))
    (root / "json" / "episodic_reasoning.json").write_text(json.dumps(epi))
    return root


def test_mvbench_loader_tasks_options_and_windows(mvbench, tmp_path):
    items, skips = _split(MVBENCH.load(mvbench, LoadOptions(work=tmp_path)))
    assert [i.id for i in items] == ["action_sequence-0", "episodic_reasoning-0"]
    assert skips == {"action_sequence-1": "bad_record", "action_sequence-2": "missing_video"}
    seq, epi = items
    assert seq.choices == {"A": "sit", "B": "run", "C": "eat"} and seq.answer == "B"
    assert seq.meta["task"] == "Action Sequence" and epi.meta["task"] == "Episodic Reasoning"
    assert (seq.videos[0].start, seq.videos[0].end, seq.videos[0].fps) == (1.0, 6.0, None)
    assert (epi.videos[0].start, epi.videos[0].end, epi.videos[0].fps) == (2.0, 5.0, 3)
    assert MVBENCH.prompt(seq, LongVitaInput).endswith(
        "question.\nQuestion: What next?\nOptions:\n(A) sit\n(B) run\n(C) eat<video>\nAnswer with the letter.")
    assert MVBENCH.prompt(seq, LongVitaInput, SERVER) == (  # long_vita.py: the system text never sent
        "Question: What next?\nOptions:\n(A) sit\n(B) run\n(C) eat<video>\nAnswer with the letter.")


def test_frames_are_sampled_inside_the_window(mvbench):
    # mp4, 4 fps, 1..6 s: frames 4..24 (21 frames); internvl: 5 centres of 4.2-frame segments
    mp4 = mvbench / "video" / "star" / "Charades_v1_480" / "a.mp4"
    assert list(sampled_frames(mp4, 64, 1.0, INTERNVL_FRAMES, start=1.0, end=6.0)) == [6, 10, 14, 18, 22]
    assert list(sampled_frames(mp4, 64, 1.0, LONGVITA_FRAMES, start=1.0, end=6.0)) == [4, 8, 12, 16, 20, 24]
    assert list(sampled_frames(mp4, 64, 1.0, INTERNVL_FRAMES)) == FRAMES["internvl"]  # no window: as before
    # a 3 fps frame folder, 2..5 s: frames 6..15 (10), read as a 3 fps video
    folder = mvbench / "video" / "tvqa" / "frames_fps3_hq" / "clip1"
    assert list(sampled_frames(folder, 64, 1.0, LONGVITA_FRAMES, start=2, end=5, folder_fps=3)) == [6, 9, 12, 15]
    assert list(sampled_frames(folder, 64, 1.0, INTERNVL_FRAMES, start=2, end=5, folder_fps=3)) == [7, 11, 14]
    levels = video_tiles(folder, 16, 64, 1.0, start=2, end=5, folder_fps=3).float().mean(dim=(1, 2, 3))
    assert levels.round().tolist() == [56.0, 88.0, 112.0]  # frames 7, 11, 14 (grey 8k; jpeg of a flat image)
    assert list(sampled_frames(mp4, 64, 1.0, INTERNVL_FRAMES, start=8.0, end=60.0)) == [34, 38]  # end clipped: 32..39, centres 2 and 6
    with pytest.raises(MediaError, match="holds no frame"):
        sampled_frames(mp4, 64, 1.0, INTERNVL_FRAMES, start=11.0, end=12.0)  # past the 10 s video
    with pytest.raises(MediaError, match="frame rate"):
        sampled_frames(folder, 64, 1.0, INTERNVL_FRAMES, start=2, end=5)  # a folder's rate is unknown


def test_the_prompt_feeds_the_window_frames(mvbench, tokenizer_dir, tmp_path):
    t = load_tokenizer(tokenizer_dir)
    folder = mvbench / "video" / "tvqa" / "frames_fps3_hq" / "clip1"
    video = Video(folder, 2, 5, fps=3)
    ask = [{"role": "user", "content": "<video>\nWhy?"}]
    p = build_prompt(ask, InputFormat.of("tiny", t), videos=[video], system_prompt=None, media=MediaOptions(max_frames=64))
    from lvita.model.presets import tile_size
    want = video_tiles(folder, tile_size("tiny"), 64, 1.0, start=2, end=5, folder_fps=3)
    assert [(str(m.ref), m.frames) for m in p.media] == [(str(folder), 3)] and torch.equal(p.pixel_values, normalise(want))
    plain = build_prompt(ask, InputFormat.of("tiny", t), videos=[Video(folder)], system_prompt=None,
                         media=MediaOptions(max_frames=64))  # no window, no rate: every frame, as before
    assert [(str(m.ref), m.frames) for m in plain.media] == [(str(folder), 30)]


def test_mvbench_and_mlvu_first_word_rule_by_hand():
    ch, sc = {"A": "sit", "B": "run", "C": "eat"}, DEFAULT_SCORER
    assert first_word_matches("B", "B", ch, sc) and first_word_matches("(B) run", "B", ch, sc)
    assert first_word_matches("b.", "B", ch, sc) and not first_word_matches("A", "B", ch, sc)
    assert first_word_matches("", "B", ch, sc)  # the rule's quirk: "" is in "(b)" (but see the empty row below)
    assert first_word_matches("They run", "B", ch, sc)  # option text
    assert not first_word_matches("They run or eat", "B", ch, sc)
    # MLVU's own rule: the character before the first ")" equals the gold letter, case-sensitively
    assert mlvu_matches("x (B)", "B", ch, sc) and not mlvu_matches("(b) sit", "B", ch, sc)
    assert first_word_matches("(b) sit", "B", ch, sc)  # where MVBench's first-word rule says right
    rows = _rows([("B", "B", {"task": "Action Sequence"}), ("A", "C", {"task": "Action Sequence"}),
                  ("A", "(A) sit", {"task": "Episodic Reasoning"})], choices=ch)
    res = MVBENCH.score(rows)
    assert res["task"] == {"Action Sequence": {"accuracy": 0.5, "correct": 1, "count": 2},
                           "Episodic Reasoning": {"accuracy": 1.0, "correct": 1, "count": 1}}
    assert res["accuracy"] == pytest.approx(2 / 3) and res["task_mean"] == 0.75
    # an empty prediction reads back from VLMEvalKit's xlsx as NaN: at 37d08c5 its evaluate crashes (here:
    # wrong, counted); at e8e78f0 it is left unscored and its rating counts the NaN score as right
    rows = _rows([("B", "", {"task": "Action Sequence"}), ("B", "B", {"task": "Action Sequence"})], choices=ch)
    old, new = (MVBENCH.score(rows, scorer=s) for s in SCORERS.values())
    assert (old["correct"], old["crashes_vlmevalkit"], old["unscored_rated_right"]) == \
        (1, {"empty_or_na_prediction": 1}, 0)
    assert (new["correct"], new["crashes_vlmevalkit"], new["unscored_rated_right"]) == (2, {}, 1)


def test_longvideobench_loader_and_score(tmp_path):
    root = tmp_path / "lvb"
    write_video(root / "videos" / "v1.mp4", frames=8, fps=4, size=32)
    recs = [{"id": "v1_0", "video_id": "v1", "video_path": "v1.mp4", "question": "Who?", "candidates":
             ["a", "b", "c", "d", "e"], "correct_choice": 4, "duration_group": 15, "question_category": "S2E"},
            {"id": "v1_1", "video_path": "v1.mp4", "question": "?", "candidates": ["a"], "correct_choice": 3},
            {"id": "v2_0", "video_path": "v2.mp4", "question": "?", "candidates": ["a", "b"], "correct_choice": 0}]
    (root / "lvb_val.json").write_text(json.dumps(recs))
    items, skips = _split(LONGVIDEOBENCH.load(root, LoadOptions(work=tmp_path)))
    assert [i.id for i in items] == ["v1_0"] and skips == {"v1_1": "bad_record", "v2_0": "missing_video"}
    assert items[0].answer == "E" and items[0].meta == {"duration_group": "15", "question_category": "S2E"}
    assert LONGVIDEOBENCH.prompt(items[0], LongVitaInput) == (
        "<video>Who?\nA. a\nB. b\nC. c\nD. d\nE. e\nAnswer with the option's letter from the given choices "
        "directly.Offer a very short reply.")
    m = lambda d, c: {"duration_group": d, "question_category": c}
    res = LONGVIDEOBENCH.score(_rows([("E", "E", m("15", "S2E")), ("A", "B", m("15", "T2O")),
                                      ("C", "The answer is C", m("600", "S2E"))]))
    assert {d: v["correct"] / v["count"] for d, v in res["duration_group"].items()} == {"15": 0.5, "600": 1.0}
    assert res["question_category"]["S2E"]["accuracy"] == 1.0
    assert res["per_duration_group"]["15"]["T2O"]["accuracy"] == 0.0 and first_letter("E.", "ABCDE") == "E"


def test_mlvu_loader_and_m_avg(tmp_path):
    root = tmp_path / "MLVU"
    (root / "json").mkdir(parents=True)
    write_video(root / "video" / "1_plotQA" / "p.mp4", frames=8, fps=4, size=32)
    write_video(root / "video" / "5_order" / "o.mp4", frames=8, fps=4, size=32)
    rec = {"video": "p.mp4", "duration": 8, "question": "What?", "candidates": ["x", "y"], "answer": "y",
           "question_type": "plotQA"}
    (root / "json" / "1_plotQA.json").write_text(json.dumps([rec, dict(rec, answer="z")]))
    (root / "json" / "5_order.json").write_text(json.dumps([dict(rec, video="o.mp4", question_type="order")]))
    (root / "json" / "9_summary.json").write_text(json.dumps([{"video": "s.mp4", "question": "?"}]))  # not read
    items, skips = _split(MLVU.load(tmp_path, LoadOptions(work=tmp_path)))  # the folder above MLVU/
    assert [i.id for i in items] == ["plotQA-0", "order-0"] and skips == {"plotQA-1": "bad_record"}
    assert items[0].answer == "B" and items[1].videos[0].path == root / "video" / "5_order" / "o.mp4"
    assert MLVU.prompt(items[0], LongVitaInput) == (  # long_vita_hf.py: named MLVU_MCQ, a Video-MCQ
        "Carefully watch this video and pay attention to every detail. Based on your observations, select the "
        "best option that accurately addresses the question.Question: What?\nOptions:\n(A) x\n(B) y<video>\n"
        "Only give the best option.Offer a very short reply.")
    assert MLVU.prompt(items[0], LongVitaInput, SERVER) == (  # long_vita.py: no system text; MLVU, an MCQ
        "Question: What?\nOptions:\n(A) x\n(B) y<video>\nOnly give the best option.\nAnswer with the letter.")
    rows = _rows([("B", "B", {"task": "plotQA"}), ("A", "B", {"task": "plotQA"}), ("A", "A", {"task": "plotQA"}),
                  ("A", "A", {"task": "order"})], choices={"A": "x", "B": "y"})
    res = MLVU.score(rows)
    # plotQA 2/3, order 1/1: M-Avg the mean of the task accuracies; VLMEvalKit pools 6 tasks at 37d08c5 (no order)
    assert res["m_avg"] == pytest.approx((2 / 3 + 1) / 2) and res["vlmevalkit_m_avg"] == pytest.approx(2 / 3)
    assert MLVU.score(rows, scorer=SCORERS["vlmevalkit-e8e78f0"])["vlmevalkit_m_avg"] == 0.75  # e8e78f0 pools order
    assert res["accuracy"] == 0.75


def test_end_to_end_with_the_tiny_model(videomme, mvbench, tokenizer_dir, tmp_path):
    t = load_tokenizer(tokenizer_dir)
    sp = special_token_ids(t)
    last = build_prompt([{"role": "user", "content": "?"}], InputFormat.of("tiny", t)).input_ids[-1]
    model = _always_b(sp, last, t.encode("B", add_special_tokens=False)[0])  # answers "B" to anything
    media = MediaOptions(max_frames=64, video_fps=1.0)
    for bench, data, want in ((VIDEO_MME, videomme, {"correct": 1, "count": 2}),
                              (MVBENCH, mvbench, {"correct": 2, "count": 2})):
        rows, asked = [], []
        for item in bench.load(data, LoadOptions(work=tmp_path, frames=64, fps=1.0, subtitles=True)):
            if isinstance(item, Skip):
                continue
            asked.append(item)
            text, gen = answer(model, InputFormat.of("tiny", t), [{"role": "user", "content": bench.prompt(item, InternVLInput)}],
                               videos=item.videos, max_new_tokens=bench.max_new_tokens, system_prompt=None,
                               media=media)
            rows.append(prediction_row(item, text))
        assert {r["prediction"] for r in rows} == {"B"}
        res = bench.score(rows)
        assert {k: res[k] for k in want} == want  # Video-MME: 001-1 (answer B) right, 001-2 (answer D) wrong
        if bench is VIDEO_MME:  # the prompts carried the lines of the frames the tiny (internvl) model saw
            assert [i.subtitles for i in asked] == [LINES["internvl"]] * 2


def test_lvita_eval_runs_every_video_layout_end_to_end(videomme, mvbench, always_b_hf, tmp_path, capsys):
    """``lvita eval --benchmark NAME --data DIR`` on each published video layout (Video-MME parquet + mp4 + srt,
    MVBench json + a frame folder + a time window, LongVideoBench json, MLVU json) with a tiny model that answers
    "B": results.json holds the hand-counted scores and the skips by reason."""
    from lvita import eval as lveval

    lvb = tmp_path / "lvb"
    write_video(lvb / "videos" / "v1.mp4", frames=8, fps=4, size=32)
    (lvb / "lvb_val.json").write_text(json.dumps([
        {"id": "q0", "video_path": "v1.mp4", "question": "Who?", "candidates": ["a", "b"], "correct_choice": 1,
         "duration_group": 15, "question_category": "S2E"},
        {"id": "q1", "video_path": "v1.mp4", "question": "What?", "candidates": ["a", "b", "c"], "correct_choice": 2,
         "duration_group": 600, "question_category": "T2O"},
        {"id": "q2", "video_path": "gone.mp4", "question": "?", "candidates": ["a", "b"], "correct_choice": 0}]))
    mlvu = tmp_path / "MLVU"
    (mlvu / "json").mkdir(parents=True)
    write_video(mlvu / "video" / "1_plotQA" / "p.mp4", frames=8, fps=4, size=32)
    rec = {"video": "p.mp4", "duration": 8, "question": "What?", "candidates": ["x", "y"], "question_type": "plotQA"}
    (mlvu / "json" / "1_plotQA.json").write_text(json.dumps([dict(rec, answer="y"), dict(rec, answer="x")]))
    cases = {  # name: (data, scores that must hold, skipped by reason)
        "Video-MME": (videomme, {"correct": 1, "count": 2}, {"missing_video": 1, "bad_record": 1, "duplicate_id": 1}),
        "MVBench": (mvbench, {"correct": 2, "count": 2}, {"bad_record": 1, "missing_video": 1}),
        "LongVideoBench": (lvb, {"correct": 1, "count": 2}, {"missing_video": 1}),
        "MLVU": (mlvu, {"correct": 1, "count": 2, "m_avg": 0.5}, {}),
    }
    for name, (data, want, skipped) in cases.items():
        out = tmp_path / f"{name}-eval"
        assert lveval.main(["--model", str(always_b_hf), "--benchmark", name, "--data", str(data), "--max-frames", "4",
                            "--subtitles", "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
        results = json.loads((out / "results.json").read_text())
        assert {k: results["scores"][k] for k in want} == want, (name, results["scores"])
        assert results["skipped"]["by_reason"] == skipped, (name, results["skipped"])
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert {r["prediction"] for r in rows} == {"B"} and len(rows) == want["count"]
