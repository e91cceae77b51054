"""LongVideoBench and MLVU (multiple choice) as published: :data:`LONGVIDEOBENCH`, :data:`MLVU`.

Owns reading both benchmarks' files, the prompts Long-VITA's VLMEvalKit wrappers send and their
judge-free scoring, following VLMEvalKit at the :class:`lvita.evaluation.scorer.Scorer` 's commit
(37d08c5, the one Long-VITA pins, by default; e8e78f0), predictions read back as its xlsx gives them:

- LongVideoBench (``vlmeval/dataset/longvideobench.py``): ``--data`` holds ``lvb_val.json``
  (records ``id, video_id, video_path, question, candidates, correct_choice`` (int),
  ``duration_group`` (15/60/600/3600), ``question_category``) and ``videos/<video_path>``.
  Prompt: the video, the question, ``A. ...`` lines, ``Answer with the option's letter from the
  given choices directly.``, then the wrappers' ``Offer a very short reply.`` (a video model gets
  no subtitles in VLMEvalKit; its system text is empty: the same text from both wrappers). Score:
  ``extract_characters_regex`` over A-E (:func:`lvita.evaluation.video_common.first_letter`);
  accuracy overall, per duration group, per question category and per category within each
  duration group.
- MLVU multiple choice (``vlmeval/dataset/mlvu.py``, ``MLVU_MCQ``): ``--data`` holds ``json/``
  and ``video/`` (or ``MLVU/json``, ``MLVU/video`` as downloaded): ``json/<n>_<task>.json``
  (records ``video, question, candidates, answer`` text, ``question_type``) and
  ``video/<n>_<task>/<video>`` for the 7 tasks of :data:`MLVU_TASKS`. The generation tasks
  (8_sub_scene, 9_summary) need a judge model: not read. Prompt: VLMEvalKit's messages are the
  system text (``role='system'``), ``Question: ...\\nOptions:\\n(A) ...``, the video, ``\\nOnly give
  the best option.``. The HF wrapper (``long_vita_hf.py``) joins them all and, named ``MLVU_MCQ``
  (VLMEvalKit's ``infer_data`` passes the sub-dataset), of type Video-MCQ, appends ``Offer a very short
  reply.``; the server wrapper (``long_vita.py``) gets no system text and, named ``MLVU`` (an
  unannotated type: MCQ), strips the text and appends ``\\nAnswer with the letter.``
  (:class:`lvita.evaluation.wrappers.Wrapper`). Score:
  MLVU's own rule (:func:`lvita.evaluation.video_common.mlvu_matches`: the letter before ")",
  case-sensitive, else can_infer; it was MVBench's first-word rule before the scorers were checked
  against VLMEvalKit); a prediction that reads back as no text crashes VLMEvalKit's evaluate (both
  commits): scored wrong, counted in ``crashes_vlmevalkit``. Accuracy per task, overall and M-Avg, the
  mean of the 7 task accuracies (MLVU's definition; VLMEvalKit pools the questions of 6 of them,
  leaving ``order`` out at 37d08c5, all 7 at e8e78f0, reported as ``vlmevalkit_m_avg``).

Trade-off: only files are checked at load time; a video decord cannot read fails when answered
(the driver counts that MediaError).
"""
from __future__ import annotations

from pathlib import Path

from lvita.evaluation.items import Benchmark, Item, LoadOptions, Skip, Video
from lvita.evaluation.mvbench import question_block
from lvita.evaluation.prompts import longvita_finish
from lvita.evaluation.wrappers import HF, Wrapper
from lvita.evaluation.scorer import DEFAULT_SCORER, Scorer
from lvita.evaluation.video_common import (Unique, accuracy, breakdown, crash_counts, crash_reason, first_letter,
                                          lettered, missing_video, mlvu_matches, read_back_text, read_json_list)
from lvita.errors import PathError

# -- LongVideoBench -----------------------------------------------------------------------------------

