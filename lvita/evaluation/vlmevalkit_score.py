"""Leaderboard scores of VLMEvalKit's image benchmarks from prediction rows, with exact matching (no judge).

Owns the ``score`` of each :data:`lvita.evaluation.vlmevalkit.BENCHMARKS` entry: prediction rows
(:func:`lvita.evaluation.items.prediction_row`) and a :class:`lvita.evaluation.scorer.Scorer` -> a results
dict with ``overall``, the breakdowns the leaderboard reports and ``scorer`` (name, commit). Each equals,
verdict by verdict, that VLMEvalKit commit's ``evaluate()`` (``tests/test_scoring_reference.py``).
Followed (open-compass/VLMEvalKit, 37d08c5 and e8e78f0):

- every benchmark first reads the predictions back as VLMEvalKit's xlsx holds them
  (:meth:`lvita.evaluation.scorer.Scorer.read_back`, then ``str``: "" becomes "nan", which holds an option
  text "a"), as ``evaluate`` does after ``load(eval_file)``.
- multiple choice, ``vlmeval/dataset/utils/multiple_choice.py``: the option is ``can_infer`` (our
  :mod:`lvita.evaluation.choice`, with the scorer's letter rules); no option inferred is wrong (the
  exact-matching policy's "Z"). ``report_acc``: accuracy overall, per ``split``, ``l2-category`` and
  ``category`` (its table renames MMBench's l2-categories, ``MMB_abbrs``; here the names stay).
- MMBench, ``mcq_circular_eval``: the copies of a question with rotated options sit at index + k x 1e6; the
  group ``index % 1e6`` counts once, from its main row (index < 1e6), and is right only when every
  rotation's inferred option is its answer. Also reported: vanilla accuracy on the main rows
  (``circ0``) and on all rows, as ``PRINT_VANILLA=1`` prints them.
- MMMU, ``MMMU_preproc``: an open question (no option A) is scored as two options, A = its answer and
  B = "Other Answers", with A the right one; an answer that is no letter counts as A.
- HallusionBench, ``yorn.py``: ``YOrN_Extraction`` (yes xor no among the words after
  ``process_punctuation``, quirks kept: at most 32 periods stripped; at 37d08c5 a period after a digit
  too; else Unknown: wrong); ``Hallusion_rating``: aAcc per question, fAcc per figure (l2-category,
  set_id, figure_id all right), qAcc per question (l2-category, set_id, question_id all right), in
  percent, overall and per category and l2-category; ``mean`` of the three is the number the OpenCompass
  leaderboard shows for HallusionBench (its "Overall").
- OCRBench, ``image_vqa.py`` ``OCRBench.evaluate``: right when any acceptable answer is a substring of the
  prediction, both lowercased and stripped (Handwritten Mathematical Expression Recognition: spaces
  removed, case kept); the score is the count of right answers (out of 1000 on the full set), per
  category and in VLMEvalKit's five groups.

Trade-off: rows are scored as stored, so ``--score-only`` gives exactly the run's numbers; a row whose
``choices`` are missing scores wrong rather than failing; the round trip depends on the whole prediction
column (pandas' type inference), so scores are computed over all rows at once, as VLMEvalKit does.
"""
from __future__ import annotations

import re
from collections import defaultdict

from lvita.evaluation.choice import can_infer
from lvita.evaluation.scorer import DEFAULT_SCORER, Scorer, as_text
from lvita.errors import UserError

GROUP_OFFSET = 1_000_000  # MMBench's rotated copies: index + k * 1e6
BREAKDOWN_KEYS = ("split", "l2-category", "category")


def _acc(hits: list[bool]) -> dict:
    return {"accuracy": round(sum(hits) / len(hits), 6) if hits else None, "correct": int(sum(hits)),
            "scored": len(hits)}


def accuracy_report(scored: list[tuple[dict, bool]], metric: str) -> dict:
    """``report_acc``: [(meta, hit)] -> overall and per split / l2-category / category."""
    out = {"metric": metric, "overall": _acc([h for _, h in scored])}
    for key in BREAKDOWN_KEYS:
        groups = defaultdict(list)
        for meta, hit in scored:
            if key in meta:
                groups[meta[key]].append(hit)
        if groups:
            out[key] = {k: _acc(v) for k, v in sorted(groups.items())}
    return out


def mcq_verdicts(rows: list[dict], scorer: Scorer) -> list[bool]:
    """Each row right or not: ``can_infer`` of the prediction as read back from VLMEvalKit's xlsx
    (``dataset/image_mcq.py`` evaluate, line 232 at 37d08c5 / 293 at e8e78f0: ``str(x)`` of each value
    ``load`` gives) equals the answer."""
    preds = scorer.read_back([r["prediction"] for r in rows])
    return [bool(r.get("choices")) and can_infer(as_text(p), r["choices"], scorer) == r["answer"]
            for r, p in zip(rows, preds)]


