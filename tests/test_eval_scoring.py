"""VLMEvalKit's exact-matching scores on hand-made prediction rows (hand-computed numbers), and the
prompts Long-VITA's VLMEvalKit wrapper builds, string for string. No model, no files."""
from __future__ import annotations

from pathlib import Path

import pytest

from lvita.data.input_format import LongVitaInput
from lvita.data.input_format import InternVLInput
from lvita.evaluation import prompts
from lvita.evaluation import vlmevalkit_score as sc
from lvita.evaluation.items import Item
from lvita.evaluation.wrappers import SERVER
from lvita.evaluation.scorer import SCORERS
from lvita.errors import UserError

AB = {"A": "cat", "B": "dog"}


def row(id, prediction, answer, choices=AB, **meta):
    return {"id": str(id), "prediction": prediction, "answer": answer, "choices": choices, "meta": dict(meta)}


def test_letter_anywhere_at_37d08c5_among_the_last_words_at_e8e78f0():
    rows = [row(1, "The answer is B.", "B"), row(2, "B is the best because it shows more of the picture here", "B"),
            row(3, "I think it is a dog", "B"), row(4, "(A)", "B"), row(5, "A or B", "A")]
    # 1: B; 2: B is word 1 of 11: right at 37d08c5 (a letter anywhere; this test expected "wrong" before the
    # scorers were checked against VLMEvalKit itself), wrong at e8e78f0 (not among the last 5 words, and the
    # answer is too long for option text); 3: option text "dog" (e8e78f0: 19 characters > 2 x the options' 6:
    # no option text read, wrong); 4: A, wrong; 5: two letters: wrong
    assert sc.mcq_score(rows)["overall"] == {"accuracy": 0.6, "correct": 3, "scored": 5}
    assert sc.mcq_score(rows, SCORERS["vlmevalkit-e8e78f0"])["overall"] == {"accuracy": 0.2, "correct": 1, "scored": 5}
    assert sc.mcq_score(rows)["scorer"] == {"name": "vlmevalkit-37d08c5",
                                            "commit": "37d08c5b1832b6d20110a08008f68a9b45bccc7c"}


def test_an_empty_prediction_reads_back_as_nan():
    """VLMEvalKit's xlsx round trip: "" -> NaN -> "nan", which holds the option text "a"."""
    rows = [row(1, "", "A", {"A": "a", "B": "dog"}), row(2, "B", "B", {"A": "a", "B": "dog"})]
    assert sc.mcq_score(rows)["overall"]["correct"] == 2


def test_hallusion_strips_only_32_periods():
    assert sc.yes_or_no("." * 31 + "yes") == "Yes" and sc.yes_or_no("." * 33 + "yes") == "Unknown"


def test_circular_group_with_one_wrong_rotation_scores_zero():
    rows = [row(0, "A", "A", category="x"), row(1_000_000, "B", "A"), row(2_000_000, "A", "A"),  # one wrong: 0
            row(1, "B", "B", category="x"), row(1_000_001, "B", "B"),  # every rotation right: 1
            row(2, "C", "A", category="y"), row(1_000_002, "hmm", "B"),  # main wrong, no option inferred: 0
            row(1_000_003, "A", "A")]  # a rotation without its main row: not a group
    res = sc.circular_score(rows)
    assert res["overall"] == {"accuracy": round(1 / 3, 6), "correct": 1, "scored": 3}
    assert res["category"] == {"x": {"accuracy": 0.5, "correct": 1, "scored": 2},
                               "y": {"accuracy": 0.0, "correct": 0, "scored": 1}}
    assert res["groups_without_main_row"] == [3]
    assert res["vanilla_circ0"]["overall"]["correct"] == 2  # rows 0 and 1
    assert res["vanilla_all"]["overall"] == {"accuracy": 0.625, "correct": 5, "scored": 8}
    with pytest.raises(UserError, match="row id 'q1' is not one"):
        sc.circular_score([row("q1", "A", "A")])


def test_mmmu_open_question_is_two_options():
    rows = [row("o1", "The answer is 7", "7", None), row("o2", "B", "7", None), row("o3", "A", "7", None),
            row("m1", "B", "B", {"A": "x", "B": "y"})]
    assert sc.mmmu_row(rows[0])["choices"] == {"A": "7", "B": "Other Answers"}
    assert [r["correct"] for r in [sc.mcq_score([sc.mmmu_row(r)])["overall"] for r in rows]] == [1, 0, 1, 1]
    for r in rows[1:]:
        r["meta"]["split"] = "validation"
    res = sc.mmmu_score(rows)  # the leaderboard's number: the validation split (o2 wrong, o3 and m1 right)
    assert res["overall"]["correct"] == 2 and res["overall"]["scored"] == 3
    assert res["all_rows"]["correct"] == 3 and res["split"]["validation"]["scored"] == 3


def test_yes_no_extraction():
    assert [sc.yes_or_no(p) for p in ("Yes.", "No, it is not.", "yes and no", "I don't know", "NO!")] == \
        ["Yes", "No", "Unknown", "Unknown", "No"]


