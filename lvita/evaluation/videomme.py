"""Video-MME as published (``lmms-lab/Video-MME``), with and without subtitles: :data:`VIDEO_MME`.

Owns reading the benchmark's files, the prompt Long-VITA's VLMEvalKit wrappers send (the same text from
both: Video-MME has no system text), the subtitle lines of the with-subtitles setting, and the
leaderboard's judge-free scoring:

- ``videomme/test-00000-of-00001.parquet`` (``--data`` is that file or the folder above
  ``videomme/``): columns ``videoID, duration (short/medium/long), domain, sub_category,
  task_type, question_id, question, options (["A. ...", ...]), answer (a letter)``.
- videos ``<videoID>.mp4`` in the data folder or its ``data/``, ``videos/`` or ``video/``
  (VLMEvalKit unzips into ``video/``); subtitles ``subtitle/<videoID>.srt`` (or ``subtitles/``).
- prompt: VLMEvalKit's ``vlmeval/dataset/videomme.py`` (pinned 37d08c5) ``build_prompt`` for a
  video model (the video, then ``FRAMES_TMPL_NOSUB``/``FRAMES_TMPL_SUB``, then ``Question: ...``
  + the options + ``Answer: ``: :func:`lvita.evaluation.prompts.videomme_text`), edited as the wrappers'
  ``build_msgs`` does for ``longvita`` (:func:`lvita.evaluation.prompts.longvita_finish`:
  ``"\\nAnswer: "`` becomes ``"\\n"``, then ``Offer a very short reply.``; no system prompt).
  ``internvl`` gets VLMEvalKit's text unedited.
- subtitles (``--subtitles``): for every sampled frame, the first cue whose span holds the
  frame's time strictly (``start < t < end``, t = round(frame / fps * 1000) ms, pysubs2's
  make_time), its lines joined by spaces; empty texts dropped, repeats kept, one per line.
  The frames are the ones the model sees (:func:`lvita.data.media.sampled_frames` with the model
  format's rule), so the prompt is built per format (``prompt(item, fmt)``). Departure: VLMEvalKit
  picks the lines by its own uniform frames (``int(i * n / (N + 1))``, i = 1..N, N = run.py's --nframe)
  while Long-VITA's wrappers sample the video themselves (HF: ``get_external_inputs``; server: the
  server); here the lines follow the frames actually fed. SRT markup
  (``<i>`` ...) is dropped (pysubs2 would turn it into ASS tags).
- score (with the :class:`lvita.evaluation.scorer.Scorer`): ``extract_characters_regex``
  (:func:`lvita.evaluation.video_common.first_letter`) of the prediction as VLMEvalKit's xlsx gives it
  back (``str``: "" is "nan"), equal to the answer (the same at 37d08c5 and e8e78f0); accuracy
  overall, per duration, domain, sub_category and task_type, and each of those within each duration
  (``get_dimension_rating``).

    items = list(VIDEO_MME.load(Path("Video-MME"), LoadOptions(work=out, frames=64, subtitles=True)))

Trade-off: an .srt is parsed at load time (once per video), the frames it is matched against at
prompt time (video metadata only).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lvita.evaluation.items import Benchmark, Item, LoadOptions, Skip, Video
from lvita.evaluation.prompts import longvita_finish, videomme_text
from lvita.evaluation.wrappers import HF, Wrapper
from lvita.evaluation.scorer import DEFAULT_SCORER, Scorer
from lvita.evaluation.video_common import Unique, accuracy, breakdown, first_letter, missing_video, read_back_text
from lvita.data.media import MediaError, sampled_frames
from lvita.errors import PathError

PARQUET = "videomme/test-00000-of-00001.parquet"
VIDEO_DIRS = ("", "data", "videos", "video")
SUBTITLE_DIRS = ("subtitle", "subtitles", "data/subtitle")
REQUIRED = ("videoID", "question", "options", "answer")
BREAKDOWNS = ("duration", "domain", "sub_category", "task_type")

_OPTION = re.compile(r"^([A-Z])\. (.*)$", re.S)
_TIME = r"(\d+):(\d+):(\d+)[,.](\d+)"
_CUE_TIMES = re.compile(_TIME + r"\s*-->\s*" + _TIME)


@dataclass(frozen=True)
class SubtitledVideo(Video):
    """A Video-MME video and what its subtitle lines need: the cues (None: without subtitles; []:
    asked for but no .srt) and the sampling the model will use (--max-frames, the fps cap)."""
    cues: list | None = field(default=None, compare=False)  # [(start ms, end ms, text)] in file order
    max_frames: int = 64
    sample_fps: float = 1.0


def read_srt(path: Path) -> list[tuple[int, int, str]]:
    """An .srt -> [(start ms, end ms, text)] in file order; a cue's lines joined by spaces."""
    text = Path(path).read_text(encoding="utf-8-sig", errors="replace").replace("\r\n", "\n")
    cues, current = [], None
    for line in text.split("\n"):
        times = _CUE_TIMES.search(line)
        if times:
            if current:
                cues.append(current)
            g = times.groups()
            ms = [int(h) * 3600000 + int(m) * 60000 + int(s) * 1000 + int(f.ljust(3, "0")[:3])
                  for h, m, s, f in (g[:4], g[4:])]
            current = (ms[0], ms[1], [])
        elif current is not None:
            current[2].append(line)
    if current:
        cues.append(current)
    out = []
    for start, end, lines in cues:
        while lines and (not lines[-1].strip() or lines[-1].strip().isdigit()):  # blank, next cue's number
            lines.pop()
        out.append((start, end, " ".join(re.sub(r"<[^>]+>", "", s).strip() for s in lines)))
    return out


