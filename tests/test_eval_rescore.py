"""Evaluation in one home: rescoring what users have (lvita's predictions.jsonl, an {id, prediction} JSONL,
VLMEvalKit's own .xlsx / .tsv / .csv) gives the scores of lvita's own run; lvita's JSONL sets resume after an
interruption like a benchmark; ``--show`` prints the prompt the driver would send and saves its ids; the
help lists the catalog. The model is stubbed where only the driver is under test (a seeded answer per item)."""
from __future__ import annotations

import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from lvita import eval as lveval
from lvita.errors import UserError
from lvita.data.input_format import InputFormat
from lvita.evaluation import command as eval_command
from lvita.evaluation import run as eval_run
from lvita.evaluation.catalog import CATALOG, lookup
from lvita.evaluation.items import LoadOptions
from lvita.evaluation.mvbench import TASKS
from lvita.data.tokenizer import load_tokenizer
from lvita.infer.prompt import build_prompt
from tests.test_eval_image import always_b_hf, b64png, write_tsv  # noqa: F401 (always_b_hf: a fixture)

# predictions made to stress the readers: empty (NaN in a table), digits with a leading zero, unicode, a letter
# in the middle, option text, two letters, lowercase
ANSWERS = ["", "0123", "B", "答案是 C", "The answer is (A) because", "blue", "A or B", "b", "nan", "D. pink"]


def _stub_answers(monkeypatch, seed: int = 0):
    """The driver's model call replaced by a seeded choice from ANSWERS; -> the list of user texts asked."""
    rng, asked = random.Random(seed), []

    def answer(model, fmt, messages, images, videos, **opts):
        asked.append(messages)
        return rng.choice(ANSWERS), SimpleNamespace(stop="eos")

    monkeypatch.setattr(eval_run, "answer", answer)
    return asked


def _mmbench(tmp_path, n=24, seed=1):
    """A seeded MMBench TSV: main rows and their rotated copies (index + 1e6), a row without an image."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        opts = dict(zip("ABCD", rng.sample(["red", "blue", "green", "pink", "a", "nan"], 4)))
        base = {"question": f"Which {i}?", "category": rng.choice(["colour", "shape"]), "l2-category": "p",
                "split": "dev", "answer": rng.choice("ABCD"), **opts}
        rows.append({**base, "index": i, "image": b64png(rng.choice(["red", "blue"]))})
        if i % 3 == 0:
            rows.append({**base, "index": 1_000_000 + i, "image": str(i), "answer": rng.choice("ABCD")})
    rows.append({"index": n, "image": "", "question": "no image", "A": "x", "B": "y", "answer": "A"})
    return write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)


@pytest.fixture
def lvita_run(tmp_path, monkeypatch, tokenizer_dir):
    """lvita's own run of the MMBench TSV (stubbed answers): its folder and results.json."""
    data, out = _mmbench(tmp_path), tmp_path / "run"
    fmt = InputFormat.of("tiny", load_tokenizer(tokenizer_dir))
    monkeypatch.setattr(eval_command, "load_for_args", lambda args, opts: (None, fmt, None, 0))
    _stub_answers(monkeypatch)
    assert lveval.main(["--model", "m", "--benchmark", "MMBench_DEV_EN", "--data", str(data), "--out", str(out)]) == 0
    return data, out, json.loads((out / "results.json").read_text())


def test_rescoring_every_prediction_file_gives_the_runs_scores(lvita_run, tmp_path):
    data, out, ran = lvita_run
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["prediction"] for r in rows} >= {"", "0123", "nan"}  # the stressing answers were drawn
    pairs = tmp_path / "pairs.jsonl"  # VLMEvalKit's names: index, prediction
    pairs.write_text("".join(json.dumps({"index": int(r["id"]), "prediction": r["prediction"]}) + "\n"
                             for r in reversed(rows)))  # any order
    table = pd.DataFrame({"index": [int(r["id"]) for r in rows], "question": "q",
                          "prediction": [r["prediction"] for r in rows]})
    files = {"pairs": pairs}
    for ext, write in ((".xlsx", lambda p: table.to_excel(p, index=False)),
                       (".tsv", lambda p: table.to_csv(p, sep="\t", index=False)),
                       (".csv", lambda p: table.to_csv(p, index=False))):
        write(tmp_path / f"MyModel_MMBench_DEV_EN{ext}")
        files[ext] = tmp_path / f"MyModel_MMBench_DEV_EN{ext}"
    for kind, path in [("own", out / "predictions.jsonl")] + list(files.items()):
        dest = tmp_path / f"rescored-{kind}"
        extra = [] if kind == "own" else ["--data", str(data)]
        assert lveval.main(["--benchmark", "MMBench_DEV_EN", "--score-only", str(path), "--out", str(dest)] + extra) == 0
        got = json.loads((dest / "results.json").read_text())
        assert got["scores"] == ran["scores"], kind
        assert got["answered"] == ran["answered"]
        if kind != "own":  # every item answered, nothing unknown; the row without an image is the loader's skip
            assert got["prediction_file"]["unanswered"]["count"] == 0
            assert got["prediction_file"]["unknown_ids"]["count"] == 0
            assert got["prediction_file"]["skipped_by_loader"]["count"] == 1
    assert not (tmp_path / "rescored-.xlsx" / "work").exists()  # no image decoded to rescore