def test_hallusion_aacc_facc_qacc():
    def hb(pred, ans, l2, set_id, fig, q, cat):
        return row(f"{cat}_{l2}_x_{set_id}_{fig}_{q}", pred, ans, None, category=cat, **{"l2-category": l2},
                   set_id=set_id, figure_id=fig, question_id=q)
    rows = [hb("Yes.", "Yes", "chart", "0", "0", "0", "VS"), hb("no", "No", "chart", "0", "1", "0", "VS"),
            hb("No, it is not", "Yes", "chart", "0", "0", "1", "VS"), hb("No", "No", "chart", "0", "1", "1", "VS"),
            hb("yes and no", "Yes", "map", "1", "0", "0", "VD"), hb("No.", "No", "map", "1", "0", "1", "VD")]
    res = sc.hallusion_score(rows)
    # right: 4 of 6 questions; figures (chart,0,0) no, (chart,0,1) yes, (map,1,0) no: 1/3;
    # question groups (chart,0,q0) yes, (chart,0,q1) no, (map,1,q0) no, (map,1,q1) yes: 2/4
    o = res["overall"]
    assert (o["aAcc"], o["fAcc"], o["qAcc"]) == (round(400 / 6, 4), round(100 / 3, 4), 50.0)
    assert o["mean"] == 50.0  # (66.67 + 33.33 + 50) / 3: OpenCompass's HallusionBench "Overall"
    assert (o["figures"], o["question_groups"], res["unknown"]) == (3, 4, 1)
    vs, vd = res["category"]["VS"], res["category"]["VD"]
    assert (vs["aAcc"], vs["fAcc"], vs["qAcc"]) == (75.0, 50.0, 50.0)
    assert (vd["aAcc"], vd["fAcc"], vd["qAcc"]) == (50.0, 0.0, 50.0)


def test_ocrbench_substring_case_and_hme_whitespace():
    rows = [row(0, "The text says HELLO world", ["Hello"], None, category="Regular Text Recognition"),
            row(1, "newyork", ["New York"], None, category="Doc-oriented VQA"),  # spaces count outside HME
            row(2, "It is x ^ 2+1", ["x^2 + 1"], None, category=sc.HME),  # HME: spaces removed
            row(3, "abc", ["ABC"], None, category=sc.HME),  # HME: case kept
            row(4, "Twelve", ["12", "twelve"], None, category="Key Information Extraction")]  # any answer
    res = sc.ocrbench_score(rows)
    assert (res["overall"], res["final_score_norm"]) == (3, 0.3)
    assert res["groups"] == {"Text Recognition": 1, "Scene Text-centric VQA": 0, "Doc-oriented VQA": 0,
                             "Key Information Extraction": 1, sc.HME: 1}


def _item(**kw):
    base = dict(id="1", question="Which colour?", images=[Path("a.png")], choices={"A": "red", "B": "blue"},
                answer="B", hint="Look.")
    return Item(**{**base, **kw})


def test_longvita_prompts_as_the_wrapper_builds_them():
    opts = "Options:\nA. red\nB. blue"
    assert prompts.image_prompt(_item(), LongVitaInput, "MMBench_DEV_EN", "MCQ") == \
        f"<image>\nHint: Look.\nQuestion: Which colour?\n{opts}\nAnswer with the letter."
    assert prompts.image_prompt(_item(hint=None), LongVitaInput, "MMStar", "MCQ") == \
        f"<image>\nQuestion: Which colour?\n{opts}\nAnswer with the option's letter from the given choices directly."
    assert prompts.image_prompt(_item(question="Is it red?", choices=None), LongVitaInput, "HallusionBench", "Y/N") \
        == "<image>\nIs it red?\nAnswer yes or no."
    assert prompts.image_prompt(_item(question="What is written?", choices=None), LongVitaInput, "OCRBench", "VQA") == \
        "<image>\nWhat is written?\nAnswer this question using the text in the image directly without any other " \
        "context."
    mmmu = _item(question="Compare <image 2> and <image 1>.", hint=None, images=[Path("b"), Path("a")],
                 meta={"interleaved": True})
    assert prompts.image_prompt(mmmu, LongVitaInput, "MMMU_DEV_VAL", "MCQ") == (
        f"Question: Compare <image>\n and <image>\n.\n{opts}\n"
        "Answer with the option's letter from the given choices directly.")
    assert prompts.interleave_order("Compare <image 2> and <image 1>, then <image 2>.", 3) == [1, 0, 1]
    assert prompts.image_prompt(_item(images=[Path("a"), Path("b")]), InternVLInput, "MMBench_DEV_EN", "MCQ") == \
        "<image>\n<image>\nLook.\nWhich colour?\nA. red\nB. blue\n" \
        "Answer with the option's letter from the given choices directly."
    assert prompts.postprocess("Let me think. Answer: B", LongVitaInput, SERVER) == "B"  # long_vita.py cuts
    assert prompts.postprocess("Let me think. Answer: B", LongVitaInput) == "Let me think. Answer: B"  # HF: not
    assert prompts.postprocess("Answer: B", InternVLInput) == "Answer: B"


def test_video_mcq_prompt():
    frames = "These are the frames of a video. "
    ask = ("Select the best answer to the following multiple-choice question based on the video. "
           "Respond with only the letter (A, B, C, or D) of the correct option.\n")
    choices = {"A": "runs", "B": "sits"}
    assert prompts.video_mcq_prompt("What happens?", choices, LongVitaInput) == \
        f"<video>\n{frames}{ask}Question: What happens?\nA. runs\nB. sits\nOffer a very short reply."
    assert prompts.video_mcq_prompt("What happens?", choices, LongVitaInput, subtitles="hi\nthere") == (
        f"<video>\n{frames}This video's subtitles are listed below:\nhi\nthere\n{ask}"
        "Question: What happens?\nA. runs\nB. sits\nOffer a very short reply.")
    assert prompts.video_mcq_prompt("What happens?", choices, InternVLInput) == \
        "<video>\nWhat happens?\nA. runs\nB. sits\nAnswer with the option's letter from the given choices directly."
