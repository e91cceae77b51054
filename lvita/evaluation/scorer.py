"""Which VLMEvalKit a benchmark is scored as: the :class:`Scorer` built once and passed to every score function.

Owns the rule switches in which VLMEvalKit's commits differ, and what VLMEvalKit's xlsx round trip does to
a column of predictions before any matching (:meth:`Scorer.read_back`). Two scorers, both judge-free
("exact_matching"), each equal item by item to that commit's own ``evaluate()`` on the fixtures of
``tests/fixtures/vlmevalkit_scores`` (made by running VLMEvalKit itself):

- ``vlmevalkit-37d08c5`` (:data:`DEFAULT_SCORER`): the commit Long-VITA pins (``third_party/VLMEvalKit``),
  behind the paper's tables. An option letter counts anywhere in the answer; a string starting with "="
  is written to the xlsx as a formula and reads back as 0; MVBench and MLVU crash (TypeError) on a
  prediction that reads back as no text.
- ``vlmevalkit-e8e78f0``: the newest VLMEvalKit commit available here (2026-08-18). The letter must stand
  among the last five words, option text counts only in an answer at most twice the options' length, a
  "the answer is X" pattern rescues verbose answers (``vlmeval/utils/matching_util.py``, since c3371551);
  formulas are written as text; MVBench leaves an empty prediction unscored, and its rating then counts
  that NaN score as right; MLVU's M-Avg pools ``order`` too.

    from lvita.evaluation.scorer import DEFAULT_SCORER, scorer_named
    scores = bench.score(rows, scorer=scorer_named("vlmevalkit-e8e78f0"))

Trade-off: the round trip is re-derived, not run (no xlsx library at scoring time): NA strings, formulas,
length limits and pandas' whole-column number and bool inference, measured on ``round_trip.json``; the
option columns are taken as lvita's loader read them (VLMEvalKit's also pass through the xlsx: an
all-number option column could read back differently, not covered).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lvita.errors import UserError

# pandas' default na_values (pandas/_libs/parsers.pyx STR_NA_VALUES): read_excel turns these cells into NaN
NA_STRINGS = frozenset({"", "-1.#IND", "1.#QNAN", "1.#IND", "-1.#QNAN", "#N/A N/A", "#N/A", "N/A", "n/a", "NA",
                        "<NA>", "#NA", "NULL", "null", "NaN", "-NaN", "nan", "-nan", "None"})
XLSX_STRING_MAX = 32767  # xlsxwriter worksheet._write_string: longer strings are cut to this
XLSX_URL_MAX = 2079  # xlsxwriter worksheet._write_url: a longer URL is not written (the cell stays empty)
_URL = re.compile(r"(ftp|http)s?://|mailto:|(in|ex)ternal:|file://")
_INT = re.compile(r"\s*[+-]?\d+\s*")  # pandas' numeric inference skips surrounding spaces (" 12 " -> 12)
_FLOAT = re.compile(r"\s*[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|Inf|INF|infinity|Infinity)\s*")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f]")  # xlsxwriter xmlwriter.py re_control_chars_2: written as _xHHHH_
_BOOLS = {"True": True, "TRUE": True, "true": True, "False": False, "FALSE": False, "false": False}
NAN = float("nan")


@dataclass(frozen=True)
class Scorer:
    """One VLMEvalKit commit's judge-free scoring rules (the fields are the rules in which commits differ)."""
    name: str
    commit: str
    description: str
    option_last_words: int | None  # can_infer_option: the letter first seen among the last N words (None: anywhere)
    text_length_cutoff: bool  # can_infer_text: no option text in an answer longer than 2 x the options' total length
    verbose_answer: bool  # can_infer_option: "(correct) answer is X" (case-insensitive, A-D) when no letter rule fired
    xlsx_formulas: bool  # xlsxwriter's strings_to_formulas: "=..." and "{=...}" are formulas that read back as 0
    mvbench_skips_na: bool  # MVBench evaluate loops over non-NaN predictions only (NaN: unscored, rated right)
    strip_first_word: bool  # MVBench check_ans_with_model strips the reply before taking its first word
    mlvu_m_avg_tasks: tuple[str, ...]  # dataset/mlvu.py MLVU type_data_dict['M-Avg']: the tasks its M-Avg pools
    period_strip: str  # smp/misc.py process_punctuation's periodStrip (37d08c5's "(?!<=\d)" is no lookbehind)

    def summary(self) -> dict:
        """What results.json records of the scorer."""
        return {"name": self.name, "commit": self.commit}

    def read_back(self, predictions: list) -> list:
        """The prediction column as VLMEvalKit holds it after ``dump(data, '<...>.xlsx')`` then ``load``:
        ``vlmeval/inference.py`` (line 179 at 37d08c5, 281 at e8e78f0) writes ``str(prediction)`` with
        ``smp/file.py`` ``dump_xlsx`` (``to_excel(engine='xlsxwriter')``, line 149 / 171; e8e78f0 turns
        ``strings_to_formulas`` off) and reads it back with ``pd.read_excel`` (line 178 / 269). Each value
        is a str, NAN (an empty or NA-string cell), an int, a float or a bool (pandas' inference over the
        whole column: every non-NA cell a number -> numbers, floats when any is a float or NaN; every
        non-NA cell a bool word -> bools)."""
        cells = [self._cell(str(p)) for p in predictions]
        values = [c for c in cells if c is not NAN]
        if values and all(isinstance(c, int) or _INT.fullmatch(c) or _FLOAT.fullmatch(c) for c in values):
            floats = len(values) < len(cells) or any(isinstance(c, str) and not _INT.fullmatch(c) for c in values)
            return [NAN if c is NAN else (float(c) if floats else int(c)) for c in cells]
        if values and all(isinstance(c, str) and c in _BOOLS for c in values):
            return [NAN if c is NAN else _BOOLS[c] for c in cells]
        return cells

    def _cell(self, text: str):
        """One cell: written by xlsxwriter, read by openpyxl, NA strings made NaN by pandas."""
        if text in NA_STRINGS:
            return NAN
        if self.xlsx_formulas and (text.startswith("=") or (text.startswith("{=") and text.endswith("}"))):
            return 0  # worksheet._write_token_as_string -> _write_formula with cached value 0
        if ":" in text and _URL.match(text) and len(text) > XLSX_URL_MAX:
            return NAN  # _write_url refuses it: nothing written
        # control characters come back as xlsxwriter's _xHHHH_ escapes (openpyxl leaves them): "\r" -> "_x000D_"
        return _CONTROL.sub(lambda m: f"_x{ord(m[0]):04X}_", text[:XLSX_STRING_MAX])


