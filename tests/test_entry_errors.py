"""One error type for bad input: every user error is a :class:`lvita.errors.UserError`, and every entry
point (``lvita``, ``python -m lvita.train`` / ``lvita.generate`` / ``lvita.eval``, ``lvita convert`` /
``ckpt``, ``lvita demo``) reports one as exactly one line ``<prog>: error: ...`` with exit 2, while any
other exception (a bug) propagates with its traceback. In-process ``main(argv)`` calls with
monkeypatched internals, plus one ``python -m lvita.train`` subprocess; a few seconds in all."""
from __future__ import annotations

import argparse
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lvita.errors import ConfigError, PathError, UserError, one_line, run_main
from tests.conftest import REPO, stage_dict, write_stage


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    """A world of one as the launcher would set it (lvita.train fills it in for os.environ otherwise)."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")


def _one_error_line(capsys, prog: str, *names: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    for name in names:
        assert name in lines[0], (name, err)
    return lines[0]


def _boom(exc: BaseException):
    def raiser(*args, **kwargs):
        raise exc
    return raiser


# -- the wrapper ----------------------------------------------------------------------------------

def test_run_main_prints_a_user_error_as_one_line_and_returns_2(capsys):
    def bad(x, *, y):
        raise PathError(f"--data {x}{y}: no such file\n  - and this\n  - and that")

    assert run_main("lvita x", bad, "a.jsonl", y="!") == 2
    assert capsys.readouterr().err == "lvita x: error: --data a.jsonl!: no such file - and this - and that\n"


def test_run_main_passes_the_exit_status_and_arguments_through(capsys):
    assert run_main("p", lambda a, b=0: a + b, 3, b=4) == 7
    assert run_main("p", lambda: None) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("exc", [RuntimeError("boom"), ValueError("boom"), FileNotFoundError("boom"),
                                 KeyboardInterrupt(), SystemExit(3)])
def test_run_main_lets_anything_else_through(capsys, exc):
    with pytest.raises(type(exc)):
        run_main("p", _boom(exc))
    assert capsys.readouterr().err == ""


def test_run_main_prints_on_rank_0_only_but_every_rank_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert run_main("lvita.train", _boom(UserError("bad"))) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    assert run_main("lvita.train", _boom(UserError("bad"))) == 2
    assert capsys.readouterr().err == "lvita.train: error: bad\n"


def test_one_line_never_prints_an_empty_message():
    assert one_line(UserError("")) == "UserError" and one_line(UserError("a\n\tb  c")) == "a b c"


def test_every_user_error_class_is_a_user_error():
    from lvita.ckpt.checkpoint import CheckpointError
    from lvita.config.schema import ConfigError as SchemaConfigError
    from lvita.data.errors import DataError
    from lvita.data.jsonarray import JsonArrayError
    from lvita.data.media import MediaError
    from lvita.data.stream import DataError as StreamDataError
    from lvita.data.template import SampleError
    from lvita.infer.prompt import ContextError
    from lvita.training.guard import Diverged

    classes = [ConfigError, PathError, CheckpointError, DataError, JsonArrayError, MediaError, SampleError,
               ContextError, Diverged]
    assert all(issubclass(c, UserError) for c in classes)
    assert SchemaConfigError is ConfigError and StreamDataError is DataError
    assert not issubclass(CheckpointError, OSError) and not issubclass(UserError, (OSError, ValueError))
    assert issubclass(ConfigError, ValueError)  # the presets' callers add where a bad value came from


# -- lvita (the CLI) ------------------------------------------------------------------------------

def test_cli_user_error(capsys, tmp_path):
    from lvita.cli import main

    assert main(["check", "--stage", str(tmp_path / "nope.json"), "--world-size", "1"]) == 2
    _one_error_line(capsys, "lvita check", "nope.json")
    assert main(["data", "show", "--stage", str(tmp_path / "nope.json"), "--index", "0"]) == 2
    _one_error_line(capsys, "lvita data show", "nope.json")


def test_cli_bug_propagates(monkeypatch, tmp_path):
    import lvita.config.check
    from lvita.cli import main

    monkeypatch.setattr(lvita.config.check, "main", _boom(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        main(["check", "--stage", str(tmp_path / "s.json"), "--world-size", "1"])


def test_a_multi_line_validation_error_is_one_line(capsys, tokenizer_dir, dataset_dir, tmp_path):
    from lvita.cli import main

    stage = write_stage(tmp_path / "s.json", stage_dict(tokenizer_dir, dataset_dir, tmp_path / "out"))
    assert main(["check", "--stage", str(stage), "--world-size", "1", "--set", "precision=fp16",
                 "--set", "train.iterations=0"]) == 2
    _one_error_line(capsys, "lvita check", "2 problem(s): ", "precision='fp16'", "train.iterations=0")


# -- lvita.train ----------------------------------------------------------------------------------

def test_train_user_error(capsys, tmp_path):
    from lvita.training.loop import main

    assert main(["--stage", str(tmp_path / "missing.json")]) == 2
    _one_error_line(capsys, "lvita.train", "missing.json")


def _fake_stage(monkeypatch, tmp_path):
    import lvita.config.schema

    cfg = SimpleNamespace(output_dir=str(tmp_path / "run"))
    monkeypatch.setattr(lvita.config.schema, "load_stage", lambda path, sets: cfg)
    return cfg


def test_train_bug_propagates(monkeypatch, tmp_path):
    from lvita.training import loop

    _fake_stage(monkeypatch, tmp_path)
    monkeypatch.setattr(loop, "run", _boom(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        loop.main(["--stage", "s.json"])


def test_train_divergence_is_one_line_with_the_way_back(capsys, monkeypatch, tmp_path):
    from lvita.training import loop
    from lvita.training.guard import Diverged

    _fake_stage(monkeypatch, tmp_path)
    monkeypatch.setattr(loop, "run", _boom(Diverged("training diverged: 3 non-finite steps in a row")))
    assert loop.main(["--stage", "s.json"]) == 2
    _one_error_line(capsys, "lvita.train", "3 non-finite steps", "No checkpoint was saved before it")


def test_train_tokenizer_larger_than_the_vocabulary(capsys, tokenizer_dir, dataset_dir, tmp_path):
    from lvita.data.tokenizer import load_tokenizer
    from lvita.model.presets import llm_config
    from lvita.training.loop import main

    tok = load_tokenizer(tokenizer_dir)
    vocab = llm_config("tiny").vocab_size
    tok.add_tokens([f"extra{i}" for i in range(vocab + 1 - len(tok))])
    tok.save_pretrained(str(tmp_path / "big_tokenizer"))
    stage = write_stage(tmp_path / "s.json", stage_dict(tmp_path / "big_tokenizer", dataset_dir, tmp_path / "out"))
    assert main(["--stage", str(stage)]) == 2
    _one_error_line(capsys, "lvita.train", "big_tokenizer", f"{vocab + 1} tokens", f"vocabulary of {vocab}")


def test_python_m_lvita_train_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lvita.train", "--stage", str(tmp_path / "missing.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in proc.stderr
    assert len(errors) == 1 and errors[0].startswith("lvita.train: error: stage file ") and "missing.json" in errors[0]


# -- lvita.generate ---------------------------------------------------------------------------------

def test_generate_user_error(capsys, tmp_path):
    from lvita.cli import main as cli
    from lvita.infer.generate import main

    assert main(["--model", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    _one_error_line(capsys, "lvita generate", "nowhere")
    assert cli(["generate", "--model", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "0"]) == 2
    _one_error_line(capsys, "lvita generate", "--max-new-tokens")


def test_generate_bug_propagates(monkeypatch, tmp_path):
    import lvita.infer.generate as gen
    from lvita.cli import main as cli

    monkeypatch.setattr(gen, "load_for_args", _boom(ValueError("boom")))  # not every ValueError is bad input
    with pytest.raises(ValueError, match="boom"):
        gen.main(["--model", str(tmp_path), "--prompt", "hi"])
    with pytest.raises(ValueError, match="boom"):
        cli(["generate", "--model", str(tmp_path), "--prompt", "hi"])


# -- lvita.eval (JSONL sets and benchmarks) ----------------------------------------------------------

def test_eval_user_error(capsys, tmp_path):
    from lvita.eval import main

    assert main(["--model", str(tmp_path), "--data", str(tmp_path / "set.jsonl")]) == 2
    _one_error_line(capsys, "lvita eval", "set.jsonl")


def test_eval_bug_propagates(monkeypatch, tmp_path):
    import lvita.evaluation.command
    from lvita.cli import main as cli

    data = tmp_path / "set.jsonl"
    data.write_text("{}\n")
    monkeypatch.setattr(lvita.evaluation.command, "load_for_args", _boom(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        cli(["eval", "--model", str(tmp_path), "--data", str(data)])


def test_benchmark_user_errors(capsys, tmp_path):
    from lvita.eval import main

    assert main(["--model", str(tmp_path), "--benchmark", "NoSuchBench", "--data", str(tmp_path)]) == 2
    _one_error_line(capsys, "lvita eval", "--benchmark NoSuchBench")
    assert main(["--model", str(tmp_path), "--benchmark", "MMStar", "--data", str(tmp_path / "gone.tsv")]) == 2
    _one_error_line(capsys, "lvita eval", "gone.tsv")
    assert main(["--benchmark", "MMStar", "--score-only", str(tmp_path / "predictions.jsonl")]) == 2
    _one_error_line(capsys, "lvita eval", "predictions.jsonl")
    assert main(["--model", str(tmp_path), "--benchmark", "vniah", "--haystack", str(tmp_path / "h.mp4"),
                 "--needles", str(tmp_path), "--haystack-frames", "abc"]) == 2
    _one_error_line(capsys, "lvita eval --benchmark vniah", "--haystack-frames 'abc'")


def test_benchmark_bugs_propagate(monkeypatch, tmp_path):
    import lvita.evaluation.command
    import lvita.evaluation.vniah
    from lvita.eval import main

    monkeypatch.setattr(lvita.evaluation.command, "load_for_args", _boom(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        main(["--model", str(tmp_path), "--benchmark", "MMStar", "--data", str(tmp_path)])
    monkeypatch.setattr(lvita.evaluation.command, "score_only", _boom(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        main(["--benchmark", "MMStar", "--score-only", str(tmp_path / "p.jsonl")])
    monkeypatch.setattr(lvita.evaluation.vniah, "parse_grid", _boom(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        main(["--model", str(tmp_path), "--benchmark", "vniah", "--haystack", "h.mp4", "--needles", "n"])


# -- lvita convert / lvita ckpt ---------------------------------------------------------------------

def test_convert_user_errors(capsys, tmp_path):
    from lvita.ckpt.convert import main
    from lvita.cli import main as cli

    assert cli(["ckpt", "to-universal", str(tmp_path)]) == 2
    _one_error_line(capsys, "lvita ckpt", str(tmp_path))
    assert cli(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    _one_error_line(capsys, "lvita convert", "run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    args = argparse.Namespace(cmd="convert", convert_cmd="from-hf", paths=[str(tmp_path), str(tmp_path / "taken")],
                              preset="tiny", tokenizer=None, format=None)
    assert main(args) == 2
    _one_error_line(capsys, "lvita convert", "taken exists")


def test_convert_bug_propagates(monkeypatch, tmp_path):
    import lvita.ckpt.resume
    from lvita.cli import main as cli

    monkeypatch.setattr(lvita.ckpt.resume, "to_universal", _boom(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cli(["ckpt", "to-universal", str(tmp_path)])


# -- lvita demo -------------------------------------------------------------------------------------

def test_demo_user_error_and_bug(capsys, monkeypatch, tmp_path):
    import lvita.demo.run as demo
    from lvita.cli import main as cli

    monkeypatch.setattr(demo, "STAGES", tmp_path / "no_stages")
    assert cli(["demo", "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, "lvita demo", "no_stages")
    monkeypatch.setattr(demo, "STAGES", tmp_path)
    monkeypatch.setattr(demo, "prepare", _boom(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cli(["demo", "--out", str(tmp_path / "out")])