def test_rescoring_counts_missing_and_unknown_ids_and_needs_the_benchmark_files(lvita_run, tmp_path, capsys):
    data, out, _ = lvita_run
    pairs = tmp_path / "few.jsonl"
    pairs.write_text('{"id": "0", "prediction": "A"}\n{"id": "777", "prediction": "B"}\n')
    assert lveval.main(["--benchmark", "MMBench_DEV_EN", "--score-only", str(pairs)]) == 2
    assert "pass --data with the MMBench_DEV_EN files" in capsys.readouterr().err
    assert lveval.main(["--benchmark", "MMBench_DEV_EN", "--score-only", str(pairs), "--data", str(data)]) == 0
    got = json.loads((tmp_path / "results.json").read_text())
    assert got["answered"] == 1 and got["prediction_file"]["unknown_ids"] == {"count": 1, "ids": ["777"]}
    assert got["prediction_file"]["unanswered"]["count"] == len(_main_and_rotated(data)) - 1
    bad = tmp_path / "MyModel.xlsx"
    pd.DataFrame({"index": [0], "answer": ["A"]}).to_excel(bad, index=False)
    assert lveval.main(["--benchmark", "MMBench_DEV_EN", "--score-only", str(bad), "--data", str(data)]) == 2
    assert "no column 'prediction'" in capsys.readouterr().err


def _main_and_rotated(data):
    return [i for i in lookup("MMBench_DEV_EN").load(data, LoadOptions(work=data.parent / "w", media=False))
            if hasattr(i, "question")]


def test_video_benchmark_rescored_without_its_videos(tmp_path):
    """media=False: an MVBench item whose video is not on this machine is still scored (ids, answers, tasks)."""
    root = tmp_path / "MVBench"
    (root / "json").mkdir(parents=True)
    file = TASKS["Action Antonym"][0]
    recs = [{"video": f"v{i}.webm", "question": f"q{i}", "candidates": ["walk", "run", "sit"],
             "answer": ["walk", "run", "sit"][i % 3]} for i in range(4)]
    (root / "json" / file).write_text(json.dumps(recs))
    bench = lookup("MVBench")
    assert [type(e).__name__ for e in bench.load(root, LoadOptions(work=tmp_path / "w"))] == ["Skip"] * 4
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"action_antonym-{i}", "prediction": "(B) run"}) + "\n" for i in range(4)))
    assert lveval.main(["--benchmark", "MVBench", "--score-only", str(pairs), "--data", str(root)]) == 0
    got = json.loads((tmp_path / "results.json").read_text())
    assert got["answered"] == 4 and got["scores"]["correct"] == 1  # only item 1's answer is "run"


def test_jsonl_set_resumes_after_an_interruption(tmp_path, monkeypatch, tokenizer_dir):
    data = tmp_path / "set.jsonl"
    items = [{"id": f"q{i}", "category": "c", "choices": ["red", "blue"],
              "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Colour {i}?"},
                           {"role": "assistant", "content": "B"}]} for i in range(5)]
    data.write_text("".join(json.dumps(x) + "\n" for x in items))
    fmt = InputFormat.of("tiny", load_tokenizer(tokenizer_dir))
    monkeypatch.setattr(eval_command, "load_for_args", lambda args, opts: (None, fmt, None, 0))
    asked = []

    def dying(model, fmt, messages, *a, **k):
        asked.append(messages)
        if len(asked) == 3:
            raise KeyboardInterrupt  # a killed run
        return "B", SimpleNamespace(stop="eos")

    monkeypatch.setattr(eval_run, "answer", dying)
    argv = ["--model", "m", "--data", str(data)]
    with pytest.raises(KeyboardInterrupt):
        lveval.main(argv)
    out = tmp_path / "set-eval"
    assert [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()] == ["q0", "q1"]
    assert asked[0] == items[0]["messages"][:2]  # the whole conversation before the reference, system turn too
    asked.clear()
    monkeypatch.setattr(eval_run, "answer", lambda *a, **k: (asked.append(a[2]), ("B", SimpleNamespace(stop="eos")))[1])
    assert lveval.main(argv) == 0
    assert len(asked) == 3  # q2, q3, q4 only
    res = json.loads((out / "results.json").read_text())
    assert (res["answered"], res["answered_this_run"]) == (5, 3)
    assert res["scores"]["overall"] == {"accuracy": 1.0, "correct": 5, "scored": 5}