def as_text(value) -> str:
    """``str(x)`` of a value read back (NaN -> "nan", 123.0 -> "123.0"), as the image and Video-MME /
    LongVideoBench evaluations apply it before matching."""
    return "nan" if value is NAN or (isinstance(value, float) and value != value) else str(value)


VLMEVALKIT_37D08C5 = Scorer(
    name="vlmevalkit-37d08c5", commit="37d08c5b1832b6d20110a08008f68a9b45bccc7c",
    description="VLMEvalKit as Long-VITA pins it: option letter anywhere, xlsx formulas, MVBench/MLVU crash on NaN",
    option_last_words=None, text_length_cutoff=False, verbose_answer=False, xlsx_formulas=True,
    mvbench_skips_na=False, strip_first_word=False,
    mlvu_m_avg_tasks=("plotQA", "needle", "ego", "count", "anomaly_reco", "topic_reasoning"),  # mlvu.py line 27
    period_strip=r"(?!<=\d)(\.)(?!\d)")
VLMEVALKIT_E8E78F0 = Scorer(
    name="vlmevalkit-e8e78f0", commit="e8e78f05f3080fe28154f2130321f17951c3be94",
    description="VLMEvalKit of 2026-08-18: letter among the last 5 words, text length cut-off, verbose pattern",
    option_last_words=5, text_length_cutoff=True, verbose_answer=True, xlsx_formulas=False,
    mvbench_skips_na=True, strip_first_word=True,
    mlvu_m_avg_tasks=("plotQA", "needle", "ego", "count", "anomaly_reco", "topic_reasoning", "order"),  # line 29
    period_strip=r"(?<!\d)\.(?!\d)")

SCORERS: dict[str, Scorer] = {s.name: s for s in (VLMEVALKIT_37D08C5, VLMEVALKIT_E8E78F0)}
DEFAULT_SCORER = VLMEVALKIT_37D08C5


def scorer_named(name: str) -> Scorer:
    try:
        return SCORERS[name]
    except KeyError:
        raise UserError(f"--scorer {name!r} is not one lvita knows; choose one of: {', '.join(SCORERS)}") from None