LVB_FILE = "lvb_val.json"


def load_lvb(path: Path, options: LoadOptions):
    """lvb_val.json -> Items (id: the record's ``id``, else ``<video_id>-<row>``)."""
    path = Path(path)
    file = path if path.is_file() else path / LVB_FILE
    if not file.is_file():
        raise PathError(f"--data {path}: expected LongVideoBench's {LVB_FILE} there (and videos/)")
    ids = Unique()
    for row, rec in enumerate(read_json_list(file, "LongVideoBench file")):
        rec = rec if isinstance(rec, dict) else {}
        item_id, where = str(rec.get("id") or f"{rec.get('video_id')}-{row}"), f"{file} record {row}"
        if dup := ids.check(item_id, where):
            yield dup
            continue
        cands, right = rec.get("candidates"), rec.get("correct_choice")
        if not (isinstance(rec.get("video_path"), str) and isinstance(rec.get("question"), str)
                and isinstance(cands, list) and isinstance(right, int) and 0 <= right < len(cands) <= 5):
            yield Skip(item_id, "bad_record", f"{where}: needs video_path, question, candidates (a list of at most 5) "
                                              f"and correct_choice (an index into them)")
            continue
        video = file.parent / "videos" / rec["video_path"]
        if skip := missing_video(item_id, video, options.media):
            yield Skip(item_id, skip.reason, f"{where}: {skip.detail}")
            continue
        yield Item(item_id, rec["question"], videos=[Video(video)], choices=lettered(cands), answer="ABCDE"[right],
                   meta={"duration_group": str(rec.get("duration_group")),
                         "question_category": str(rec.get("question_category"))})


def prompt_lvb(item: Item, fmt, wrapper: Wrapper = HF) -> str:
    opts = "\n".join(f"{k}. {v}" for k, v in item.choices.items())
    text = "<video>" + f"{item.question}\n{opts}\nAnswer with the option's letter from the given choices directly."
    return longvita_finish(text, "LongVideoBench", wrapper.dataset_type("LongVideoBench", "Video-MCQ")) \
        if fmt.wrapper_prompts else text


def verdicts_lvb(rows: list[dict], scorer: Scorer) -> list[int]:
    """``extract_characters_regex`` over A-E of ``str(prediction read back)`` equal to the answer."""
    return [int(first_letter(p, "ABCDE") == r["answer"]) for r, p in zip(rows, read_back_text(rows, scorer))]


def score_lvb(rows: list[dict], scorer: Scorer = DEFAULT_SCORER) -> dict:
    """Accuracy overall, per duration group, per question category, and categories per duration group."""
    scores = verdicts_lvb(rows, scorer)
    out = accuracy(scores) | {k: breakdown(rows, scores, k) for k in ("duration_group", "question_category")}
    out["per_duration_group"] = {
        d: breakdown(*zip(*[(r, s) for r, s in zip(rows, scores) if r["meta"]["duration_group"] == d]),
                     "question_category") for d in out["duration_group"]}
    return out | {"scorer": scorer.summary()}


LONGVIDEOBENCH = Benchmark("LongVideoBench", load_lvb, prompt_lvb, score_lvb, video=True)

# -- MLVU ---------------------------------------------------------------------------------------------

MLVU_TASKS = {"plotQA": "1_plotQA", "needle": "2_needle", "ego": "3_ego", "count": "4_count",
              "order": "5_order", "anomaly_reco": "6_anomaly_reco", "topic_reasoning": "7_topic_reasoning"}
MLVU_SYSTEM = ("Carefully watch this video and pay attention to every detail. "
               "Based on your observations, select the best option that accurately addresses the question.")


