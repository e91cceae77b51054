"""The ``lvita`` command: ``demo``, ``check``, ``train``, ``data``, ``ckpt``, ``convert``, ``generate``, ``eval``.

    lvita demo [--out DIR] [--nproc N] [--data-only]
    lvita check --stage FILE --world-size N [--set KEY=VALUE]... [--strict] [--gpu-memory GB] [--suggest]
    lvita train --stage FILE [--set KEY=VALUE]...        (one process; use the deepspeed launcher for more)
    lvita data preview --stage FILE [--n N] [--json]     the first packed sequences, sample by sample
    lvita data stats --stage FILE [--n N]                packing efficiency, speed, source shares
    lvita data check --stage FILE [--source NAME] [--workers N] [--decode] [--json]   every record, before a run
    lvita data show --stage FILE [--source NAME] (--id ID | --index I) [--save FILE.npz]   one record as encoded
    lvita ckpt to-universal DIR                          DeepSpeed universal copy (to resume at another layout)
    lvita convert to-hf CKPT OUT [--tokenizer DIR]       transformers InternVL directory
    lvita convert from-hf SRC [SRC2] OUT --preset NAME   weights-only lvita checkpoint from HF directories
    lvita generate --model DIR --prompt TEXT [--image PATH]...   greedy answer (python -m lvita.generate)
    lvita eval --model DIR --data FILE.jsonl                     accuracy on a set (python -m lvita.eval)
    lvita eval --model DIR --benchmark NAME --data PATH          a published benchmark, scored as VLMEvalKit
    lvita eval --benchmark NAME --score-only FILE [--data PATH]  rescore predictions (lvita's or VLMEvalKit's)
"""
from __future__ import annotations

import argparse
import sys

from lvita.errors import run_main


