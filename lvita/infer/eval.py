"""Accuracy of a model on a JSONL benchmark: greedy answers, scored, per category.

Owns ``lvita eval``. Items are in the training sample format (``messages`` or ``conversations``,
optional ``images``/``videos`` relative to the JSONL file's directory, optional ``id``); the final
assistant message holds the reference answer, everything before it is the prompt. Two optional
keys::

    {"id": "q1", "category": "colour", "images": ["img/1.png"], "choices": ["red", "blue"],
     "messages": [{"role": "user", "content": "<image>\\nWhich colour? A. red B. blue"},
                  {"role": "assistant", "content": "B"}]}

- ``choices`` (a list): multiple choice. Options are letters: the choices themselves when every
  one is a single letter (``["A", "B", "C"]``), else A, B, C... by position. The predicted option
  is the first option letter standing alone in the answer ("B", "(B)", "B. blue", "answer: B");
  failing that, the option whose text equals the whole answer (normalised). The reference is
  resolved the same way; an item whose reference names no option is skipped.
- otherwise short answer: normalised exact match (lowercase, punctuation and the articles a/an/the
  removed, whitespace collapsed), as SQuAD's.
- ``category`` (default "default") groups the accuracy in results.json.

    python -m lvita.eval --model runs/stage4 --data bench/mmb.jsonl [--out DIR] [--max-new-tokens 16]

Writes ``predictions.jsonl`` (id, category, kind, prediction, reference, correct, stop) and
``results.json`` (accuracy overall and per category, counts, skipped items with reasons) into
``--out`` (default: ``<data dir>/<data stem>-eval``), each via a temp file and a rename, results
last: a results.json is always a finished run. Bad items (malformed JSON or conversation, no
final reference, placeholder/media mismatch, missing or unreadable media, prompt over the
context) are skipped and counted, never fatal. Trade-offs: one item at a time (no batching);
letter extraction is a heuristic: an answer opening with the article "A" reads as option A.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
import time
from collections import Counter
from pathlib import Path

from lvita.ckpt.checkpoint import atomic_write
from lvita.data.media import MediaError
from lvita.data.formats import normalise_messages
from lvita.data.template import SampleError
from lvita.errors import PathError, run_main
from lvita.infer.generate import add_model_args, answer, load_for_args, options

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def option_letters(choices: list) -> list[str]:
    if all(isinstance(c, str) and re.fullmatch(r"[A-Za-z]", c.strip()) for c in choices):
        return [c.strip().upper() for c in choices]
    return [chr(ord("A") + i) for i in range(len(choices))]


def choice_of(text: str, choices: list) -> str | None:
    """The option ``text`` picks: the first option letter standing alone, else an option's full text."""
    letters = option_letters(choices)
    for m in re.finditer(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text):
        if m.group(1) in letters:
            return m.group(1)
    norm = normalise_answer(text)
    hits = [letter for letter, c in zip(letters, choices) if norm and normalise_answer(str(c)) == norm]
    return hits[0] if len(hits) == 1 else None


def prepare(raw, base: Path) -> dict:
    """A parsed JSONL line -> {"messages", "images", "videos", "reference", "choices", ...}; raises
    SampleError with a reason for anything unusable."""
    if not isinstance(raw, dict):
        raise SampleError("malformed_json", "a line must be a JSON object")
    messages = normalise_messages(raw)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise SampleError("no_reference", "the last message must be the assistant's reference answer, after "
                                          "the user's question")
    media = {}
    for key in ("images", "videos"):
        paths = raw.get(key) or []
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise SampleError("malformed_media", f"'{key}' must be a list of paths")
        media[key] = [base / p for p in paths]
    choices, reference = raw.get("choices"), messages[-1]["content"].strip()
    if choices is not None:
        if not isinstance(choices, list) or not choices or len(choices) > 26:
            raise SampleError("bad_choices", "'choices' must be a list of 1 to 26 options")
        if choice_of(reference, choices) is None:
            raise SampleError("bad_reference", f"the reference {reference!r} names none of the options "
                                               f"{option_letters(choices)}")
    return {"id": str(raw.get("id", "")), "category": str(raw.get("category", "default")),
            "messages": messages[:-1], "reference": reference, "choices": choices, **media}