def load_mlvu(path: Path, options: LoadOptions):
    """json/<n>_<task>.json of the multiple-choice tasks present -> Items (id ``<task>-<row>``)."""
    base = next((b for b in (Path(path), Path(path) / "MLVU") if (b / "json").is_dir()), None)
    present = [t for t, stem in MLVU_TASKS.items() if base and (base / "json" / f"{stem}.json").is_file()]
    if not present:
        raise PathError(f"--data {path}: expected MLVU's json/<n>_<task>.json (1_plotQA.json ... 7_topic_reasoning"
                        f".json) and video/ there or under MLVU/")
    ids = Unique()
    for task in present:
        stem = MLVU_TASKS[task]
        file = base / "json" / f"{stem}.json"
        for row, rec in enumerate(read_json_list(file, "MLVU task file")):
            rec = rec if isinstance(rec, dict) else {}
            item_id, where = f"{task}-{row}", f"{file} record {row}"
            if dup := ids.check(item_id, where):
                yield dup
                continue
            cands = rec.get("candidates")
            choices = lettered(cands) if isinstance(cands, list) else {}
            letter = next((k for k, v in choices.items() if v == str(rec.get("answer"))), None)
            if letter is None or not isinstance(rec.get("video"), str) or not isinstance(rec.get("question"), str):
                yield Skip(item_id, "bad_record", f"{where}: needs video, question, candidates (a list) and the "
                                                  f"answer as one candidate's text")
                continue
            video = base / "video" / stem / rec["video"]
            if skip := missing_video(item_id, video, options.media):
                yield Skip(item_id, skip.reason, f"{where}: {skip.detail}")
                continue
            yield Item(item_id, rec["question"], videos=[Video(video)], choices=choices, answer=letter,
                       meta={"task": task, "question_type": str(rec.get("question_type", task))})


def prompt_mlvu(item: Item, fmt, wrapper: Wrapper = HF) -> str:
    body = question_block(item) + "<video>" + "\nOnly give the best option."
    if not fmt.wrapper_prompts:
        return MLVU_SYSTEM + body
    text = (MLVU_SYSTEM if wrapper.system_text else "") + body
    return longvita_finish(text, "MLVU", wrapper.dataset_type("MLVU", "Video-MCQ"))  # MLVU_MCQ's own type


def verdicts_mlvu(rows: list[dict], scorer: Scorer) -> tuple[list[int], list[str | None]]:
    """Per row: MLVU's own rule (:func:`lvita.evaluation.video_common.mlvu_matches`) on the prediction read
    back, and why VLMEvalKit's evaluate would crash on it instead (both commits: every row is looped)."""
    scores, crashes = [], []
    for r, p in zip(rows, scorer.read_back([r.get("prediction", "") for r in rows])):
        why = crash_reason(p)
        scores.append(0 if why else int(mlvu_matches(p, r["answer"], r["choices"], scorer)))
        crashes.append(why)
    return scores, crashes


def score_mlvu(rows: list[dict], scorer: Scorer = DEFAULT_SCORER) -> dict:
    """Accuracy per task, overall, M-Avg (mean of task accuracies) and VLMEvalKit's M-Avg (the questions of
    ``scorer.mlvu_m_avg_tasks`` pooled; VLMEvalKit prints it in percent, rounded to 0.1). A
    prediction VLMEvalKit's evaluate crashes on counts wrong (``crashes_vlmevalkit``)."""
    scores, crashes = verdicts_mlvu(rows, scorer)
    tasks = breakdown(rows, scores, "task")
    pooled = [s for r, s in zip(rows, scores) if r["meta"]["task"] in scorer.mlvu_m_avg_tasks]
    return accuracy(scores) | {
        "task": tasks, "m_avg": sum(t["accuracy"] for t in tasks.values()) / len(tasks) if tasks else None,
        "vlmevalkit_m_avg": accuracy(pooled)["accuracy"], "scorer": scorer.summary(),
        "crashes_vlmevalkit": crash_counts(crashes)}


MLVU = Benchmark("MLVU", load_mlvu, prompt_mlvu, score_mlvu, video=True)
