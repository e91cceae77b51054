"""Which option a free-form answer picks, as VLMEvalKit's exact matching decides it (no judge model).

Owns ``vlmeval/utils/matching_util.py``'s ``can_infer`` = ``can_infer_option`` or else ``can_infer_text``,
as the :class:`lvita.evaluation.scorer.Scorer` 's commit has them:

- option letter: the answer with ``.()[],:;!*#{}`` read as spaces, split into words; when exactly one option
  letter is a word, that letter (at 37d08c5 anywhere; at e8e78f0 only when its first occurrence is among the
  last five words). No letter but the word "Z", or a refusal text ("Cannot determine the answer", ...):
  "Z", which no answer equals and which stops the option-text rule. "Failed to obtain answer via API":
  nothing. At e8e78f0, when the letter rule found nothing, ``(?i)(?:correct\\s+)?answer\\s+is\\s+\\**([ABCD])\\**``
  gives the letter (case-insensitive: "The answer is a dog" reads as A, kept).
- option text: the one option whose lower-cased text occurs in the lower-cased answer (e8e78f0: only when
  the answer is at most twice as long as all option texts together).

    can_infer("The answer is B.", {"A": "cat", "B": "dog"}, scorer)   # "B"
    can_infer("a dog", {"A": "cat", "B": "dog"}, scorer)               # "B" (option text)

Trade-off: returns VLMEvalKit's values ("Z" and None for its False) so every caller compares with the gold
letter only; the judge fallback is left out (a judge-free scorer: no option inferred is wrong).
"""
from __future__ import annotations

import re

_PUNCT = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
# e8e78f0 vlmeval/utils/matching_util.py line 15 (_VERBOSE_ANSWER_RE)
VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(answer: str, choices, scorer) -> str | None:
    """``can_infer_option``: an option letter, "Z", or None."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in REFUSALS):
        return "Z"
    words = [w.strip() for w in answer.translate(_PUNCT).split()]
    found = [c for c in choices if c in words]
    if len(found) == 1:
        # e8e78f0 matching_util.py line 52: `splits.index(ch) > (len(splits) - 5)`; 37d08c5 line 44: anywhere
        last = scorer.option_last_words
        if last is None or words.index(found[0]) > len(words) - last:
            return found[0]
    elif not found and "Z" in words:
        return "Z"
    if scorer.verbose_answer:  # e8e78f0 line 57: reached when no letter rule returned
        m = VERBOSE_ANSWER.search(answer)
        if m and m[1].upper() in choices:
            return m[1].upper()
    return None


def can_infer_text(answer: str, choices: dict, scorer) -> str | None:
    """``can_infer_text``: the one option whose text occurs in the answer (case-insensitive)."""
    low = answer.lower()
    if scorer.text_length_cutoff and len(low) > 2 * sum(len(str(v)) for v in choices.values()):
        return None  # e8e78f0 matching_util.py line 109
    hits = [k for k, v in choices.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: str, choices: dict, scorer) -> str | None:
    answer = str(answer)
    return can_infer_option(answer, choices, scorer) or can_infer_text(answer, choices, scorer)
