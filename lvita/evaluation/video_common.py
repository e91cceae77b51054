"""What the video benchmarks share: VLMEvalKit's video answer matchers, accuracy breakdowns, and finding
a benchmark's files.

Owns the judge-free ("exact_matching") scoring rules of VLMEvalKit, re-implemented, not copied, as the
:class:`lvita.evaluation.scorer.Scorer` 's commit has them (37d08c5, the one Long-VITA pins, by default;
e8e78f0 the newest), equal item by item on ``tests/test_scoring_reference.py``:

- predictions are read back as VLMEvalKit's xlsx holds them (:meth:`~lvita.evaluation.scorer.Scorer.read_back`):
  Video-MME and LongVideoBench take ``str`` of the value (:func:`read_back_text`: "" becomes "nan");
  MVBench and MLVU test ``FAIL_MSG in pred`` on the raw value and crash (TypeError) on one that is no
  text (:func:`crash_reason`: the benchmarks score such a row wrong and count it).
- :func:`first_letter`: Video-MME's and LongVideoBench's ``extract_characters_regex``: strip some
  answer prefixes, then the first capital option letter anywhere in the reply (none: wrong; a
  reply of over 10 words with no such letter: wrong). Their fallback (``extract_option``) finds no
  options in the ``question`` column, so without a judge it never rescues an answer.
- :func:`first_word_matches`: MVBench's ``check_ans_with_model``: the reply's first space-separated
  word (e8e78f0: of the stripped reply), lower-cased and without dots, is a substring of ``(b)``-style
  gold (so a reply opening with a space counts as right at 37d08c5: kept), or contains it; else
  :func:`lvita.evaluation.choice.can_infer` must pick the gold letter.
- :func:`mlvu_matches`: MLVU's own ``check_ans_with_model``: the character before the reply's first ")"
  equals the gold letter (case-sensitive), else can_infer.

    first_letter("The answer is C.", "ABCD")          # "C"
    first_word_matches("B. a cat", "B", {"A": "dog", "B": "cat"}, DEFAULT_SCORER)   # True

Predictions are scored as stored, after the scorer's xlsx read-back: the driver has already applied
the wrapper's answer clean-up (``--wrapper server`` keeps what follows a reply's last ``Answer:``, the
default ``hf`` keeps the reply whole: :func:`lvita.evaluation.prompts.postprocess`).

Trade-off: the quirks are kept on purpose so numbers compare with the leaderboards'; each is named
in its function's docstring, with VLMEvalKit's file and line.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from lvita.evaluation.choice import can_infer
from lvita.evaluation.items import Skip
from lvita.evaluation.scorer import as_text
from lvita.errors import PathError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# as listed in vlmeval/dataset/utils/videomme.py; two commas are missing there, so two entries are
# the concatenations ("The best option isThe correct option is"): kept, they never match
_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
             "The best option isThe correct option is", "Best answer:Best option:", "Answer:", "Option:")


def first_letter(reply: str, letters: str = "ABCD") -> str:
    """``extract_characters_regex`` (``dataset/utils/videomme.py`` line 128 at 37d08c5 / 130 at e8e78f0,
    ``utils/longvideobench.py`` line 58 / 60): the first of ``letters`` in the reply once answer prefixes are
    removed (anywhere: "A man walks" reads as A); "" when none."""
    s = str(reply).strip()
    for prefix in _PREFIXES:
        s = s.replace(prefix, "")
    found = re.search(f"[{letters}]", s)  # (its "over 10 words and no letter" test adds nothing to this)
    return found[0] if found else ""


def first_word_matches(reply: str, gold: str, choices: dict, scorer) -> bool:
    """MVBench's ``check_ans_with_model`` without a judge (``dataset/utils/mvbench.py`` line 51 at 37d08c5,
    54 at e8e78f0, which strips at line 57): gold is ``(x) text``;
    the reply's first word (split on single spaces; e8e78f0 strips the reply first) lower-cased without
    dots is in ``(x)``, or contains ``(x)``; else can_infer of the whole reply picks the gold letter."""
    gold_option = f"({gold.lower()})"
    first = (reply.lower().strip() if scorer.strip_first_word else reply.lower()).split(" ")[0]
    if first.replace(".", "") in gold_option or gold_option in first:
        return True
    return can_infer(reply, choices, scorer) == gold


def mlvu_matches(reply: str, gold: str, choices: dict, scorer) -> bool:
    """MLVU's ``check_ans_with_model`` without a judge (``dataset/utils/mlvu.py`` line 58, both commits): when
    the reply holds ")", the one character before its first ")" (none when ")" comes first) equals the gold
    letter, case-sensitively; else can_infer of the whole reply picks the gold letter."""
    pred = reply
    if ")" in pred:
        i = pred.index(")")
        pred = pred[i - 1:i]  # i == 0: pred[-1:0] is ""
    if pred == gold:
        return True
    return can_infer(reply, choices, scorer) == gold


def read_back_text(rows: list[dict], scorer) -> list[str]:
    """Predictions as Video-MME's and LongVideoBench's evaluate read them: ``str(x)`` of the xlsx value."""
    return [as_text(p) for p in scorer.read_back([r.get("prediction", "") for r in rows])]


def crash_reason(value) -> str | None:
    """Why VLMEvalKit's MVBench / MLVU evaluate raises TypeError on this read-back prediction
    (``FAIL_MSG in pred`` on a non-string: ``dataset/mvbench.py`` line 399 at 37d08c5, 414 at e8e78f0;
    ``dataset/mlvu.py`` line 252 / 254), or None."""
    if isinstance(value, str):
        return None
    return "empty_or_na_prediction" if isinstance(value, float) and value != value else "number_prediction"


def crash_counts(crashes: list[str | None]) -> dict[str, int]:
    """{reason: rows} of the rows VLMEvalKit's evaluate would crash on (scored wrong here)."""
    out: dict[str, int] = {}
    for why in crashes:
        if why:
            out[why] = out.get(why, 0) + 1
    return out


