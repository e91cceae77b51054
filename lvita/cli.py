"""The ``lvita`` command: one parser per subcommand, every option with its help.

    lvita demo [--out DIR] [--world-size N] [--stages N] [--set KEY=VALUE]...   the tiny five-stage run (CPU)
    lvita stages [copy NAME [DEST]]                      the shipped stage files by name; copy one out to edit
    lvita check --stage FILE|NAME --world-size N [--set KEY=VALUE]... [--strict] [--gpu-memory GB] [--suggest]
    lvita train --stage FILE|NAME [--set KEY=VALUE]...   one process (deepspeed --module lvita.train for more)
    lvita data preview|stats|check|show --stage FILE|NAME ...   the packed data, without training
    lvita ckpt to-universal DIR                          DeepSpeed universal copy (to resume at another layout)
    lvita convert to-hf CKPT OUT [--format F] [--tokenizer DIR]   the released Long-VITA or an InternVL directory
    lvita convert to-hf CKPT OUT --adapter-only|--base-only      a LoRA run's PEFT adapter files / their base model
    lvita convert from-hf SRC [SRC2] OUT [--preset NAME] [--format F]   lvita weights from HF directories
    lvita generate --model DIR --prompt TEXT [--image PATH]...   greedy answer (python -m lvita.generate)
    lvita eval --model DIR [--benchmark NAME] --data PATH        a JSONL set or a published benchmark
    lvita eval --benchmark NAME --score-only FILE [--data PATH]  rescore predictions (lvita's or VLMEvalKit's)

``lvita SUBCOMMAND --help`` explains every option. Bad input ends in one ``error:`` line and exit 2.
"""
from __future__ import annotations

import argparse
import sys

from lvita.errors import UserError, run_main

OWN_PARSERS = ("generate", "eval")  # their own parsers (shared with python -m lvita.generate / lvita.eval)