def test_show_prints_the_prompt_and_saves_the_ids_the_run_would_send(always_b_hf, tmp_path, capsys):  # noqa: F811
    from lvita.infer.generate import load_input_format, model_system_prompt

    data = write_tsv(tmp_path / "MMStar.tsv", [
        {"index": 7, "image": b64png("red"), "question": "Which colour?", "A": "red", "B": "blue", "answer": "A",
         "category": "coarse"}])
    npz = tmp_path / "item.npz"
    argv = ["--model", str(always_b_hf), "--benchmark", "MMStar", "--data", str(data), "--show", "7", "--save", str(npz)]
    assert lveval.main(argv) == 0
    printed = capsys.readouterr().out
    assert "MMStar item 7" in printed and "Which colour?" in printed and "answer: 'A'" in printed
    assert "<IMG_CONTEXT>x" in printed and "<IMG_CONTEXT><IMG_CONTEXT>" not in printed  # runs collapsed
    fmt, _ = load_input_format(always_b_hf)
    bench = lookup("MMStar")
    item = next(iter(bench.load(data, LoadOptions(work=tmp_path / "w"))))
    want = build_prompt([{"role": "user", "content": bench.prompt(item, fmt)}], fmt, item.images,
                        system_prompt=model_system_prompt(always_b_hf, fmt.tok))  # internvl: the model's own
    saved = np.load(npz)
    assert saved["input_ids"].tolist() == want.input_ids
    np.testing.assert_array_equal(saved["pixel_values"], want.pixel_values.numpy())
    assert lveval.main(argv[:-2] + ["--show", "99"]) == 2
    assert "--show 99: no such item" in capsys.readouterr().err
    assert lveval.main(["--model", str(always_b_hf), "--benchmark", "MMStar", "--data", str(data), "--save", "x.npz"]) == 2
    assert "--save goes with --show" in capsys.readouterr().err


def test_help_shows_benchmark_catalog_and_score_only(capsys):
    with pytest.raises(SystemExit):
        lveval.main(["--help"])
    text = capsys.readouterr().out
    assert "--benchmark" in text and "--score-only" in text and "--show" in text
    assert all(name in text for name in CATALOG)


def test_answer_length_and_frames_are_the_wrappers_unless_given():
    from lvita.evaluation.wrappers import HF, SERVER

    def resolved(name, wrapper, **given):
        args = eval_command.parser().parse_args(["--benchmark", name] + sum(([f"--{k}", str(v)] for k, v in given.items()), []))
        eval_command.settings(args, lookup(name), wrapper)
        return args.max_new_tokens, args.max_frames, args.video_fps

    assert resolved("Video-MME", HF) == (1024, 4096, 1)  # long_vita_hf.py: 1024 tokens (not 32), 4096 frames
    assert resolved("MVBench", SERVER) == (1024, 4096, 1)
    assert resolved("MMStar", HF) == (1024, 4096, 1)
    assert resolved("Video-MME", HF, **{"max-frames": 64, "max-new-tokens": 8, "video-fps": 0.5}) == (8, 64, 0.5)
    with pytest.raises(SystemExit):  # one name for the limit: the old --frames is no option of lvita eval
        resolved("Video-MME", HF, frames=64)
    assert resolved("jsonl", HF) == (64, 128, 1.0)  # lvita's own sets: training's media defaults (data.*)


def test_hostile_prediction_files_end_in_a_score_or_one_error_line(tmp_path, capsys):
    """Seeded hostile prediction files (random bytes under every suffix, odd index / prediction cells, rows of
    the wrong JSON type, a torn quote) given to --score-only: exit 0 with a results.json, or exit 2 with one
    error line; never a traceback."""
    data = write_tsv(tmp_path / "MMStar.tsv", [{"index": i, "image": b64png("red"), "question": "q", "A": "a",
                                                "B": "b", "answer": "A", "category": "c"} for i in range(3)])
    rng = random.Random(int(os.environ.get("LVITA_HOSTILE_SEED", "5")))
    rows = [{"id": 1, "prediction": None}, {"index": "2", "prediction": 3}, [1], "x", {"id": [1], "prediction": "A"},
            {"id": 0, "prediction": "A"}, {"id": {"a": 1}, "prediction": ["A"]}, {"prediction": "B"}]
    outcomes = set()
    for k in range(40):
        ext = rng.choice([".xlsx", ".tsv", ".csv", ".jsonl"])
        path, kind = tmp_path / f"f{k}{ext}", rng.randrange(4)
        if kind == 0:
            path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(300))))
        elif kind == 1:
            sep = "," if ext == ".csv" else "\t"
            path.write_text("index" + sep + "prediction\n" + "\n".join(
                rng.choice(["0", "1", "x", "", " 2", "1e3", "nan"]) + sep + rng.choice(["A", "", "B c", '"'])
                for _ in range(5)))
        elif kind == 2:
            path.write_text("".join(json.dumps(rng.choice(rows)) + "\n" for _ in range(4)))
        else:
            path.write_text('index,prediction\n0,A\n1,"B\n')
        out = tmp_path / f"o{k}"
        rc = lveval.main(["--benchmark", "MMStar", "--score-only", str(path), "--data", str(data), "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        if rc == 2:
            assert len(err) == 1 and err[0].startswith("lvita eval: error: "), err
        else:
            assert rc == 0 and (out / "results.json").is_file()
        outcomes.add(rc)
    assert outcomes == {0, 2}  # the generator reaches both ends
