"""lvita's judge-free scorers equal VLMEvalKit's own ``evaluate()`` item by item, at both commits.

The fixtures (``tests/fixtures/vlmevalkit_scores``, made by ``make_score_fixtures.py`` running VLMEvalKit
itself at 37d08c5 and at e8e78f0) hold lvita prediction rows made to stress every matching rule, and
VLMEvalKit's verdict per item and the breakdown its evaluate returns. Counts must be equal; percentages
equal at VLMEvalKit's own rounding (Video-MME / LongVideoBench "%.3f", MVBench "%.2f%%"; the image
benchmarks' unrounded floats at lvita's rounding). Items on which VLMEvalKit's MVBench / MLVU evaluate
crashes are compared as "lvita counts a crash there"; the reference breakdown was computed without them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lvita.evaluation import longvideo, mvbench, videomme
from lvita.evaluation import vlmevalkit_score as sc
from lvita.evaluation.scorer import SCORERS, as_text, scorer_named
from lvita.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "vlmevalkit_scores"
# vlmeval/dataset/utils/multiple_choice.py MMB_abbrs: report_acc renames these groups
MMB_ABBRS = {"coarse_perception": "CP", "finegrained_perception (instance-level)": "FP-S",
             "finegrained_perception (cross-instance)": "FP-C", "logic_reasoning": "LR",
             "relation_reasoning": "RR", "attribute_reasoning": "AR"}
BENCHMARKS = ["MMBench_DEV_EN", "MMStar", "AI2D_TEST", "MMMU_DEV_VAL", "HallusionBench", "OCRBench", "Video-MME",
              "MVBench", "LongVideoBench", "MLVU"]


def fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def by_index(doc, rows, values):
    return {doc["index_of_id"][r["id"]]: int(v) if v is not None else None for r, v in zip(rows, values)}


def assert_acc_table(ref: dict, column: int, groups: dict):
    """report_acc's table (column = split position) against lvita's {name: {"accuracy", "correct", "scored"}}."""
    for name, acc in groups.items():
        want = ref[MMB_ABBRS.get(name, name)][column]
        assert want is not None and acc["correct"] / acc["scored"] == pytest.approx(want, abs=1e-12), name
        assert acc["accuracy"] == round(want, 6), name


def check_mcq(doc, rows, scorer, ref):
    if doc["benchmark"] == "MMBench_DEV_EN":
        hits = sc.circular_verdicts(rows, scorer)
        assert {str(k): int(v) for k, v in hits.items()} == ref["verdicts"]
        res = sc.circular_score(rows, scorer)
    elif doc["benchmark"] == "MMMU_DEV_VAL":
        mm = [sc.mmmu_row(r) for r in rows]
        assert by_index(doc, mm, sc.mcq_verdicts(mm, scorer)) == ref["verdicts"]
        res = sc.mmmu_score(rows, scorer)
    else:
        assert by_index(doc, rows, sc.mcq_verdicts(rows, scorer)) == ref["verdicts"]
        res = sc.mcq_score(rows, scorer)
    table = ref["breakdown"]
    splits = table["split"]
    if "validation" in splits:  # MMMU: lvita's overall and categories are the validation column
        col = splits.index("validation")
        assert_acc_table(table, col, {"Overall": res["overall"], **res["category"]})
        assert_acc_table({"Overall": table["Overall"]}, 0, {})
        for sp, acc in res["split"].items():
            assert acc["correct"] / acc["scored"] == pytest.approx(table["Overall"][splits.index(sp)], abs=1e-12)
    else:
        assert splits in (["none"], ["dev"])
        assert_acc_table(table, 0, {"Overall": res["overall"], **res.get("l2-category", {}), **res["category"]})
    named = {MMB_ABBRS.get(k, k) for k in [*res.get("l2-category", {}), *res["category"]]} | {"split", "Overall"}
    assert {k for k, v in table.items() if any(x is not None for x in v)} <= named


def check_hallusion(doc, rows, scorer, ref):
    assert by_index(doc, rows, sc.hallusion_verdicts(rows, scorer)) == ref["verdicts"]
    assert dict(zip([r["id"] for r in rows], sc.yorn_extracted(rows, scorer))) == ref["extracted"]
    res = sc.hallusion_score(rows, scorer)
    table = ref["breakdown"]
    mine = {"Overall": res["overall"], **res["category"], **res["l2-category"]}
    assert sorted(table["split"]) == sorted(mine)
    for i, name in enumerate(table["split"]):
        for acc in ("aAcc", "fAcc", "qAcc"):
            assert mine[name][acc] == round(table[acc][i], 4), (name, acc)


def check_ocrbench(doc, rows, scorer, ref):
    assert by_index(doc, rows, sc.ocrbench_verdicts(rows, scorer)) == ref["verdicts"]
    res = sc.ocrbench_score(rows, scorer)
    want = ref["breakdown"]
    assert res["groups"] == {k: v for k, v in want.items() if not k.startswith("Final Score")}
    assert (res["overall"], res["final_score_norm"]) == (want["Final Score"], want["Final Score Norm"])


def fmt3(group: dict | None) -> str:
    return "nan" if group is None else f"{group['accuracy']:.3f}"


def check_videomme(doc, rows, scorer, ref):
    assert by_index(doc, rows, videomme.verdicts(rows, scorer)) == ref["verdicts"]
    res = videomme.score(rows, scorer)
    for dur, want in ref["breakdown"].items():
        mine = res if dur == "overall" else res["duration"].get(dur)
        assert fmt3(mine) == want["overall"], dur
        for key in ("domain", "sub_category", "task_type"):
            groups = res[key] if dur == "overall" else res["per_duration"].get(dur, {}).get(key, {})
            assert {k: fmt3(groups.get(k)) for k in want[key]} == want[key], (dur, key)
            assert set(groups) <= set(want[key])


def check_lvb(doc, rows, scorer, ref):
    assert by_index(doc, rows, longvideo.verdicts_lvb(rows, scorer)) == ref["verdicts"]
    res = longvideo.score_lvb(rows, scorer)
    for dur, want in ref["breakdown"].items():
        mine = res if dur == "overall" else res["duration_group"].get(dur)
        assert fmt3(mine) == want["overall"], dur
        groups = res["question_category"] if dur == "overall" else res["per_duration_group"].get(dur, {})
        assert {k: fmt3(groups.get(k)) for k in want["question_category"]} == want["question_category"], dur


def check_crashing(doc, rows, scorer, ref):
    """MVBench / MLVU: crashes where VLMEvalKit crashed, verdicts elsewhere, breakdown without the crashes."""
    verdicts = mvbench.verdicts if doc["benchmark"] == "MVBench" else longvideo.verdicts_mlvu
    score = mvbench.score if doc["benchmark"] == "MVBench" else longvideo.score_mlvu
    scores, crashes = verdicts(rows, scorer)
    crashed = {doc["index_of_id"][r["id"]] for r, c in zip(rows, crashes) if c}
    assert crashed == set(ref["crashed"])
    assert {k: v for k, v in by_index(doc, rows, scores).items() if k not in crashed} == ref["verdicts"]
    assert sum(score(rows, scorer)["crashes_vlmevalkit"].values()) == len(crashed)
    kept = [r for r in rows if doc["index_of_id"][r["id"]] not in crashed]
    res = score(kept, scorer)
    assert res["crashes_vlmevalkit"] == {}
    want = ref["breakdown"]
    if doc["benchmark"] == "MVBench":  # get_dimension_rating: {task: [right, total, "xx.xx%"], "overall": ...}
        mine = {t: [a["correct"], a["count"], f"{a['accuracy'] * 100:.2f}%"] for t, a in res["task"].items()}
        mine["overall"] = [res["correct"], res["count"], f"{res['accuracy'] * 100:.2f}%"]
        assert res["unscored_rated_right"] == sum(v is None for v in ref["verdicts"].values())
    else:  # MLVU_MCQ get_dimension_rating: {task: [right, total]}; MLVU.evaluate's M-Avg
        mine = {t: [a["correct"], a["count"]] for t, a in res["task"].items()}
        assert list(scorer.mlvu_m_avg_tasks) == ref["m_avg_tasks"]
        assert round(res["vlmevalkit_m_avg"] * 100, 1) == ref["m_avg"]
    assert mine == want


CHECKS = {"HallusionBench": check_hallusion, "OCRBench": check_ocrbench, "Video-MME": check_videomme,
          "LongVideoBench": check_lvb, "MVBench": check_crashing, "MLVU": check_crashing}


@pytest.mark.parametrize("scorer_name", list(SCORERS))
@pytest.mark.parametrize("bench_name", BENCHMARKS)
def test_equals_vlmevalkit(bench_name, scorer_name):
    doc = fixture(bench_name)
    ref = doc["reference"][scorer_name]
    scorer = SCORERS[scorer_name]
    assert ref["versions"]["vlmevalkit_commit"] == scorer.commit
    CHECKS.get(bench_name, check_mcq)(doc, doc["rows"], scorer, ref)


def test_the_fixtures_tell_the_scorers_apart():
    """Each commit's rules matter on these rows: the references differ, and each scorer fails the other's."""
    doc = fixture("MMStar")
    old, new = (doc["reference"][n]["verdicts"] for n in SCORERS)
    assert old != new
    for name, other in zip(SCORERS, reversed(list(SCORERS))):
        mine = by_index(doc, doc["rows"], sc.mcq_verdicts(doc["rows"], SCORERS[name]))
        assert mine == doc["reference"][name]["verdicts"] and mine != doc["reference"][other]["verdicts"]


@pytest.mark.parametrize("scorer_name", list(SCORERS))
def test_every_catalog_benchmark_takes_the_scorer(scorer_name):
    """What ``lvita eval`` runs: ``bench.score(rows, scorer=...)`` reports the scorer it used."""
    from lvita.evaluation.catalog import CATALOG
    from lvita.evaluation.items import Benchmark

    published = {name: b for name, b in CATALOG.items() if isinstance(b, Benchmark) and b.wrapped}
    assert len(published) == 13  # the nine VLMEvalKit image names and the four video benchmarks
    for name, bench in published.items():
        doc = fixture(next(b for b in BENCHMARKS if name.startswith(b.split("_")[0])))
        res = bench.score(doc["rows"], scorer=SCORERS[scorer_name])
        assert res["scorer"] == {"name": scorer_name, "commit": SCORERS[scorer_name].commit}, name
        assert bench.score(doc["rows"])["scorer"]["name"] == "vlmevalkit-37d08c5", name  # the default


@pytest.mark.parametrize("scorer_name", list(SCORERS))
def test_xlsx_round_trip(scorer_name):
    scorer = SCORERS[scorer_name]
    for key, col in json.loads((FIXTURES / "round_trip.json").read_text())[scorer_name]["columns"].items():
        back = scorer.read_back(col["written"])
        assert [as_text(v) for v in back] == col["read_back"], key
        assert [type(v).__name__ for v in back] == col["types"], key


def test_scorer_named():
    assert scorer_named("vlmevalkit-e8e78f0").commit.startswith("e8e78f0")
    with pytest.raises(UserError, match="vlmevalkit-37d08c5, vlmevalkit-e8e78f0"):
        scorer_named("vlmevalkit")