def mcq_score(rows: list[dict], scorer: Scorer = DEFAULT_SCORER) -> dict:
    """Vanilla multiple-choice accuracy (MMStar, AI2D)."""
    out = accuracy_report(list(zip([r["meta"] for r in rows], mcq_verdicts(rows, scorer))), "accuracy")
    return {**out, "scorer": scorer.summary()}


def circular_verdicts(rows: list[dict], scorer: Scorer) -> dict[int, bool]:
    """MMBench: {main index: every rotation right} (``dataset/utils/multiple_choice.py`` ``mcq_circular_eval``
    / ``prefetch_circular_group``, lines 373 / 275 at 37d08c5, 511 / 409 at e8e78f0)."""
    if bad := [r["id"] for r in rows if not str(r["id"]).isdigit()]:
        raise UserError(f"MMBench rows are grouped by their integer index (VLMEvalKit's); row id {bad[0]!r} "
                        "is not one")
    groups: dict[int, list[bool]] = defaultdict(list)
    for r, hit in zip(rows, mcq_verdicts(rows, scorer)):
        groups[int(r["id"]) % GROUP_OFFSET].append(hit)
    return {int(r["id"]): all(groups[int(r["id"])]) for r in rows if int(r["id"]) < GROUP_OFFSET}


def circular_score(rows: list[dict], scorer: Scorer = DEFAULT_SCORER) -> dict:
    """MMBench: circular accuracy over question groups, plus vanilla on main rows and on all rows."""
    hits = circular_verdicts(rows, scorer)
    main = {int(r["id"]): r for r in rows if int(r["id"]) < GROUP_OFFSET}
    out = accuracy_report([(main[g]["meta"], hits[g]) for g in sorted(main)], "circular accuracy")
    out["groups_without_main_row"] = sorted({int(r["id"]) % GROUP_OFFSET for r in rows} - set(main))
    vanilla = mcq_verdicts(rows, scorer)
    out["vanilla_circ0"] = accuracy_report([(r["meta"], h) for r, h in zip(rows, vanilla)
                                            if int(r["id"]) < GROUP_OFFSET], "accuracy")
    out["vanilla_all"] = accuracy_report([(r["meta"], h) for r, h in zip(rows, vanilla)], "accuracy")
    return {**out, "scorer": scorer.summary()}


def mmmu_row(row: dict) -> dict:
    """``MMMU_preproc`` + its answer map: open questions become A = answer / B = "Other Answers"."""
    choices, answer = row.get("choices"), str(row["answer"])
    if not choices or "A" not in choices:
        choices = {"A": answer, "B": "Other Answers", **{k: v for k, v in (choices or {}).items() if k > "B"}}
    return dict(row, choices=choices, answer=answer if re.fullmatch(r"[A-Z]", answer) else "A")


def mmmu_score(rows: list[dict], scorer: Scorer = DEFAULT_SCORER) -> dict:
    """MMMU_DEV_VAL: the leaderboard's number is the validation split's (``report_primary_metric``), so
    ``overall`` and the categories are over validation rows when there are any; ``all_rows`` over all."""
    rows = [mmmu_row(r) for r in rows]
    hits = mcq_verdicts(rows, scorer)  # the whole column read back at once, as VLMEvalKit's file is
    every = accuracy_report(list(zip([r["meta"] for r in rows], hits)), "accuracy")
    val = [(r["meta"], h) for r, h in zip(rows, hits) if r["meta"].get("split") == "validation"]
    if not val:
        return {**every, "scorer": scorer.summary()}
    out = dict(accuracy_report(val, "accuracy"), split=every["split"], all_rows=every["overall"])
    out["metric"] = "accuracy (validation split)"
    return {**out, "scorer": scorer.summary()}


