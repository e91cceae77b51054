"""The command line explains itself (issue 32 point 4): ``lvita --help`` shows the synopsis, every option
of every subcommand has help text, one name per concept across subcommands, conflicting options fail.

The parsers are walked, not listed: a new option without help, or a second spelling of a concept that
already has a name, fails here."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from lvita import cli
from lvita.evaluation import command as eval_command
from lvita.evaluation import vniah
from lvita.infer import generate
from lvita.training import loop


def _walk(ap: argparse.ArgumentParser, path: str):
    """(command path, parser) for ``ap`` and every sub-parser below it."""
    yield path, ap
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name not in cli.OWN_PARSERS:  # built by their modules (below)
                    yield from _walk(sub, f"{path} {name}")


def all_parsers():
    yield from _walk(cli.parser(), "lvita")
    yield "lvita generate", generate.parser()
    yield "lvita eval", eval_command.parser()
    yield "lvita eval --benchmark vniah", vniah.parser()
    yield "python -m lvita.train", loop.parser()


def _options(ap):
    return [a for a in ap._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_every_option_of_every_subcommand_has_help():
    missing, seen = [], 0
    for path, ap in all_parsers():
        for action in _options(ap):
            if action.help == argparse.SUPPRESS:  # the launcher's --local_rank, vniah's fixed --benchmark
                continue
            seen += 1
            if not (action.help or "").strip():
                missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
    assert seen > 80  # the walk reached the sub-parsers (a walk that finds nothing cannot pass)
    assert missing == []


def test_subcommands_have_help_in_the_listing():
    ap = cli.parser()
    (subs,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(subs.choices) >= {"demo", "stages", "check", "train", "data", "ckpt", "convert", "generate", "eval"}
    assert all(a.help for a in subs._choices_actions)


# concepts that had two spellings in lvita's parsers, and the name kept (issue 32: to-hf --layout vs from-hf
# --format, demo --nproc vs check --world-size, eval --frames vs --max-frames; V-NIAH's list is its own concept)
ONE_NAME = {"--format": ["--layout", "--model-format"], "--world-size": ["--nproc", "--num-procs", "--num_gpus"],
            "--max-frames": ["--frames", "--num-frames"]}


def test_one_name_per_concept_across_subcommands():
    names = {s for _, ap in all_parsers() for a in _options(ap) for s in a.option_strings}
    for kept, others in ONE_NAME.items():
        assert kept in names
        assert not names & set(others), f"{kept} is also spelled {sorted(names & set(others))}"
    # the same option name means the same kind of value in every command (type and nargs agree)
    kinds: dict[str, set] = {}
    for _, ap in all_parsers():
        for a in _options(ap):
            for s in a.option_strings:
                kinds.setdefault(s, set()).add((getattr(a.type, "__name__", a.type), a.nargs, type(a).__name__))
    assert {s: k for s, k in kinds.items() if len(k) > 1} == {}


def test_lvita_help_shows_the_synopsis():
    out = subprocess.run([sys.executable, "-m", "lvita.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for line in ("lvita demo [--out DIR]", "lvita stages [copy NAME [DEST]]", "lvita check --stage FILE|NAME",
                 "lvita convert to-hf CKPT OUT [--format F]", "lvita eval --benchmark NAME --score-only FILE"):
        assert line in out.stdout


@pytest.mark.parametrize("argv,message", [
    (["stages", "demo/2_general"], "did you mean `lvita stages copy demo/2_general`"),
    (["stages", "copy"], "name the shipped stage"),
    (["stages", "copy", "no/such"], "no shipped stage of that name"),
    (["demo", "--stages", "0"], "--stages 0: between 1 and 5"),
    (["demo", "--world-size", "0"], "--world-size 0: at least 1 process"),
    (["demo", "--set", "train.nope=1"], "unknown key 'train.nope'"),
    (["eval", "--benchmark", "MMStar", "--score-only", "p.jsonl", "--model", "m"], "--score-only and --model do not go"),
    (["eval", "--benchmark", "MMStar", "--score-only", "p.jsonl", "--show", "3"], "--score-only and --show do not go"),
])
def test_conflicting_or_wrong_options_are_one_error_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and message in err[0], err
    assert not (tmp_path / "demo_out").exists()  # refused before the demo made anything


def test_eval_has_one_frame_limit_and_vniah_its_own_grid(capsys):
    with pytest.raises(SystemExit):  # argparse: unknown option, exit 2
        eval_command.parser().parse_args(["--benchmark", "Video-MME", "--frames", "64"])
    args = eval_command.parser().parse_args(["--benchmark", "Video-MME", "--max-frames", "64"])
    assert args.max_frames == 64
    args = vniah.parser().parse_args(["--model", "m", "--haystack", "h", "--needles", "n", "--haystack-frames", "2,4"])
    assert args.haystack_frames == "2,4"
