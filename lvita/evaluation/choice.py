"""Which option a free-form answer picks, as VLMEvalKit's exact matching decides it (no judge model).

``can_infer(answer, choices)``: first an option letter standing as a word among the answer's last five
words (punctuation ``.()[],:;!*#{}`` read as spaces), when exactly one option letter appears at all;
else the one option whose text occurs in the answer (case-insensitive); else None (scored wrong).
This is ``vlmeval/utils/matching_util.py``'s ``can_infer_option`` / ``can_infer_text`` without the judge
fallback and without its "Z" refusal answer (a refusal is simply wrong here).

    can_infer("The answer is B.", {"A": "cat", "B": "dog"})   # "B"
    can_infer("B is wrong because the picture shows many things", {"A": "cat", "B": "dog"})  # None (B too early)
    can_infer("a dog", {"A": "cat", "B": "dog"})               # "B" (option text)
"""
from __future__ import annotations

_PUNCT = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def can_infer_option(answer: str, choices) -> str | None:
    """An option letter: exactly one of ``choices``' letters occurs as a word, and among the last 5 words."""
    words = [w.strip() for w in str(answer).translate(_PUNCT).split()]
    found = [c for c in choices if c in words]
    if len(found) == 1 and words.index(found[0]) > len(words) - 5:
        return found[0]
    return None


def can_infer_text(answer: str, choices: dict) -> str | None:
    """The one option whose text occurs in ``answer`` (case-insensitive)."""
    low = str(answer).lower()
    hits = [k for k, v in choices.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: str, choices: dict) -> str | None:
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)
