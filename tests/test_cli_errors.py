"""Every ``lvita`` subcommand ends a user error (bad config, bad data, missing path, not a
checkpoint) with one message on stderr naming the file or key, exit status 2 and no traceback.
Each case runs ``lvita.cli.main`` in a fresh process with its own stdout and stderr (forked from
the test fork server, tests/distributed.py); one case also runs as ``python -m lvita.cli``, the
whole command line a user types."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, stage_dict, write_stage
from tests.distributed import run_command


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir, dataset_dir):
    root = tmp_path_factory.mktemp("cli_errors")
    with open(root / "mostly_bad.jsonl", "w") as f:  # 120 records, 1 in 10 usable: over max_skip_fraction
        for i in range(120):
            good = {"id": f"ok-{i}", "messages": [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello."}]}
            f.write(json.dumps(good) + "\n" if i % 10 == 0 else ("{not json\n" if i % 2 else '{"id": 1}\n'))
    bad = stage_dict(tokenizer_dir, root, root / "out")
    bad["data"]["sources"] = [{"name": "mostly_bad", "paths": ["mostly_bad.jsonl"]}]
    good = stage_dict(tokenizer_dir, dataset_dir, root / "out")
    return {"root": root, "bad_data": write_stage(root / "bad_data.json", bad),
            "good": write_stage(root / "good.json", good)}


def _cases(f):
    root, good, bad = f["root"], str(f["good"]), str(f["bad_data"])
    return {
        "check: unknown key": (["check", "--stage", good, "--world-size", "2", "--set", "train.warmup=3"],
                               "train.warmup"),
        "check: missing stage file": (["check", "--stage", str(root / "nope.json"), "--world-size", "2"],
                                      "nope.json"),
        "data preview: mostly bad data": (["data", "preview", "--stage", bad], "mostly_bad.jsonl:2"),
        "data stats: bad value": (["data", "stats", "--stage", good, "--set", "data.pack_buffer=0"],
                                  "data.pack_buffer"),
        "data stats: missing source": (["data", "stats", "--stage", good, "--set", f"data.root={root}/gone"],
                                       f"{root}/gone"),
        "ckpt: not a checkpoint": (["ckpt", "to-universal", str(root)], str(root)),
        "convert to-hf: missing": (["convert", "to-hf", str(root / "run"), str(root / "hf")], str(root / "run")),
        "convert from-hf: no tokenizer": (["convert", "from-hf", str(root), str(root / "lv"), "--preset", "tiny"],
                                          str(root)),
        "generate: not a model": (["generate", "--model", str(root), "--prompt", "hi"], str(root)),
        "eval: missing data": (["eval", "--model", str(root), "--data", str(root / "set.jsonl")], "set.jsonl"),
        # stage 1 without pretrained weights: the frozen LLM and vision encoder would stay random
        "train: frozen and never loaded": (["train", "--stage", good, *RANDOM_FROZEN], "model.init_from: not set"),
    }


RANDOM_FROZEN = ["--set", "model.allow_random_frozen=false", "--set", 'model.trainable=["projector"]']


CASES = ["check: unknown key", "check: missing stage file", "data preview: mostly bad data", "data stats: bad value",
         "data stats: missing source", "ckpt: not a checkpoint", "convert to-hf: missing",
         "convert from-hf: no tokenizer", "generate: not a model", "eval: missing data",
         "train: frozen and never loaded"]


def _assert_one_clear_error(code: int, stderr: str, names: str) -> None:
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith(("lvita ", "lvita.train: "))]
    assert len(errors) == 1 and ": error: " in errors[0], stderr[-2000:]
    assert names in stderr, (names, stderr[-2000:])


@pytest.mark.parametrize("case", CASES)
def test_user_error_exits_2_with_one_clear_message(files, case, tmp_path):
    argv, names = _cases(files)[case]
    code, _, stderr = run_command(argv, tmp_path)
    _assert_one_clear_error(code, stderr, names)


def test_the_command_line_itself_exits_2(files):
    argv, names = _cases(files)["check: unknown key"]
    proc = subprocess.run([sys.executable, "-m", "lvita.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    _assert_one_clear_error(proc.returncode, proc.stderr, names)


def test_check_lists_unloaded_frozen_modules_with_the_paths_to_fill_in(files, tmp_path):
    """``lvita check`` passes (exit 0) but lists model.init_from with the paths to fill in, naming the modules
    that would stay random; --strict fails on it; allow_random_frozen (the demo's) silences it."""
    argv = ["check", "--stage", str(files["good"]), "--world-size", "1"]
    code, out, err = run_command(argv + RANDOM_FROZEN, tmp_path)
    assert code == 0, err[-2000:]
    listed = out[out.index("to fill in before training"):]
    assert "model.init_from: not set" in listed and "freezes vision, llm" in listed, out
    assert run_command(argv + RANDOM_FROZEN + ["--strict"], tmp_path)[0] == 2
    code, out, _ = run_command(argv + RANDOM_FROZEN[2:], tmp_path)  # allow_random_frozen stays true
    assert code == 0 and "model.init_from" not in out, out