def subtitle_lines(cues: list, frames: list[int], fps: float) -> str:
    """The with-subtitles text for these sampled frame numbers of a video at ``fps``."""
    lines = []
    for frame in frames:
        now = int(round(frame * (1000 / fps)))
        text = next((t for start, end, t in cues if start < now < end), "")
        if text.strip():
            lines.append(text)
    return "\n".join(lines)


def find_parquet(path: Path) -> Path:
    if path.is_file():
        return path
    for cand in (path / PARQUET, path / Path(PARQUET).name):
        if cand.is_file():
            return cand
    found = sorted(path.glob("videomme/*.parquet")) or sorted(path.glob("*.parquet"))
    if len(found) == 1:
        return found[0]
    raise PathError(f"--data {path}: expected Video-MME's {PARQUET} (or one .parquet) there; "
                    f"found {[str(f) for f in found] or 'none'}")


def _options(raw) -> dict[str, str] | None:
    """``['A. ...', 'B. ...', ...]`` (a list, or the array parquet gives) -> {letter: text}; None for
    anything else (a missing cell reads as NaN, a float)."""
    if isinstance(raw, (str, bytes, dict)) or not hasattr(raw, "__iter__"):
        return None
    opts = list(raw)
    if not opts:
        return None
    out = {}
    for i, o in enumerate(opts):
        m = _OPTION.match(str(o).strip())
        if not m or m[1] != chr(65 + i):
            return None
        out[m[1]] = m[2]
    return out


def load(path: Path, options: LoadOptions):
    """Video-MME's parquet -> Items (id: question_id), a Skip per bad row or missing video."""
    import pandas as pd

    parquet = find_parquet(Path(path))
    try:
        table = pd.read_parquet(parquet)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise PathError(f"--data {parquet}: cannot read it as parquet ({e})") from None
    if missing := [c for c in REQUIRED if c not in table.columns]:
        raise PathError(f"--data {parquet}: columns {missing} are missing (Video-MME has {list(REQUIRED)} ...)")
    root = parquet.parent.parent if parquet.parent.name == "videomme" else parquet.parent
    ids, cues_of = Unique(), {}
    for row, rec in enumerate(table.to_dict(orient="records")):
        vid = str(rec["videoID"])
        item_id = str(rec.get("question_id") or f"{vid}-{row}")
        where = f"{parquet} row {row}"
        if dup := ids.check(item_id, where):
            yield dup
            continue
        choices = _options(rec["options"])
        if choices is None or not isinstance(rec["answer"], str) or rec["answer"] not in choices:
            yield Skip(item_id, "bad_record", f"{where}: options must be ['A. ...', 'B. ...', ...] and answer one "
                                              f"of their letters; got {rec['options']!r}, {rec['answer']!r}")
            continue
        video = next((d for d in ((root / n / f"{vid}.mp4") for n in VIDEO_DIRS) if d.is_file()),
                     root / "video" / f"{vid}.mp4")
        if skip := missing_video(item_id, video, options.media):
            yield Skip(item_id, skip.reason, f"{where}: {vid}.mp4 is in none of {root}'s "
                                             f"{[n or '.' for n in VIDEO_DIRS]}")
            continue
        cues = None
        if options.subtitles:
            if vid not in cues_of:
                srt = next((p for p in (root / n / f"{vid}.srt" for n in SUBTITLE_DIRS) if p.is_file()), None)
                cues_of[vid] = read_srt(srt) if srt else []  # no .srt: the template with no lines, as VLMEvalKit
            cues = cues_of[vid]
        meta = {k: str(rec.get(k)) for k in BREAKDOWNS} | {"videoID": vid}
        yield Item(item_id, str(rec["question"]), videos=[SubtitledVideo(video, cues=cues, max_frames=options.frames,
                                                                           sample_fps=options.fps)],
                   choices=choices, answer=str(rec["answer"]), meta=meta)


def prompt(item: Item, fmt, wrapper: Wrapper = HF) -> str:
    """VLMEvalKit's Video-MME text (with this format's frames' subtitle lines), as both wrappers send it."""
    video = item.videos[0]
    cues = getattr(video, "cues", None)
    if cues is not None:
        try:
            frames = sampled_frames(video.path, video.max_frames, video.sample_fps, fmt.frames)
            item.subtitles = subtitle_lines(cues, frames, frames.fps)
        except MediaError:
            item.subtitles = ""  # the answer step raises the MediaError the driver counts
    text = videomme_text(item.question, item.choices, item.subtitles if cues is not None else None)
    return longvita_finish(text, "Video-MME", wrapper.dataset_type("Video-MME", "Video-MCQ")) \
        if fmt.wrapper_prompts else text


def verdicts(rows: list[dict], scorer: Scorer) -> list[int]:
    """``extract_characters_regex(str(prediction read back)) == answer`` (its judge-free fallback,
    ``extract_option``, finds no options in the question text: it never rescues an answer)."""
    return [int(first_letter(p) == r.get("answer")) for r, p in zip(rows, read_back_text(rows, scorer))]


def score(rows: list[dict], scorer: Scorer = DEFAULT_SCORER) -> dict:
    """Accuracy overall and per duration, domain, sub_category, task_type, and those per duration."""
    scores = verdicts(rows, scorer)
    out = accuracy(scores) | {k: breakdown(rows, scores, k) for k in BREAKDOWNS}
    out["per_duration"] = {}
    for d in out["duration"]:
        sub = [(r, s) for r, s in zip(rows, scores) if str(r["meta"].get("duration")) == d]
        rs, ss = [r for r, _ in sub], [s for _, s in sub]
        out["per_duration"][d] = {k: breakdown(rs, ss, k) for k in BREAKDOWNS[1:]}
    return out | {"scorer": scorer.summary()}


VIDEO_MME = Benchmark("Video-MME", load, prompt, score, video=True)
