"""``lvita eval --show ID [--save FILE.npz]``: what the model is asked, for one benchmark item.

Owns printing one item's prompt exactly as :func:`lvita.evaluation.run.evaluate_benchmark` would encode it
(the benchmark's prompt, the system prompt rule of the run, :func:`lvita.infer.prompt.build_prompt` in the
model's input format) without loading any weights: only the model directory's config (or manifest) and
tokenizer are read. The text is printed as ``lvita data show`` prints a training record (runs of one special
token collapsed: ``<IMG_CONTEXT>x256``), followed by the answer and options the scorer will use; ``--save``
writes ``input_ids`` and ``pixel_values`` (float32, normalised, placeholder order) to an .npz.

Trade-off: the benchmark's items are read in file order up to the one asked for (media of earlier items are
not decoded, but an image TSV's earlier rows are decoded into --out/work as a run would).
"""
from __future__ import annotations

from pathlib import Path

from lvita.data.plan import describe
from lvita.data.show import IGNORE, render
from lvita.errors import PathError, UserError
from lvita.evaluation.items import Benchmark, Item, LoadOptions
from lvita.infer.generate import load_input_format, model_system_prompt
from lvita.infer.prompt import build_prompt


def show_item(args, bench: Benchmark, load_opts: LoadOptions, opts: dict, wrapper, log=print) -> int:
    fmt, _ = load_input_format(args.model, args.tokenizer)
    system_prompt = opts["system_prompt"]
    if args.system_prompt is None:
        system_prompt = bench.system_prompt(fmt, model_system_prompt(args.model, fmt.tok))
    item = find_item(bench, Path(args.data), load_opts, args.show)
    asked = bench.prompt(item, fmt, wrapper)
    messages = asked if isinstance(asked, list) else [{"role": "user", "content": asked}]
    p = build_prompt(messages, fmt, item.images, item.videos, system_prompt, opts["media"], opts["max_context"])
    log(f"{bench.name} item {item.id}; model.format {fmt.model_format}; "
        + (f"wrapper {wrapper}; " if bench.wrapped else "") + "system prompt "
        f"{'none' if system_prompt is None else repr(system_prompt)}")
    log(f"{len(p.input_ids)} tokens, {p.pixel_values.shape[0]} tiles; answer at most {opts['max_new_tokens']} new tokens")
    for m in p.media:
        log(f"  {describe(m, settings=True)}")
    log("---")
    log(render(p.input_ids, [IGNORE] * len(p.input_ids), fmt.tok))
    log("---")
    log(f"answer: {item.answer!r}" + (f"; options: {item.choices}" if item.choices else ""))
    if args.save:
        save(Path(args.save), p)
        log(f"--- saved {args.save}")
    return 0


def save(out: Path, p) -> None:
    import numpy as np

    if not out.parent.is_dir():
        raise PathError(f"--save {out}: directory {out.parent} does not exist")
    try:
        np.savez(out, input_ids=np.asarray(p.input_ids, np.int64), pixel_values=p.pixel_values.numpy().astype(np.float32))
    except OSError as e:
        raise PathError(f"--save {out}: cannot write it ({e.strerror or e})") from None


def find_item(bench: Benchmark, data: Path, load_opts: LoadOptions, item_id: str) -> Item:
    """The item ``item_id`` of the benchmark (UserError naming a few ids when absent, or why it is skipped)."""
    ids = []
    for entry in bench.load(data, load_opts):
        if entry.id == item_id:
            if not isinstance(entry, Item):
                raise UserError(f"--show {item_id}: the item is skipped ({entry.reason}): {entry.detail}")
            return entry
        ids.append(entry.id)
    raise UserError(f"--show {item_id}: no such item in {data} (ids: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''})")
