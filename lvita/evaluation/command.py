"""``lvita eval --benchmark NAME --data PATH`` and ``lvita eval --benchmark NAME --score-only PREDICTIONS``.

Owns the command line of published benchmarks: the model options are ``lvita generate``'s
(:func:`lvita.infer.generate.add_model_args`), plus ``--benchmark`` (a name of
:mod:`lvita.evaluation.catalog`), ``--data`` (the benchmark's file or folder), ``--frames N`` (most frames per
video, at about ``--video-fps``), ``--subtitles``, ``--out`` (default ``<data dir>/<NAME>-eval``) and
``--max-new-tokens`` (default: the benchmark's own). ``--score-only`` rescores a predictions.jsonl
without loading a model. The entry point :mod:`lvita.eval` sends an ``lvita eval`` with either option
here and any other to :mod:`lvita.infer.eval` (lvita's JSONL sets), so lvita.infer never imports the
benchmarks above it.

    lvita eval --model hf/Long-VITA-128K_HF --benchmark MMBench_DEV_EN_V11 --data LMUData/MMBench_DEV_EN_V11.tsv
    lvita eval --benchmark MMBench_DEV_EN_V11 --score-only LMUData/MMBench_DEV_EN_V11-eval/predictions.jsonl
    deepspeed --num_gpus 8 --module lvita.eval --model M --benchmark Video-MME --data DIR --frames 1024 --sp 8
    lvita eval --model M --benchmark vniah --haystack movie.mp4 --needles v_niah_needles   # lvita.evaluation.vniah

Bad input (unknown or judge-only benchmark, missing --data, a bad option) exits 2 with one line naming
it, before the model loads. Trade-off: a benchmark file that is unreadable is found only after the model
is loaded (loaders are generic); that costs the load time once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lvita.evaluation.catalog import lookup
from lvita.evaluation.items import LoadOptions
from lvita.evaluation.run import evaluate_benchmark, score_only
from lvita.errors import PathError, UserError, run_main
from lvita.infer.generate import add_model_args, load_for_args, options


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lvita eval --benchmark",
                                 description="A Long-VITA model on a published benchmark, scored as its leaderboard.")
    add_model_args(ap)
    ap.add_argument("--benchmark", required=True, metavar="NAME",
                    help="e.g. MMBench_DEV_EN_V11, MMStar, MMMU_DEV_VAL, HallusionBench, AI2D_TEST, OCRBench")
    ap.add_argument("--data", required=True, help="the benchmark's file (a VLMEvalKit TSV) or folder")
    ap.add_argument("--out", help="default: <data dir>/<NAME>-eval")
    ap.add_argument("--frames", type=int, default=64, help="most frames per video, at about --video-fps (64-4096)")
    ap.add_argument("--subtitles", action="store_true", help="Video-MME's with-subtitles setting")
    ap.set_defaults(max_new_tokens=None)  # the benchmark's own answer length unless given
    return ap


def decode_on_rank0(bench, data, load_opts: LoadOptions, rank: int) -> None:
    """Context-parallel (``--sp``): rank 0 reads the benchmark first (decoding its images into --out/work)
    while the other ranks wait, so that they find every file there and write nothing."""
    import torch.distributed as dist

    if rank == 0:
        for _ in bench.load(Path(data), load_opts):
            pass
    dist.barrier()


def rescore(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lvita eval --score-only", description="Rescore a predictions.jsonl.")
    ap.add_argument("--score-only", required=True, metavar="PREDICTIONS")
    ap.add_argument("--benchmark", required=True, metavar="NAME")
    ap.add_argument("--out", help="default: beside PREDICTIONS")
    args, _ = ap.parse_known_args(argv)  # the run's model options may be repeated; they do not matter here
    return run_main("lvita eval", _rescore, args, argv)


def _rescore(args, argv: list[str]) -> int:
    score_only(lookup(args.benchmark), args.score_only, args.out, arguments=argv)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--score-only" or a.startswith("--score-only=") for a in argv):
        return rescore(argv)
    if _named(argv, "--benchmark") == "vniah":  # a grid of frame counts x depths, not a list of items
        from lvita.evaluation.vniah import main as vniah

        return vniah(argv)
    args = parser().parse_args(argv)
    return run_main("lvita eval", _main, args, argv)


def _main(args, argv: list[str]) -> int:
    bench = lookup(args.benchmark)
    if not Path(args.data).exists():
        raise PathError(f"--data {args.data}: no such file or folder (the {bench.name} files)")
    if args.frames < 1:
        raise UserError("--frames must be at least 1")
    if args.max_new_tokens is None:
        args.max_new_tokens = bench.max_new_tokens
    args.max_frames = args.frames
    opts = options(args)
    model, fmt, decode, rank = load_for_args(args, opts)
    if not fmt.model_format.default_system_prompt and args.system_prompt is None:
        opts["system_prompt"] = None  # Long-VITA's VLMEvalKit wrapper sends no system prompt
    out = Path(args.out) if args.out else Path(args.data).parent / f"{bench.name}-eval"
    load_opts = LoadOptions(work=out / "work", frames=args.frames, fps=args.video_fps, subtitles=args.subtitles)
    if args.sp > 1:
        decode_on_rank0(bench, args.data, load_opts, rank)
    evaluate_benchmark(model, fmt, bench, args.data, out, load_opts, dict(opts, decode=decode),
                       write=rank == 0, arguments=argv)
    return 0


def _named(argv: list[str], option: str) -> str | None:
    """The value of ``option`` in ``argv`` (``--x V`` or ``--x=V``), or None."""
    for i, a in enumerate(argv):
        if a == option and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(option + "="):
            return a.split("=", 1)[1]
    return None


def wants_benchmark(argv: list[str]) -> bool:
    """Whether an ``lvita eval`` command line is for this module (``--benchmark`` or ``--score-only``)."""
    return any(a.split("=")[0] in ("--benchmark", "--score-only") for a in argv)