def score(prediction: str, reference: str, choices: list | None) -> bool:
    if choices is not None:
        return choice_of(prediction, choices) == choice_of(reference, choices)
    return normalise_answer(prediction) == normalise_answer(reference)


def default_out(data: Path) -> Path:
    return data.parent / f"{data.stem}-eval"


def evaluate(model, fmt, data, out=None, log=print, write: bool = True, **opts) -> dict:
    """Answer and score every item of ``data`` (JSONL); write predictions.jsonl and results.json
    into ``out`` (``write``: False on the other ranks of a context-parallel run); -> the results
    dict. ``opts``: answer()'s keywords (max_new_tokens, ..., decode)."""
    data = Path(data)
    if not data.is_file():
        raise PathError(f"--data {data}: no such file")
    out = Path(out) if out is not None else default_out(data)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    else:
        log = lambda *a: None  # noqa: E731
    tmp = out / f".predictions.jsonl.tmp{os.getpid()}" if write else Path(os.devnull)
    skipped, reasons, stops = [], Counter(), Counter()
    per_cat: dict[str, Counter] = {}
    t0, n_lines = time.perf_counter(), 0
    try:
        with open(data, encoding="utf-8", errors="replace") as src, open(tmp, "w") as dst:
            for lineno, line in enumerate(src, 1):
                if not line.strip():
                    continue
                n_lines += 1
                try:
                    item = prepare(json.loads(line), data.parent)
                    text, gen = answer(model, fmt, item["messages"], item["images"], item["videos"], **opts)
                except (json.JSONDecodeError, SampleError, MediaError) as e:
                    reason = "malformed_json" if isinstance(e, json.JSONDecodeError) else \
                        getattr(e, "reason", "bad_media")
                    reasons[reason] += 1
                    skipped.append({"line": lineno, "reason": reason, "detail": str(e)})
                    log(f"[eval] {data}:{lineno}: skipped ({reason}): {e}")
                    continue
                correct = score(text, item["reference"], item["choices"])
                stops[gen.stop] += 1
                per_cat.setdefault(item["category"], Counter()).update(scored=1, correct=int(correct))
                dst.write(json.dumps({"id": item["id"] or f"line{lineno}", "category": item["category"],
                                      "kind": "choice" if item["choices"] is not None else "short",
                                      "prediction": text, "reference": item["reference"], "correct": correct,
                                      "stop": gen.stop}, ensure_ascii=False) + "\n")
        if write:
            os.replace(tmp, out / "predictions.jsonl")
    finally:
        if write:
            tmp.unlink(missing_ok=True)
    scored, correct = (sum(c[k] for c in per_cat.values()) for k in ("scored", "correct"))
    acc = lambda c, n: round(c / n, 6) if n else None  # noqa: E731
    results = {"data": str(data), "items": n_lines, "scored": scored, "correct": correct,
               "accuracy": acc(correct, scored),
               "categories": {k: {"scored": c["scored"], "correct": c["correct"],
                                  "accuracy": acc(c["correct"], c["scored"])} for k, c in sorted(per_cat.items())},
               "skipped": {"count": len(skipped), "by_reason": dict(reasons), "items": skipped},
               "stops": dict(stops), "seconds": round(time.perf_counter() - t0, 2),
               "options": {k: v if isinstance(v, (int, float, str, type(None))) else vars(v)
                           for k, v in opts.items() if k != "decode"}}
    if write:
        atomic_write(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    log(f"[eval] accuracy {results['accuracy']} ({correct}/{scored}), {len(skipped)} skipped; wrote {out}")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lvita eval", description="Accuracy of a Long-VITA model on a JSONL set.")
    add_model_args(ap)
    ap.add_argument("--data", required=True, help="JSONL in the training sample format (see lvita/infer/eval.py)")
    ap.add_argument("--out", help="default: <data dir>/<data stem>-eval")
    ap.set_defaults(max_new_tokens=64)
    args = ap.parse_args(argv)
    return run_main("lvita eval", _main, args)


def _main(args) -> int:
    opts = options(args)
    if not Path(args.data).is_file():
        raise PathError(f"--data {args.data}: no such file")
    model, fmt, decode, rank = load_for_args(args, opts)
    evaluate(model, fmt, args.data, args.out, write=rank == 0, decode=decode, **opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
