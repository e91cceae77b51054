"""``lvita eval``: one command line for every catalog entry, reading top to bottom.

Owns the options of evaluation and which of its three modes a command line asks for:

- run (``--model M --data PATH [--benchmark NAME]``): answer every item greedily and score it
  (:func:`lvita.evaluation.run.evaluate_benchmark`); ``--benchmark`` defaults to ``jsonl``, lvita's own
  sets; the model options are ``lvita generate``'s (:func:`lvita.infer.generate.add_model_args`);
- ``--score-only FILE``: rescore predictions without a model (lvita's predictions.jsonl, an
  ``{"id", "prediction"}`` JSONL or VLMEvalKit's result .xlsx/.tsv/.csv; the last two with ``--data``);
- ``--show ID [--save FILE.npz]``: one item's prompt as the model receives it (context runs collapsed,
  as ``lvita data show`` prints training records) and its input ids and pixels, without loading weights.

``--benchmark vniah`` hands the whole command line to V-NIAH's own parser (:mod:`lvita.evaluation.vniah`).

    lvita eval --model hf/Long-VITA-128K_HF --benchmark MMBench_DEV_EN_V11 --data LMUData/MMBench_DEV_EN_V11.tsv
    lvita eval --benchmark MMStar --score-only MyModel_MMStar.xlsx --data LMUData/MMStar.tsv
    lvita eval --model M --benchmark MVBench --data MVBench --show action_sequence-0 --save item.npz
    deepspeed --num_gpus 8 --module lvita.eval --model M --benchmark Video-MME --data DIR --max-frames 1024 --sp 8

Bad input (an unknown or judge-only benchmark, a missing file, a bad option) exits 2 with one line naming it,
before the model loads. Trade-off: an unreadable benchmark file is found after the model is loaded (loaders
are generic); that costs the load time once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lvita.errors import PathError, UserError, run_main
from lvita.evaluation.catalog import CATALOG, OwnCommand, listing, lookup
from lvita.evaluation.items import Benchmark, LoadOptions
from lvita.evaluation.run import evaluate_benchmark, score_only
from lvita.evaluation.scorer import DEFAULT_SCORER, SCORERS, scorer_named
from lvita.evaluation.wrappers import HF, WRAPPERS, Wrapper, wrapper_named
from lvita.infer.generate import add_model_args, load_for_args, options
from lvita.infer.prompt import DEFAULTS

DEFAULT_BENCHMARK = "jsonl"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lvita eval", epilog=listing(), formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="A Long-VITA model on lvita's JSONL sets or a published benchmark, scored "
                                             "as VLMEvalKit scores it; or rescore predictions; or show one prompt.")
    add_model_args(ap, model_required=False)
    ap.add_argument("--benchmark", default=DEFAULT_BENCHMARK, metavar="NAME",
                    help=f"a catalog name (below; default {DEFAULT_BENCHMARK}: lvita's JSONL set)")
    ap.add_argument("--data", help="the benchmark's file (a VLMEvalKit TSV, a JSONL set) or folder")
    ap.add_argument("--out", help="results folder (default: <data dir>/<NAME>-eval; a JSONL set: <data dir>/<stem>-eval)")
    ap.add_argument("--wrapper", default=HF.name, choices=list(WRAPPERS),
                    help="whose prompts, answer length and frame limits: " + "; ".join(
                        f"{w.name}: {w.source}" for w in WRAPPERS.values()) + f" (default {HF.name})")
    ap.add_argument("--scorer", default=DEFAULT_SCORER.name, choices=list(SCORERS),
                    help="whose exact matching: " + "; ".join(f"{s.name}: {s.description}" for s in SCORERS.values())
                         + f" (default {DEFAULT_SCORER.name}, behind the paper's tables)")
    ap.add_argument("--subtitles", action="store_true", help="Video-MME's with-subtitles setting")
    ap.add_argument("--score-only", metavar="FILE",
                    help="rescore FILE without a model: predictions.jsonl, a JSONL of {id, prediction}, or VLMEvalKit's "
                         "<model>_<dataset>.xlsx/.tsv/.csv (these two need --data for answers and options)")
    ap.add_argument("--show", metavar="ID", help="print item ID's prompt as the model receives it and exit (needs "
                                                 "--model for the tokenizer and format; loads no weights)")
    ap.add_argument("--save", metavar="FILE.npz", help="with --show: save its input_ids and pixel_values")
    ap.set_defaults(max_new_tokens=None, video_fps=None, max_frames=None)  # the wrapper's (or the set's) unless given
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    entry = CATALOG.get(_named(argv, "--benchmark") or DEFAULT_BENCHMARK)
    if isinstance(entry, OwnCommand):  # its own options (a grid, not a list of items), its own --help
        return entry.main(argv)
    args = parser().parse_args(argv)
    return run_main("lvita eval", _main, args, argv)


def _main(args, argv: list[str]) -> int:
    bench = lookup(args.benchmark)
    if isinstance(bench, OwnCommand):
        return bench.main(argv)
    if args.score_only is not None:
        _exclusive(args, "--score-only", ("show", "save", "model"))
        score_only(bench, args.score_only, args.out, arguments=argv, data=args.data, scorer=scorer_named(args.scorer))
        return 0
    if args.save is not None and args.show is None:
        raise UserError("--save goes with --show ID (the item whose ids and pixels to save)")
    if args.data is None:
        raise UserError("--data is required (the benchmark's files), except with --score-only on lvita's predictions")
    if args.model is None:
        raise UserError("--model is required (a model directory" + (": its tokenizer and format build the prompt)"
                                                                    if args.show else ")"))
    if not Path(args.data).exists():
        raise PathError(f"--data {args.data}: no such file or folder (the {bench.name} files)")
    wrapper = wrapper_named(args.wrapper)
    settings(args, bench, wrapper)
    opts = options(args)
    out = Path(args.out) if args.out else bench.default_out(args.data)
    load_opts = LoadOptions(work=out / "work", frames=args.max_frames, fps=args.video_fps, subtitles=args.subtitles)
    if args.show is not None:
        from lvita.evaluation.show import show_item

        return show_item(args, bench, load_opts, opts, wrapper)
    model, fmt, decode, rank = load_for_args(args, opts)
    if args.system_prompt is None:
        opts["system_prompt"] = bench.system_prompt(fmt, opts["system_prompt"])
    if args.sp > 1:
        decode_on_rank0(bench, args.data, load_opts, rank)
    evaluate_benchmark(model, fmt, bench, args.data, out, load_opts, dict(opts, decode=decode),
                       write=rank == 0, arguments=argv, wrapper=wrapper, scorer=scorer_named(args.scorer))
    return 0


def settings(args, bench: Benchmark, wrapper: Wrapper) -> None:
    """Answer length, frames and frame rate not given on the command line: the wrapper's for a published
    benchmark (Long-VITA's wrappers allow 1024 new tokens and 4096 frames at 1 fps), training's for a JSONL set."""
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError("--max-frames must be at least 1")
    if args.max_new_tokens is None:
        args.max_new_tokens = wrapper.max_new_tokens(bench) if bench.wrapped else bench.max_new_tokens
    if args.max_frames is None:
        args.max_frames = wrapper.max_frames if bench.wrapped else DEFAULTS.max_frames
    if args.video_fps is None:
        args.video_fps = wrapper.max_fps if bench.wrapped else DEFAULTS.video_fps


def decode_on_rank0(bench, data, load_opts: LoadOptions, rank: int) -> None:
    """Context-parallel (``--sp``): rank 0 reads the benchmark first (decoding its images into --out/work)
    while the other ranks wait, so that they find every file there and write nothing."""
    import torch.distributed as dist

    if rank == 0:
        for _ in bench.load(Path(data), load_opts):
            pass
    dist.barrier()


def _exclusive(args, given: str, others: tuple[str, ...]) -> None:
    for other in others:
        if getattr(args, other) is not None:
            raise UserError(f"{given} and --{other} do not go together")


def _named(argv: list[str], option: str) -> str | None:
    """The value of ``option`` in ``argv`` (``--x V`` or ``--x=V``), or None."""
    for i, a in enumerate(argv):
        if a == option and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(option + "="):
            return a.split("=", 1)[1]
    return None