# -- yes / no ------------------------------------------------------------------------------------------

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str, scorer: Scorer) -> str:
    r"""``vlmeval/smp/misc.py`` ``process_punctuation`` (37d08c5 line 32, e8e78f0 line 18), quirks kept: its
    last line ``periodStrip.sub('', outText, re.UNICODE)`` passes re.UNICODE (32) as the count, so only the
    first 32 periods go (line 47 at 37d08c5, 32 at e8e78f0); 37d08c5's ``(?!<=\d)`` is a lookahead (no
    lookbehind): a period after a digit goes too, and counts toward the 32."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return re.sub(scorer.period_strip, "", out, count=re.UNICODE)


def yes_or_no(prediction: str, scorer: Scorer = DEFAULT_SCORER) -> str:
    """``YOrN_Extraction``: "Yes", "No" or "Unknown"."""
    words = process_punctuation(str(prediction).lower(), scorer).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "yes" not in words and "no" in words:
        return "No"
    return "Unknown"


def yorn_extracted(rows: list[dict], scorer: Scorer) -> list[str]:
    """``image_yorn.py`` evaluate: ``YOrN_Extraction(str(x))`` of each prediction as read back."""
    return [yes_or_no(as_text(p), scorer) for p in scorer.read_back([r["prediction"] for r in rows])]


def _hallusion_accs(rows: list[tuple[dict, bool]]) -> dict:
    figures, questions = defaultdict(list), defaultdict(list)
    for meta, hit in rows:
        # yorn.py Hallusion_rating keys: f"{l2-category}_{set_id}_{figure_id}" (and _{question_id})
        figures[f"{meta.get('l2-category')}_{meta.get('set_id')}_{meta.get('figure_id')}"].append(hit)
        questions[f"{meta.get('l2-category')}_{meta.get('set_id')}_{meta.get('question_id')}"].append(hit)
    pct = lambda xs: 100 * sum(xs) / len(xs) if xs else None  # noqa: E731
    accs = {"aAcc": pct([h for _, h in rows]), "fAcc": pct([all(v) for v in figures.values()]),
            "qAcc": pct([all(v) for v in questions.values()])}
    mean = sum(accs.values()) / 3 if rows else None  # OpenCompass's leaderboard figure: the mean of the three
    return {**{k: None if v is None else round(v, 4) for k, v in accs.items()},
            "mean": None if mean is None else round(mean, 4), "questions": len(rows), "figures": len(figures),
            "question_groups": len(questions)}


def hallusion_verdicts(rows: list[dict], scorer: Scorer) -> list[bool]:
    return [x == r["answer"] for r, x in zip(rows, yorn_extracted(rows, scorer))]


def hallusion_score(rows: list[dict], scorer: Scorer = DEFAULT_SCORER) -> dict:
    """HallusionBench: aAcc, fAcc, qAcc (percent) overall, per category and per l2-category."""
    extracted = yorn_extracted(rows, scorer)
    scored = [(r["meta"], x == r["answer"]) for r, x in zip(rows, extracted)]
    overall = _hallusion_accs(scored)
    out = {"metric": "aAcc / fAcc / qAcc (percent)", "overall": overall, "scorer": scorer.summary(),
           "unknown": extracted.count("Unknown")}
    for key in ("category", "l2-category"):
        groups = defaultdict(list)
        for meta, hit in scored:
            if key in meta:
                groups[meta[key]].append((meta, hit))
        out[key] = {k: _hallusion_accs(v) for k, v in sorted(groups.items())}
    return out


# -- OCRBench -------------------------------------------------------------------------------------------

HME = "Handwritten Mathematical Expression Recognition"
TEXT_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                    "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")
OCR_GROUPS = ("Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction", HME)


def ocrbench_hit(prediction: str, answers, category: str | None) -> bool:
    answers = answers if isinstance(answers, list) else [answers]
    predict = str(prediction)
    if category == HME:
        predict = predict.strip().replace("\n", " ").replace(" ", "")
        return any(str(a).strip().replace("\n", " ").replace(" ", "") in predict for a in answers)
    predict = predict.lower().strip().replace("\n", " ")
    return any(str(a).lower().strip().replace("\n", " ") in predict for a in answers)


def ocrbench_verdicts(rows: list[dict], scorer: Scorer) -> list[bool]:
    """``dataset/image_vqa.py`` OCRBench.evaluate (``str(line['prediction'])``, line 171 at 37d08c5 / 528 at
    e8e78f0) of the prediction as read back, with the substring rules of :func:`ocrbench_hit`."""
    preds = scorer.read_back([r["prediction"] for r in rows])
    return [ocrbench_hit(as_text(p), r["answer"], r["meta"].get("category")) for r, p in zip(rows, preds)]


def ocrbench_score(rows: list[dict], scorer: Scorer = DEFAULT_SCORER) -> dict:
    """OCRBench: right answers counted (out of 1000 on the full set), per category and VLMEvalKit group."""
    per_cat: dict[str, list[bool]] = defaultdict(list)
    for r, hit in zip(rows, ocrbench_verdicts(rows, scorer)):
        per_cat[r["meta"].get("category") or "unknown"].append(hit)
    count = {k: int(sum(v)) for k, v in per_cat.items()}
    groups = {"Text Recognition": sum(count.get(c, 0) for c in TEXT_RECOGNITION),
              **{g: count.get(g, 0) for g in OCR_GROUPS}}
    final = sum(groups.values())  # as OCRBench_eval: categories outside its ten are not counted
    return {"metric": "right answers (OCRBench Final Score, out of 1000 on the full set)", "overall": final,
            "scorer": scorer.summary(),
            "final_score_norm": final / 10, "accuracy": round(final / len(rows), 6) if rows else None,
            "scored": len(rows), "groups": groups,
            "category": {k: {"correct": count[k], "scored": len(v)} for k, v in sorted(per_cat.items())}}