def parser() -> argparse.ArgumentParser:
    """Every subcommand but generate and eval (:data:`OWN_PARSERS`, whose parsers their modules build)."""
    from lvita.config.shipped import add_stage_arguments
    from lvita.data.show import add_arguments as show_arguments
    from lvita.model.formats import FORMAT_NAMES

    synopsis = __doc__.split("\n\n")[1]
    ap = argparse.ArgumentParser(prog="lvita", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Long-VITA trained stage by stage with DeepSpeed.\n\n" + synopsis)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    d = sub.add_parser("demo", help="train the five demo stages on a tiny model: the curriculum's four, then LoRA (CPU is fine, no downloads)")
    d.add_argument("--out", default="demo_out", help="where tokenizer, data, logs and checkpoints go (demo_out)")
    d.add_argument("--world-size", type=int, default=2, metavar="N",
                   help="processes the deepspeed launcher starts, one per GPU or CPU process (2)")
    d.add_argument("--stages", type=int, metavar="N", help="run only the first N stages (default: all four)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a stage key in every stage, e.g. train.iterations=5; repeat for several")
    d.add_argument("--data-only", action="store_true", help="only make the tokenizer and data")
    st = sub.add_parser("stages", help="list the shipped stage files and DeepSpeed configs; copy a stage out to edit")
    st.add_argument("action", nargs="?", default="list", help="list (the default) or copy NAME [DEST]")
    st.add_argument("name", nargs="?", help="with copy: the shipped stage, e.g. longvita-14b/2_general")
    st.add_argument("dest", nargs="?", help="with copy: a file or an existing directory (default: ./<name>.json)")
    c = sub.add_parser("check", help="validate a stage file for a world size and plan its memory, without allocating")
    add_stage_arguments(c)
    c.add_argument("--world-size", type=int, required=True, metavar="N",
                   help="the processes (GPUs) the run will use: pipeline x ulysses x ring x data")
    c.add_argument("--strict", action="store_true",
                   help="also fail on paths that do not exist and model.init_from without weights")
    c.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="GPU memory for the plan (80)")
    c.add_argument("--suggest", action="store_true", help="list layouts and memory levers that fit")
    t = sub.add_parser("train", help="train one stage in this process (python -m lvita.train)")
    add_stage_arguments(t)
    dt = sub.add_parser("data", help="inspect a stage's packed data (no training)")
    dsub = dt.add_subparsers(dest="data_cmd", required=True, metavar="ACTION")
    for name, n, text in (("preview", 4, "print the first packed sequences"),
                          ("stats", 64, "packing efficiency, speed and source shares")):
        x = dsub.add_parser(name, help=text)
        add_stage_arguments(x)
        x.add_argument("--n", type=int, default=n, metavar="N", help=f"packed sequences ({n})")
        if name == "preview":
            x.add_argument("--json", action="store_true", help="one JSON object per sequence")
    ch = dsub.add_parser("check", help="read every record of every source: usable, skipped by reason, lengths")
    add_stage_arguments(ch)
    ch.add_argument("--source", help="only this source (whatever its ratio)")
    ch.add_argument("--workers", type=int, default=1, metavar="N", help="processes scanning in parallel (1)")
    ch.add_argument("--decode", action="store_true", help="also decode every image and video")
    ch.add_argument("--json", action="store_true", help="one JSON object with every source's figures")
    show_arguments(dsub.add_parser("show", help="one record as the model sees it (ids, labels, tiles; --save FILE.npz)"))
    ck = sub.add_parser("ckpt", help="checkpoint tools")
    cksub = ck.add_subparsers(dest="ckpt_cmd", required=True, metavar="ACTION")
    cu = cksub.add_parser("to-universal", help="convert a checkpoint for another parallel layout (cached beside it)")
    cu.add_argument("dir", help="an output_dir, its checkpoints/ (newest) or one global_step<N>")
    cv = sub.add_parser("convert", help="weights to and from Hugging Face")
    cvsub = cv.add_subparsers(dest="convert_cmd", required=True, metavar="ACTION")
    fmt_help = ("the model format: longvita, the released Long-VITA layout (LongVITAForCausalLM); internvl, "
                "transformers' InternVLForConditionalGeneration")
    th = cvsub.add_parser("to-hf", help="write the released Long-VITA layout or a transformers InternVL directory")
    th.add_argument("ckpt", help="an output_dir, its checkpoints/ (newest) or one global_step<N>")
    th.add_argument("out", help="the directory to write (must not exist)")
    th.add_argument("--format", choices=FORMAT_NAMES, help=fmt_help + " (default: the checkpoint's model.format)")
    th.add_argument("--tokenizer", help="default: the tokenizer the run trained with (from its manifest)")
    th.add_argument("--adapter-only", action="store_true",
                    help="a LoRA checkpoint's adapters as PEFT files (adapter_config.json, adapter_model.safetensors; "
                         "modules trained whole as modules_to_save) for PeftModel.from_pretrained on the --base-only "
                         "export; default: the model with the adapters merged")
    th.add_argument("--base-only", action="store_true",
                    help="a LoRA checkpoint without its adapters (the base weights, trained modules as trained): "
                         "the model --adapter-only's files apply to")
    fh = cvsub.add_parser("from-hf", help="a released Long-VITA or InternVL dir, or an InternViT dir and a Qwen2 dir "
                                          "-> lvita weights")
    fh.add_argument("paths", nargs="+", metavar="SRC [SRC2] OUT",
                    help="one HF model directory (or an InternViT and a Qwen2 directory), then the output_dir to write")
    fh.add_argument("--preset", help="model.preset the weights are for (e.g. longvita-14b); default: the shapes in "
                                     "the source's config.json (needed for an InternViT + Qwen2 pair)")
    fh.add_argument("--format", choices=FORMAT_NAMES, help=fmt_help + " (default: the preset's own)")
    fh.add_argument("--tokenizer", help="default: the tokenizer in the HF directory")
    for name, text in (("generate", "greedy answer from a model (lvita generate --help)"),
                       ("eval", "a JSONL set or a published benchmark, answered and scored as VLMEvalKit scores it; "
                                "--score-only, --show (lvita eval --help lists the catalog)")):
        sub.add_parser(name, help=text, add_help=False)
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "generate":
        from lvita.infer.generate import main as generate

        return generate(argv[1:])
    if argv and argv[0] == "eval":
        from lvita.eval import main as evaluate  # JSONL sets, or --benchmark NAME (lvita.evaluation)

        return evaluate(argv[1:])
    args = parser().parse_args(argv)
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

        return demo(args.out, args.world_size, args.data_only, args.stages, args.set)
    if args.cmd == "stages":
        from lvita.config import shipped

        if args.action not in ("list", "copy"):
            raise UserError(f"lvita stages {args.action}: list or copy; did you mean `lvita stages copy {args.action}`?")
        if args.action == "list":
            if args.name is not None:
                raise UserError(f"lvita stages list {args.name}: list takes no name; did you mean "
                                f"`lvita stages copy {args.name}`?")
            print(shipped.listing())
            return 0
        if args.name is None:
            raise UserError("lvita stages copy NAME [DEST]: name the shipped stage (`lvita stages` lists them)")
        print(f"wrote {shipped.copy_out(args.name, args.dest)}")
        return 0
    if args.cmd == "check":
        from lvita.config.check import main as check

        return check(args.stage, args.world_size, args.set, args.strict, args.gpu_memory, args.suggest)
    from lvita.training.loop import main as train

    return train(["--stage", args.stage] + sum((["--set", s] for s in args.set), []))


if __name__ == "__main__":
    sys.exit(main())
