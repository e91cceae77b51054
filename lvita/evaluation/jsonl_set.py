"""lvita's own evaluation sets: a JSONL in the training sample format, one more catalog entry (``jsonl``).

Owns reading such a file into :class:`lvita.evaluation.items.Item` s and scoring its predictions; the
driver (:mod:`lvita.evaluation.run`) answers them as it answers a published benchmark: resumable by id,
progress on stderr, results.json with skipped items by reason. A line holds ``messages`` (or
``conversations``), optional ``images`` / ``videos`` relative to the JSONL's directory, ``id``,
``category`` and ``choices``; its last message is the assistant's reference answer, everything before
it is the prompt (system turns and earlier turns included)::

    {"id": "q1", "category": "colour", "images": ["img/1.png"], "choices": ["red", "blue"],
     "messages": [{"role": "user", "content": "<image>\\nWhich colour? A. red B. blue"},
                  {"role": "assistant", "content": "B"}]}

- ``choices`` (a list of 1-26): multiple choice. Options are lettered A, B, ... by position (a list of
  single letters, ``["A", "B", "C"]``, names them itself). The option a text picks is decided by the one
  answer matcher of the evaluation package, VLMEvalKit's (:func:`lvita.evaluation.choice.can_infer`): for
  the reference at load time by the pinned commit's rules (a reference that picks no option is skipped as
  ``bad_reference``), for the prediction when scored by ``--scorer``'s.
- otherwise short answer: normalised exact match (lowercase, punctuation and the articles a/an/the
  removed, whitespace collapsed), as SQuAD's.
- ``category`` (default "default") groups the accuracy.

    lvita eval --model runs/stage4 --data bench/mmb.jsonl            # --benchmark jsonl is the default

Ids: the line's ``id``, else ``line<N>``; a repeated id is skipped (``duplicate_id``). Trade-off: the
file is read whole before answering (ids must be known to resume); a million-line set is fine.
"""
from __future__ import annotations

import json
import re
import string
from collections import defaultdict
from pathlib import Path

from lvita.data.formats import normalise_messages
from lvita.data.template import SampleError
from lvita.errors import PathError
from lvita.evaluation.choice import can_infer
from lvita.evaluation.items import Benchmark, Item, LoadOptions, Skip
from lvita.evaluation.scorer import DEFAULT_SCORER, Scorer

MAX_NEW_TOKENS = 64
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", str(text).lower().translate(_PUNCT)).split())


def lettered_choices(choices: list) -> dict[str, str]:
    """["red", "blue"] -> {"A": "red", "B": "blue"}; ["A", "B"] (single letters) -> {"A": "A", "B": "B"}."""
    if all(isinstance(c, str) and re.fullmatch(r"[A-Za-z]", c.strip()) for c in choices):
        return {c.strip().upper(): c.strip().upper() for c in choices}
    return {chr(ord("A") + i): str(c) for i, c in enumerate(choices)}


def item_of(raw, base: Path, item_id: str) -> Item:
    """A parsed JSONL line -> an Item; SampleError with a reason for anything unusable."""
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
    raw_choices, reference = raw.get("choices"), messages[-1]["content"].strip()
    choices, answer = None, reference
    if raw_choices is not None:
        if not isinstance(raw_choices, list) or not raw_choices or len(raw_choices) > 26:
            raise SampleError("bad_choices", "'choices' must be a list of 1 to 26 options")
        choices = lettered_choices(raw_choices)
        answer = can_infer(reference, choices, DEFAULT_SCORER)  # the reference: the pinned rules, whatever --scorer
        if answer is None:
            raise SampleError("bad_reference", f"the reference {reference!r} names none of the options "
                                               f"{list(choices)}")
    meta = {"category": str(raw.get("category", "default")), "kind": "choice" if choices else "short",
            "reference": reference}
    return Item(id=item_id, question=messages[-2]["content"], images=media["images"], videos=media["videos"],
                choices=choices, answer=answer, meta=meta, messages=messages[:-1])


def load(path: Path, options: LoadOptions):
    """The JSONL's lines in order -> Items, or Skips naming the line and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise PathError(f"--data {path}: no such file (expected a JSONL set in the training sample format)")
    with open(path, encoding="utf-8", errors="replace") as src:
        for lineno, line in enumerate(src, 1):
            if not line.strip():
                continue
            item_id = f"line{lineno}"
            try:
                raw = json.loads(line)
                if isinstance(raw, dict) and raw.get("id") not in (None, ""):
                    item_id = str(raw["id"])
                yield item_of(raw, path.parent, item_id)
            except json.JSONDecodeError as e:
                yield Skip(item_id, "malformed_json", f"{path}:{lineno}: {e}")
            except SampleError as e:
                yield Skip(item_id, e.reason, f"{path}:{lineno}: {e}")


def prompt(item: Item, fmt, wrapper=None) -> list[dict]:
    """The conversation before the reference, as written (no benchmark wording is added)."""
    return item.messages


def correct(row: dict, scorer: Scorer = DEFAULT_SCORER) -> bool:
    if row.get("choices"):
        return can_infer(str(row["prediction"]), row["choices"], scorer) == row["answer"]
    return normalise_answer(row["prediction"]) == normalise_answer(row["answer"])


def score(rows: list[dict], scorer: Scorer = DEFAULT_SCORER) -> dict:
    """Accuracy overall and per category; option letters by ``scorer``'s rules (predictions as stored: lvita's
    sets do not go through VLMEvalKit's xlsx)."""
    hits = [correct(r, scorer) for r in rows]
    acc = lambda h: {"accuracy": round(sum(h) / len(h), 6) if h else None,  # noqa: E731
                     "correct": int(sum(h)), "scored": len(h)}
    per = defaultdict(list)
    for r, h in zip(rows, hits):
        per[str((r.get("meta") or {}).get("category", "default"))].append(h)
    return {"metric": "accuracy", "overall": acc(hits), "category": {k: acc(v) for k, v in sorted(per.items())},
            "scorer": scorer.summary()}


JSONL_SET = Benchmark("jsonl", load, prompt, score, max_new_tokens=MAX_NEW_TOKENS, wrapped=False)


def evaluate(model, fmt, data, out=None, write: bool = True, log=None, **answer_opts) -> dict:
    """Answer and score a JSONL set from Python (what ``lvita eval --data FILE.jsonl`` runs): the results dict,
    written with predictions.jsonl into ``out`` (default ``<data dir>/<stem>-eval``). ``answer_opts``:
    :func:`lvita.infer.generate.answer`'s keywords (max_new_tokens, system_prompt, media, max_context, decode)."""
    from lvita.evaluation.run import evaluate_benchmark, stderr

    out = Path(out) if out is not None else JSONL_SET.default_out(data)
    return evaluate_benchmark(model, fmt, JSONL_SET, Path(data), out, LoadOptions(work=out / "work"),
                              {"max_new_tokens": MAX_NEW_TOKENS, **answer_opts}, write=write, log=log or stderr)
