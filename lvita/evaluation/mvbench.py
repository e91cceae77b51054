"""MVBench as published (``OpenGVLab/MVBench``): :data:`MVBENCH`, 20 tasks scored per task.

Owns reading the benchmark's files, the prompt Long-VITA's VLMEvalKit wrappers send and the
judge-free scoring, following VLMEvalKit's ``vlmeval/dataset/mvbench.py`` at the commit Long-VITA
pins (37d08c5):

- ``--data`` is the folder holding ``json/<task>.json`` (records ``video, question, candidates,
  answer`` (the right candidate's text), optional ``start``/``end`` seconds) and ``video/``
  (unzipped). :data:`TASKS` maps each task to its json, its video folder (VLMEvalKit's
  ``your_data_path`` is ``video``), the data type (``video``: a file; ``frame``: a folder of jpgs
  recorded at 3 fps) and whether ``start``/``end`` bound it.
- frames: VLMEvalKit hands a video model the file (a frame folder made into an mp4 at 3 fps, a
  bounded one cut to ``start .. min(end, duration)``); here the item's video carries the window
  (and the folder's 3 fps) and lvita.data.media samples inside it by the model format's rule.
- options ``(A) text`` in candidate order; the answer letter is the answer text's position.
- prompt (``longvita``): VLMEvalKit's messages are the system text (``role='system'``), ``Question:
  ...\\nOptions:\\n(A) ...``, the video, ``\\nOnly give the best option.`` and the assistant prefill
  ``Best option:(``; ``build_msgs`` removes ``Only give the best option.Best option:(`` and appends
  ``Answer with the letter.``. The HF wrapper (``long_vita_hf.py``, a local model to VLMEvalKit) joins
  every message, system text first; the server wrapper (``long_vita.py``) gets none of it
  (``BaseAPI.generate`` moves it into a system prompt the wrapper never sends):
  :attr:`lvita.evaluation.wrappers.Wrapper.system_text`. ``internvl``: VLMEvalKit's text without the
  assistant prefill.
- score (:func:`score`, with the :class:`lvita.evaluation.scorer.Scorer`):
  :func:`lvita.evaluation.video_common.first_word_matches` on the prediction as VLMEvalKit's xlsx gives
  it back; accuracy per task, overall (all questions, VLMEvalKit's "overall") and the mean of the task
  accuracies. A prediction that reads back as no text ("", "None", "N/A": NaN) crashes VLMEvalKit's
  evaluate at 37d08c5: scored wrong, counted in ``crashes_vlmevalkit``; at e8e78f0 it is left unscored
  and rated right (``unscored_rated_right``), as VLMEvalKit's own rating does.

Trade-off: only files are checked at load time; a video decord cannot read fails when answered
(the driver counts that MediaError).
"""
from __future__ import annotations

from pathlib import Path

from lvita.evaluation.items import Benchmark, Item, LoadOptions, Skip, Video
from lvita.evaluation.prompts import longvita_finish
from lvita.evaluation.wrappers import HF, Wrapper
from lvita.evaluation.scorer import DEFAULT_SCORER, Scorer
from lvita.evaluation.video_common import (Unique, accuracy, breakdown, crash_counts, crash_reason,
                                          first_word_matches, lettered, missing_video, read_json_list)
from lvita.errors import PathError

FRAME_FPS = 3  # VLMEvalKit's frame_fps: the rate of MVBench's frame-folder tasks (tvqa frames_fps3_hq)

# task -> (json file, video folder under --data, data type, bounded by start/end): vlmeval/dataset/mvbench.py
TASKS = {
    "Action Sequence": ("action_sequence.json", "video/star/Charades_v1_480/", "video", True),
    "Action Prediction": ("action_prediction.json", "video/star/Charades_v1_480/", "video", True),
    "Action Antonym": ("action_antonym.json", "video/ssv2_video/", "video", False),
    "Fine-grained Action": ("fine_grained_action.json", "video/Moments_in_Time_Raw/videos/", "video", False),
    "Unexpected Action": ("unexpected_action.json", "video/FunQA_test/test/", "video", False),
    "Object Existence": ("object_existence.json", "video/clevrer/video_validation/", "video", False),
    "Object Interaction": ("object_interaction.json", "video/star/Charades_v1_480/", "video", True),
    "Object Shuffle": ("object_shuffle.json", "video/perception/videos/", "video", False),
    "Moving Direction": ("moving_direction.json", "video/clevrer/video_validation/", "video", False),
    "Action Localization": ("action_localization.json", "video/sta/sta_video/", "video", True),
    "Scene Transition": ("scene_transition.json", "video/scene_qa/video/", "video", False),
    "Action Count": ("action_count.json", "video/perception/videos/", "video", False),
    "Moving Count": ("moving_count.json", "video/clevrer/video_validation/", "video", False),
    "Moving Attribute": ("moving_attribute.json", "video/clevrer/video_validation/", "video", False),
    "State Change": ("state_change.json", "video/perception/videos/", "video", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "video/nturgbd/", "video", False),
    "Character Order": ("character_order.json", "video/perception/videos/", "video", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "video/vlnqa/", "video", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "video/tvqa/frames_fps3_hq/", "frame", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "video/clevrer/video_validation/", "video", False),
}

SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, "
          "the detail and movement of objects, and the action and pose of persons. "
          "Based on your observations, select the best option that accurately addresses the question.\n")


def _seconds(value):
    return None if value is None else float(value)


def load(path: Path, options: LoadOptions):
    """json/<task>.json of every task present -> Items (id ``<json stem>-<row>``); a task whose json is
    absent is left out (named in no Skip: the benchmark as downloaded may lack one, e.g. NTU RGB+D)."""
    root = Path(path)
    if not (root / "json").is_dir():
        raise PathError(f"--data {root}: expected MVBench's json/ folder (json/<task>.json) and video/ there")
    present = [t for t, spec in TASKS.items() if (root / "json" / spec[0]).is_file()]
    if not present:
        raise PathError(f"--data {root}: json/ holds none of MVBench's task files ({TASKS['Action Sequence'][0]}, ...)")
    ids = Unique()
    for task in present:
        file, folder, kind, bounded = TASKS[task]
        stem = Path(file).stem
        for row, rec in enumerate(read_json_list(root / "json" / file, "MVBench task file")):
            item_id, where = f"{stem}-{row}", f"{root / 'json' / file} record {row}"
            if dup := ids.check(item_id, where):
                yield dup
                continue
            try:
                cands, answer, video = list(rec["candidates"]), str(rec["answer"]), str(rec["video"])
                start = _seconds(rec.get("start")) if bounded else None
                end = _seconds(rec.get("end")) if bounded else None
            except (KeyError, TypeError, ValueError) as e:
                yield Skip(item_id, "bad_record", f"{where}: needs video, question, candidates (a list), "
                                                  f"answer, numeric start/end ({type(e).__name__}: {e})")
                continue
            choices = lettered(cands)
            letter = next((k for k, v in choices.items() if v == answer), None)
            if letter is None or not isinstance(rec.get("question"), str):
                yield Skip(item_id, "bad_record", f"{where}: the answer {answer!r} is none of the candidates "
                                                  f"{cands}, or the question is not a string")
                continue
            file_path = root / folder / video
            if skip := missing_video(item_id, file_path, options.media):
                yield Skip(item_id, skip.reason, f"{where}: {skip.detail}")
                continue
            clip = Video(file_path, start, end, fps=FRAME_FPS if kind == "frame" else None)
            yield Item(item_id, rec["question"], videos=[clip], choices=choices, answer=letter,
                       meta={"task": task, "answer_text": answer})


def question_block(item: Item) -> str:
    """VLMEvalKit's ``qa_template``: ``Question: q\\nOptions:\\n(A) x\\n(B) y`` (no trailing newline)."""
    return "\n".join([f"Question: {item.question}", "Options:"] + [f"({k}) {v}" for k, v in item.choices.items()])


def prompt(item: Item, fmt, wrapper: Wrapper = HF) -> str:
    body = question_block(item) + "<video>" + "\nOnly give the best option."
    if fmt.wrapper_prompts:  # the wrapper joins VLMEvalKit's assistant prefill, then drops it with the instruction
        text = (SYSTEM if wrapper.system_text else "") + body + "Best option:("
        return longvita_finish(text, "MVBench", wrapper.dataset_type("MVBench", "Video-MCQ"))
    return SYSTEM + body


def verdicts(rows: list[dict], scorer: Scorer) -> tuple[list[int | None], list[str | None]]:
    """Per row: VLMEvalKit's score (1, 0, or None: left unscored) and why its evaluate would crash instead."""
    scores, crashes = [], []
    for r, p in zip(rows, scorer.read_back([r.get("prediction", "") for r in rows])):
        why = crash_reason(p)
        if why == "empty_or_na_prediction" and scorer.mvbench_skips_na:
            scores.append(None)  # e8e78f0 mvbench.py line 399: the loop is over data_un (non-NaN predictions)
            crashes.append(None)
        else:
            scores.append(0 if why else int(first_word_matches(p, r["answer"], r["choices"], scorer)))
            crashes.append(why)
    return scores, crashes


def score(rows: list[dict], scorer: Scorer = DEFAULT_SCORER) -> dict:
    """Accuracy per task, overall (every question) and the mean over tasks. A prediction on which
    VLMEvalKit's evaluate crashes counts wrong (``crashes_vlmevalkit``); one it leaves unscored counts
    right, as its ``get_dimension_rating`` (``if item['score']``, utils/mvbench.py line 21 at e8e78f0:
    NaN is true) rates it (``unscored_rated_right``)."""
    raw, crashes = verdicts(rows, scorer)
    scores = [1 if s is None else s for s in raw]
    tasks = breakdown(rows, scores, "task")
    mean = sum(t["accuracy"] for t in tasks.values()) / len(tasks) if tasks else None
    return accuracy(scores) | {"task": tasks, "task_mean": mean, "scorer": scorer.summary(),
                               "crashes_vlmevalkit": crash_counts(crashes),
                               "unscored_rated_right": raw.count(None)}


MVBENCH = Benchmark("MVBench", load, prompt, score, video=True)