def lettered(candidates: list) -> dict[str, str]:
    """["x", "y"] -> {"A": "x", "B": "y"}."""
    return {LETTERS[i]: str(c) for i, c in enumerate(candidates)}


def accuracy(scores: list[int]) -> dict:
    return {"accuracy": sum(scores) / len(scores) if scores else None, "correct": sum(scores), "count": len(scores)}


def breakdown(rows: list[dict], scores: list[int], key: str) -> dict:
    """{value of meta[key]: accuracy dict}, values in first-seen order."""
    groups: dict = defaultdict(list)
    for row, s in zip(rows, scores):
        groups[str((row.get("meta") or {}).get(key))].append(s)
    return {k: accuracy(v) for k, v in groups.items()}


def read_json_list(path: Path, what: str) -> list:
    """A JSON file holding a list of records; a clear PathError otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PathError(f"{what} {path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, list):
        raise PathError(f"{what} {path}: expected a JSON list of records, found {type(data).__name__}")
    return data


def first_dir(root: Path, names: tuple[str, ...], probe) -> Path | None:
    """The first of ``root/name`` (name "" is root itself) for which ``probe(folder)`` is true."""
    for name in names:
        d = root / name if name else root
        if d.is_dir() and probe(d):
            return d
    return None


def missing_video(item_id: str, path: Path, check: bool = True) -> Skip | None:
    """A Skip when ``path`` is neither a file nor a non-empty folder (decoding errors surface later,
    as the driver's MediaError); None without looking when not ``check`` (rescoring needs no video)."""
    if not check or path.is_file() or (path.is_dir() and any(path.iterdir())):
        return None
    return Skip(item_id, "missing_video", f"{path} is not there (or is an empty folder)")


class Unique:
    """Item ids seen so far: a repeated id is a Skip (reason ``duplicate_id``)."""

    def __init__(self):
        self.seen: set[str] = set()

    def check(self, item_id: str, where: str) -> Skip | None:
        if item_id in self.seen:
            return Skip(item_id, "duplicate_id", f"{where}: the id {item_id!r} is used twice")
        self.seen.add(item_id)
        return None
