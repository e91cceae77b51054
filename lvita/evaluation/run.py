"""The evaluation driver: load a catalog entry's items, answer each greedily, append, score, report.

Owns what ``lvita eval --data PATH [--benchmark NAME]`` and ``--score-only FILE`` do (their command line:
:mod:`lvita.evaluation.command`), for every benchmark of the catalog, lvita's own JSONL sets included.
:func:`evaluate_benchmark` reads the items (``bench.load``), builds each prompt (``bench.prompt`` for the
model's format: the user's text as the evaluated model's VLMEvalKit wrapper builds it, or a JSONL set's own
conversation), answers it with :func:`lvita.infer.generate.answer`, and appends one prediction row per item
to ``<out>/predictions.jsonl``, flushed, so a killed run loses at most the item in flight:

- resumable: a rerun skips the ids already in predictions.jsonl; a torn last line (a kill mid-write, no
  newline) is cut off and that item answered again;
- skipped, never fatal: a loader's :class:`Skip`, a prompt or media error (SampleError, MediaError,
  ContextError) is counted by reason in results.json with the id and what was wrong;
- a progress line (done/total, items/s, ETA) on stderr every ``PROGRESS_SECONDS`` and at the end;
- results.json (atomically, last): ``scores`` = ``bench.score(rows, scorer)`` with every breakdown, the
  scorer and wrapper (name, source, commit), counts, skipped items, options, the exact command
  (``sys.argv``) and ``lvita eval``'s own arguments. With ``write=False`` (ranks other than 0 of a
  context-parallel run) nothing is written; those ranks read predictions.jsonl to skip the same items.

:func:`score_only` rescores without a model: lvita's predictions.jsonl as stored, or an ``{id, prediction}``
JSONL / VLMEvalKit's result table joined to the benchmark's items (:mod:`lvita.evaluation.predictions`), so
its ``scores`` equal the run's. Trade-off: one item at a time (no batching), and all rows of
predictions.jsonl are scored, so reuse an --out folder only for the same benchmark file.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from lvita.evaluation.items import Benchmark, LoadOptions, Skip, prediction_row
from lvita.evaluation.predictions import read_predictions, scoring_rows
from lvita.evaluation.prompts import postprocess
from lvita.evaluation.scorer import DEFAULT_SCORER, Scorer
from lvita.evaluation.wrappers import HF, Wrapper
from lvita.ckpt.checkpoint import atomic_write
from lvita.data.media import MediaError
from lvita.data.template import SampleError
from lvita.infer.generate import answer

PROGRESS_SECONDS = 5.0


def stderr(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class Progress:
    """``[eval] NAME 120/2000 items, 1.52 items/s, ETA 20m36s`` every few seconds (stderr)."""

    def __init__(self, name: str, total: int, done: int, log, every: float = PROGRESS_SECONDS):
        self.name, self.total, self.done, self.log, self.every = name, total, done, log, every
        self.start = self.last = time.perf_counter()
        self.new, self.shown = 0, -1

    def step(self, final: bool = False) -> None:
        if not final:
            self.done, self.new = self.done + 1, self.new + 1
        now = time.perf_counter()
        if (final and self.shown == self.done) or (not final and now - self.last < self.every
                                                    and self.done < self.total):
            return
        self.last, self.shown = now, self.done
        rate = self.new / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = "?" if eta == float("inf") else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        self.log(f"[eval] {self.name} {self.done}/{self.total} items, {rate:.2f} items/s, ETA {eta_s}")


def _options(answer_opts: dict, load_opts: LoadOptions, fmt) -> dict:
    plain = {k: v if isinstance(v, (int, float, str, type(None))) else vars(v)
             for k, v in answer_opts.items() if k != "decode"}
    return {"format": fmt.model_format.name, **plain, "frames": load_opts.frames, "fps": load_opts.fps,
            "subtitles": load_opts.subtitles}


def _skip_record(skip: Skip) -> dict:
    return {"id": skip.id, "reason": skip.reason, "detail": skip.detail}


def evaluate_benchmark(model, fmt, bench: Benchmark, data, out, load_opts: LoadOptions,
                       answer_opts: dict, write: bool = True, log=stderr,
                       arguments: list[str] | None = None, wrapper: Wrapper = HF, scorer: Scorer = DEFAULT_SCORER) -> dict:
    """Answer every item of ``bench`` read from ``data`` not already in ``<out>/predictions.jsonl``; score
    all rows; write results.json (when ``write``); -> the results dict. ``answer_opts``: answer()'s
    keywords (max_new_tokens, system_prompt, media, max_context, decode); ``fmt``: the model's InputFormat."""
    out, t0 = Path(out), time.perf_counter()
    preds_path = out / "predictions.jsonl"
    if write:
        out.mkdir(parents=True, exist_ok=True)
    else:
        log = lambda *a: None  # noqa: E731
    done = {r["id"] for r in read_predictions(preds_path, cut_torn=write)}
    items, skipped, seen = [], [], set()
    for entry in bench.load(Path(data), load_opts):
        if isinstance(entry, Skip):
            skipped.append(_skip_record(entry))
        elif entry.id in seen:
            skipped.append({"id": entry.id, "reason": "duplicate_id", "detail": f"{data}: id {entry.id} again"})
        else:
            seen.add(entry.id)
            items.append(entry)
    n_loader_skips, n_written = len(skipped), 0
    pending = [item for item in items if item.id not in done]
    progress = Progress(bench.name, len(items), len(items) - len(pending), log)
    log(f"[eval] {bench.name}: {len(items)} items ({len(items) - len(pending)} already answered in {preds_path}), "
        f"{len(skipped)} skipped by the loader")
    sink = open(preds_path, "a", encoding="utf-8") if write else None
    try:
        for item in pending:
            try:
                asked = bench.prompt(item, fmt, wrapper)
                messages = asked if isinstance(asked, list) else [{"role": "user", "content": asked}]
                raw, gen = answer(model, fmt, messages, item.images, item.videos, **answer_opts)
            except (SampleError, MediaError) as e:  # ContextError is a SampleError ("too_long")
                skipped.append({"id": item.id, "reason": getattr(e, "reason", "bad_media"), "detail": str(e)})
                log(f"[eval] {bench.name} item {item.id}: skipped ({skipped[-1]['reason']}): {e}")
                progress.step()
                continue
            prediction = postprocess(raw, fmt, wrapper) if bench.wrapped else raw
            row = prediction_row(item, prediction, stop=gen.stop, **({"raw": raw} if raw != prediction else {}))
            if sink is not None:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
            n_written += 1
            progress.step()
    finally:
        if sink is not None:
            sink.close()
    progress.step(final=True)
    rows = read_predictions(preds_path) if write else []
    results = {"benchmark": bench.name, "data": str(data), "items": len(items) + n_loader_skips,
               "answered": len(rows), "answered_this_run": n_written,
               "scores": bench.score(rows, scorer) if write else None,
               **_provenance(wrapper=wrapper if bench.wrapped else None, scorer=scorer),
               "skipped": {"count": len(skipped), "by_reason": dict(Counter(s["reason"] for s in skipped)),
                           "items": skipped},
               "stops": dict(Counter(r.get("stop") for r in rows)), "seconds": round(time.perf_counter() - t0, 2),
               "options": _options(answer_opts, load_opts, fmt),
               "command": list(sys.argv), "arguments": arguments}
    if write:
        atomic_write(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        log(f"[eval] {bench.name}: overall {summary(results['scores'])}, {len(rows)} answered, {len(skipped)} "
            f"skipped; wrote {out / 'results.json'}")
    return results


def summary(scores: dict) -> str:
    overall = scores.get("overall")
    return json.dumps(overall["accuracy"] if isinstance(overall, dict) and "accuracy" in overall else overall)


def _provenance(**objects) -> dict:
    """results.json's record of the wrapper and scorer used: name and where it comes from."""
    return {k: {"name": v.name, "source": getattr(v, "source", None), "commit": getattr(v, "commit", None),
                "description": getattr(v, "description", None)} for k, v in objects.items() if v is not None}


def score_only(bench: Benchmark, predictions, out=None, arguments: list[str] | None = None,
               log=stderr, data=None, scorer: Scorer = DEFAULT_SCORER) -> dict:
    """Rescore ``predictions`` (lvita's predictions.jsonl, an id/prediction JSONL or VLMEvalKit's result
    .xlsx/.tsv/.csv; the last two need the benchmark's files, ``data``) with ``bench.score``; write
    results.json into ``out`` (default: beside the predictions). A results.json of the same benchmark already
    there keeps its counts, skipped items and options (the run's); ``scores``, ``answered``, the scorer,
    ``command`` and ``arguments`` are replaced."""
    predictions = Path(predictions)
    rows, report = scoring_rows(bench, predictions, None if data is None else Path(data),
                                None if out is None else Path(out) / "work")
    dest = Path(out) if out is not None else predictions.parent
    dest.mkdir(parents=True, exist_ok=True)
    previous = {}
    if (dest / "results.json").is_file():
        try:
            previous = json.loads((dest / "results.json").read_text())
        except ValueError:
            previous = {}
        if not isinstance(previous, dict) or previous.get("benchmark") != bench.name:
            previous = {}
    results = {**previous, "benchmark": bench.name, "answered": len(rows), "scores": bench.score(rows, scorer),
               **_provenance(scorer=scorer), "stops": dict(Counter(r.get("stop") for r in rows)),
               "rescored_from": str(predictions), "prediction_file": report,
               "command": list(sys.argv), "arguments": arguments}
    atomic_write(dest / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    missing = report.get("unanswered", {}).get("count", 0)
    log(f"[eval] {bench.name}: overall {summary(results['scores'])} over {len(rows)} rows"
        + (f" ({missing} items of the benchmark have no prediction)" if missing else "")
        + f"; wrote {dest / 'results.json'}")
    return results
