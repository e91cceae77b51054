"""What a benchmark loader yields and what a scorer reads back: Item, Skip, Benchmark, prediction rows.

A loader turns a benchmark's published files into :class:`Item` s (one question each); the driver builds
the prompt, answers it, and appends one prediction row per item to ``predictions.jsonl``
(:func:`prediction_row`). A scorer reads only those rows, so ``--score-only`` rescoring needs no model and
no benchmark files. A bad record is a :class:`Skip` (id, reason, detail), counted in results.json, never
fatal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from lvita.data.planned import Video  # noqa: F401 (the one video type; benchmark modules import it from here)


@dataclass
class Item:
    id: str  # unique within the benchmark: the key a rerun resumes by
    question: str  # the benchmark's question text, without options or instruction (the prompt adds them)
    images: list[Path] = field(default_factory=list)  # image files, in the order the prompt places them
    videos: list[Video] = field(default_factory=list)
    choices: dict[str, str] | None = None  # {"A": text, "B": ...} in order; None: open answer
    answer: str | list[str] = ""  # an option letter, "Yes"/"No", a text, or acceptable texts (OCRBench)
    hint: str | None = None  # MMBench-style context shown before the question
    subtitles: str | None = None  # subtitle lines for the sampled frames (Video-MME with subtitles)
    meta: dict = field(default_factory=dict)  # breakdown keys: category, split, duration, task_type, ...
    messages: list[dict] | None = None  # the whole conversation before the answer (lvita's JSONL sets), which
    #                                     the benchmark's prompt returns as is; None: the prompt builds the user's text


@dataclass
class Skip:
    id: str
    reason: str  # a short key counted in results.json ("missing_video", "bad_image", ...)
    detail: str  # what was wrong and where (file, row)


def prediction_row(item: Item, prediction: str, **extra) -> dict:
    """The JSON object predictions.jsonl holds for ``item``: everything a scorer needs."""
    return {"id": item.id, "prediction": prediction, "answer": item.answer, "choices": item.choices,
            "meta": item.meta, **extra}


@dataclass
class LoadOptions:
    """What a loader needs beyond the benchmark's path (from ``lvita eval``'s options)."""
    work: Path  # a folder the loader may write into (images decoded from base64 cells), under --out
    frames: int = 64  # --max-frames: most frames sampled per video (the paper sweeps 64-4096)
    fps: float = 1.0  # frames per second of video at most
    subtitles: bool = False  # --subtitles: Video-MME's with-subtitles setting
    media: bool = True  # False: read answers, options and categories only (rescoring): no image is decoded and
    #                     no video looked for, so an item missing its media is still scored


@dataclass
class Benchmark:
    """One published benchmark: how to read it, ask it and score it."""
    name: str
    load: Callable[[Path, LoadOptions], Iterator[Item | Skip]]  # (--data path, options) -> items in file order
    # (item, the model's InputFormat or its class, the lvita.evaluation.wrappers.Wrapper whose text to build,
    # default HF) -> the user's text, with one <image> / <video> placeholder per entry of item.images / videos,
    # or (lvita's JSONL sets) the whole conversation before the answer
    prompt: Callable[..., str | list[dict]]
    score: Callable[..., dict]  # score(rows, scorer=DEFAULT_SCORER): prediction rows (prediction_row) and the
    #                            lvita.evaluation.scorer.Scorer -> results: overall + breakdowns + "scorer"
    video: bool = False  # a video benchmark (the wrappers' video answer length, frame limits)
    wrapped: bool = True  # asked as Long-VITA's VLMEvalKit wrapper asks (the wrapper's text, answer length and
    #                       frame limits; no system prompt under longvita); False: lvita's own set, asked as
    #                       training encodes it
    max_new_tokens: int = 64  # the answer length of an unwrapped set (a wrapped one: Wrapper.max_new_tokens)

    def system_prompt(self, fmt, model_prompt: str | None) -> str | None:
        """The system prompt an item is asked with when --system-prompt is not given: none for a wrapped benchmark
        under a format without a default one (Long-VITA's VLMEvalKit wrappers send none), else the model's."""
        return None if self.wrapped and not fmt.model_format.default_system_prompt else model_prompt

    def default_out(self, data) -> Path:
        """``<data dir>/<NAME>-eval``; lvita's own sets are named by their file (``<data dir>/<stem>-eval``)."""
        return Path(data).parent / f"{self.name if self.wrapped else Path(data).stem}-eval"