def main(argv=None) -> int:
    from lvita.model.formats import FORMAT_NAMES

    ap = argparse.ArgumentParser(prog="lvita", description="Long-VITA training with DeepSpeed, stage by stage.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train the four demo stages on a tiny model (CPU is fine)")
    d.add_argument("--out", default="demo_out", help="where tokenizer, data, logs and checkpoints go")
    d.add_argument("--nproc", type=int, default=2, help="processes for the deepspeed launcher")
    d.add_argument("--data-only", action="store_true", help="only make the tokenizer and data")
    c = sub.add_parser("check", help="validate a stage file for a world size, without allocating")
    c.add_argument("--stage", required=True)
    c.add_argument("--world-size", type=int, required=True)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--strict", action="store_true", help="also fail on paths that do not exist")
    c.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="GPU memory for the plan (80)")
    c.add_argument("--suggest", action="store_true", help="list layouts and memory levers that fit")
    t = sub.add_parser("train", help="train one stage in this process (python -m lvita.train)")
    t.add_argument("--stage", required=True)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    dt = sub.add_parser("data", help="inspect a stage's packed data (no training)")
    dsub = dt.add_subparsers(dest="data_cmd", required=True)
    for name, n, text in (("preview", 4, "print the first packed sequences"),
                          ("stats", 64, "packing efficiency, speed and source shares")):
        x = dsub.add_parser(name, help=text)
        x.add_argument("--stage", required=True)
        x.add_argument("--n", type=int, default=n, help="packed sequences")
        x.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        if name == "preview":
            x.add_argument("--json", action="store_true", help="one JSON object per sequence")
    ch = dsub.add_parser("check", help="read every record of every source: usable, skipped by reason, lengths")
    ch.add_argument("--stage", required=True)
    ch.add_argument("--source", help="only this source (whatever its ratio)")
    ch.add_argument("--workers", type=int, default=1, help="processes scanning in parallel")
    ch.add_argument("--decode", action="store_true", help="also decode every image and video")
    ch.add_argument("--json", action="store_true", help="one JSON object with every source's figures")
    ch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    from lvita.data.show import add_arguments as show_arguments
    show_arguments(dsub.add_parser("show", help="one record as the model sees it (ids, labels, tiles; --save FILE.npz)"))
    ck = sub.add_parser("ckpt", help="checkpoint tools")
    cksub = ck.add_subparsers(dest="ckpt_cmd", required=True)
    cu = cksub.add_parser("to-universal", help="convert a checkpoint for another parallel layout (cached beside it)")
    cu.add_argument("dir", help="an output_dir, its checkpoints/ (newest) or one global_step<N>")
    cv = sub.add_parser("convert", help="weights to and from Hugging Face")
    cvsub = cv.add_subparsers(dest="convert_cmd", required=True)
    th = cvsub.add_parser("to-hf", help="write the released Long-VITA layout or a transformers InternVL directory")
    th.add_argument("ckpt", help="an output_dir, its checkpoints/ (newest) or one global_step<N>")
    th.add_argument("out")
    th.add_argument("--layout", choices=FORMAT_NAMES,
                    help="longvita: the released layout (LongVITAForCausalLM); internvl: transformers' "
                         "InternVLForConditionalGeneration (default: the checkpoint's model.format)")
    th.add_argument("--tokenizer", help="default: the tokenizer the run trained with (from its manifest)")
    fh = cvsub.add_parser("from-hf", help="a released Long-VITA or InternVL dir, or an InternViT dir and a Qwen2 dir "
                                          "-> lvita weights")
    fh.add_argument("paths", nargs="+", metavar="SRC [SRC2] OUT")
    fh.add_argument("--preset", help="model.preset the weights are for (e.g. longvita-14b); default: the shapes in "
                                     "the source's config.json (needed for an InternViT + Qwen2 pair)")
    fh.add_argument("--format", choices=FORMAT_NAMES, help="model.format (default: the preset's own)")
    fh.add_argument("--tokenizer", help="default: the tokenizer in the HF directory")
    for name, text in (("generate", "greedy answer from a model (see python -m lvita.generate --help)"),
                       ("eval", "a JSONL set or a published benchmark, answered and scored as VLMEvalKit scores it; "
                                "--score-only, --show (lvita eval --help lists the catalog)")):
        sub.add_parser(name, help=text)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "generate":  # their own parsers, shared with python -m
        from lvita.infer.generate import main as generate

        return generate(argv[1:])
    if argv and argv[0] == "eval":
        from lvita.eval import main as evaluate  # JSONL sets, or --benchmark NAME (lvita.evaluation)

        return evaluate(argv[1:])
    args = ap.parse_args(argv)
    what = " ".join(x for x in (args.cmd, getattr(args, "data_cmd", None)) if x)
    return run_main(f"lvita {what}", _run, args)  # bad input (a UserError): one line, exit 2


def _run(args) -> int:
    if args.cmd in ("ckpt", "convert"):
        from lvita.ckpt.convert import main as convert

        return convert(args)
    if args.cmd == "data":
        from lvita.data import inspect

        if args.data_cmd == "preview":
            return inspect.preview(args.stage, args.set, args.n, args.json)
        if args.data_cmd == "show":
            from lvita.data.show import show

            return show(args.stage, args.set, args.source, args.id, args.index, args.save)
        if args.data_cmd == "check":
            from lvita.data.check import check

            return check(args.stage, args.set, args.source, args.workers, args.decode, args.json)
        return inspect.stats(args.stage, args.set, args.n)
    if args.cmd == "demo":
        from lvita.demo.run import main as demo

        return demo(args.out, args.nproc, args.data_only)
    if args.cmd == "check":
        from lvita.config.check import main as check

        return check(args.stage, args.world_size, args.set, args.strict, args.gpu_memory, args.suggest)
    from lvita.training.loop import main as train

    return train(["--stage", args.stage] + sum((["--set", s] for s in args.set), []))


if __name__ == "__main__":
    sys.exit(main())
