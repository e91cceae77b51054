"""V-NIAH, the video needle-in-a-haystack: can the model find one frame among thousands?

Owns ``lvita eval --benchmark vniah`` (LongVA's ``vision_niah/eval_vision_niah.py``, repository
``EvolvingLMMs-Lab/LongVA``, re-implemented on lvita's model, prompts and decoders)::

    lvita eval --benchmark vniah --model DIR --haystack movie.mp4 --needles v_niah_needles/ \\
        --haystack-frames 200:3000:200 --depths 0:100:20 --out runs/vniah
    deepspeed --num_gpus 8 --module lvita.evaluation.vniah --model DIR --haystack movie.mp4 \\
        --needles v_niah_needles/ --haystack-frames 200:3000:200 --depths 0:100:20 --sp 8 --out runs/vniah

For every frame count N of ``--haystack-frames`` (a list ``200,400`` or an inclusive range ``200:3000:200``),
depth d of ``--depths`` (percent, same syntax) and needle, the model sees the haystack's first N
frames at 1 fps with the needle image as one more frame at index ``floor(d * N / 100)`` (N + 1
frames), then the needle's question (:mod:`lvita.evaluation.vniah_data`: the needle-set layouts, the
haystack sampling, the prompt). ``--needles DIR``: lmms-lab/v_niah_needles as downloaded (its
parquet) or LongVA's ``dataset.json`` + ``images/``.

Scoring (``--scoring``; ``--mode`` is the context-parallel decoder's option):

- ``teacher`` (LongVA's): a cell is right when every answer position's argmax is the answer's token
  given the true answer before it. It runs as greedy decoding of ``len(answer tokens)`` tokens that
  must reproduce the answer tokens exactly: both demand, position by position, argmax = answer token
  with the same prefix before it (as long as every earlier token matched, greedy's prefix IS the
  answer's; at the first mismatch both say wrong), so the verdicts are equal, and the same code runs
  on one device (:func:`lvita.infer.decode.generate`) and context-parallel (``--sp``,
  :mod:`lvita.infer.cp_generate`). Numerically the cached decode and one full forward differ only by
  kernel rounding, which can flip only an exact near-tie; tests/test_vniah.py checks the verdicts
  against an explicit teacher-forced forward. An early end-of-turn token is wrong in both.
- ``generate``: a free greedy answer (``--max-new-tokens``, default 32), right when the normalised
  answer (lowercase, punctuation dropped, whitespace collapsed) occurs in it as whole words.

Outputs in ``--out`` (default ``vniah-<haystack name>``): ``cells.jsonl``, one line per finished
(frames, depth, needle) cell, appended as it finishes (a rerun skips the cells there; a torn last
line is redone); ``setup.json``, what the cells depend on (model, haystack, needles, scoring, system
prompt, context limit): a rerun with other values is refused rather than mixed; ``results.json``
(accuracy per frames x depth, the mean of the grid's cells as LongVA averages them, per needle,
every cell, skipped needles and cells counted by reason, the options and the exact command) and
``heatmap.png`` (:mod:`lvita.evaluation.vniah_heatmap`), both rewritten whole after each frame count.
Progress (cells done / total, s/cell, ETA) goes to stderr. With ``--sp`` only rank 0 writes and
prints; every rank reads cells.jsonl before the first collective, so all skip the same cells.

Trade-offs: one cell at a time (no batching, no prefix reuse across depths: the needle moves the
frames); every rank decodes the whole haystack once (uint8, 1.8 GB for 3000 448-px frames) and builds
each cell's N + 1 tiles, of which the context-parallel encoder uses its shard; ``--max-frames`` and
``--video-fps`` do not apply (the haystack is read at 1 fps as LongVA reads it).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import string
import sys
import time
from pathlib import Path

from lvita.evaluation import vniah_heatmap
from lvita.evaluation.vniah_data import (frames_with_needle, haystack_info, haystack_tiles, load_needles, needle_index,
                                    prompt_ids)
from lvita.ckpt.checkpoint import atomic_write
from lvita.evaluation.choice import can_infer_option
from lvita.evaluation.scorer import DEFAULT_SCORER
from lvita.evaluation.video_common import LETTERS
from lvita.data.media import uint8_tiles
from lvita.data.template import SampleError
from lvita.errors import UserError, run_main
from lvita.infer.decode import generate
from lvita.infer.generate import add_model_args, load_for_args, options
from lvita.infer.prompt import ContextError
from lvita.model.presets import llm_config

_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The V-NIAH options (next to :func:`lvita.infer.generate.add_model_args`')."""
    ap.add_argument("--haystack", required=True, help="the haystack video (read at 1 fps) or a folder of 1-fps frames")
    ap.add_argument("--needles", required=True,
                    help="lmms-lab/v_niah_needles as downloaded (parquet) or LongVA's dataset.json + images/")
    ap.add_argument("--haystack-frames", default="200:3000:200", metavar="COUNTS",
                    help="the grid's haystack lengths in 1-fps frames: 200,400,... or START:STOP:STEP (inclusive)")
    ap.add_argument("--depths", default="0:100:20", help="needle depths in percent: 0,50,100 or START:STOP:STEP")
    ap.add_argument("--scoring", choices=("teacher", "generate"), default="teacher",
                    help="teacher: LongVA's (every answer token the argmax); generate: free answer contains it")
    ap.add_argument("--out", help="results folder (default: vniah-<haystack name>); rerun to resume")


def parse_grid(text: str, what: str, integer: bool) -> list:
    """``"200,400"`` or ``"200:1000:200"`` (inclusive) -> sorted distinct numbers."""
    num = int if integer else float
    try:
        if ":" in text:
            start, stop, step = (num(x) for x in text.split(":"))
            if step <= 0:
                raise ValueError
            values = [start + k * step for k in range(int((stop - start) / step + 1e-9) + 1)]
        else:
            values = [num(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what} {text!r}: expected numbers like 0,50,100 or START:STOP:STEP") from None
    values = sorted({int(v) if float(v).is_integer() else round(v, 6) for v in values})
    low = 1 if what == "haystack-frames" else 0
    if not values or values[0] < low or (what == "depths" and values[-1] > 100):
        raise UserError(f"--{what} {text!r}: " + ("frame counts must be at least 1" if what == "haystack-frames"
                                                   else "depths are percents in 0..100"))
    return values


def normalised(text: str) -> str:
    return " ".join(str(text).lower().translate(_PUNCT).split())


def contains_answer(prediction: str, answer: str) -> bool:
    """``generate`` scoring. An option-letter answer ("B"; three of the five published needles) is matched by
    the evaluation package's one answer matcher (:func:`lvita.evaluation.choice.can_infer_option`, the pinned
    scorer's rules: a capital letter standing as a word, and only one option letter), so the article "a" does
    not read as option A; any other answer: the normalised answer occurs in the normalised prediction as whole
    words."""
    if len(answer) == 1 and answer.isalpha():
        letters = LETTERS[:max(4, LETTERS.index(answer.upper()) + 1)]  # LongVA's needles ask A-D
        return can_infer_option(str(prediction), letters, DEFAULT_SCORER) == answer.upper()
    a = normalised(answer)
    return bool(a) and f" {a} " in f" {normalised(prediction)} "


def cell_key(frames: int, depth, needle_id: str) -> str:
    return f"{frames}|{depth:g}|{needle_id}"


def read_cells(out: Path) -> dict[str, dict]:
    """Finished cells of an earlier run in ``out/cells.jsonl`` by key; a torn (unparsable) line is ignored."""
    done = {}
    path = out / "cells.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[cell_key(row["frames"], row["depth"], row["needle"])] = row
            except (ValueError, KeyError, TypeError):
                continue
    return done


def check_setup(out: Path, setup: dict, write: bool) -> None:
    """Refuse to resume a run made with other settings; record them for the first run."""
    path = out / "setup.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if differ := [k for k in sorted(set(old) | set(setup)) if old.get(k) != setup.get(k)]:
            raise UserError(f"--out {out}: its cells were made with " + ", ".join(
               f"{k}={old.get(k)!r} (this run: {setup.get(k)!r})" for k in differ) +
               f"; use another --out (or delete {out})")
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(setup, indent=1) + "\n")


def score_cell(model, fmt, decode, ids: list[int], pixels, needle, answer_ids: list[int], scoring: str,
               max_new_tokens: int, max_context: int | None, limit: int) -> dict:
    """One (frames, depth, needle) cell -> its row (``correct``, or ``skipped`` with a reason)."""
    need = len(answer_ids) if scoring == "teacher" else 1
    if len(ids) + need > limit:
        return {"skipped": "too_long", "detail": f"the prompt is {len(ids)} tokens + {need} to predict; the context "
                                                 f"limit is {limit} (--max-context)"}
    t0 = time.perf_counter()
    try:
        gen = decode(model, ids, pixels, fmt.specials, need if scoring == "teacher" else max_new_tokens, max_context)
    except ContextError as e:
        return {"skipped": "too_long", "detail": str(e)}
    text = fmt.tok.decode(gen.tokens, skip_special_tokens=False).strip()
    correct = gen.tokens == answer_ids if scoring == "teacher" else contains_answer(text, needle.answer)
    return {"correct": bool(correct), "prediction": text, "tokens": [int(t) for t in gen.tokens],
            "answer_tokens": answer_ids, "stop": gen.stop, "prompt_tokens": len(ids),
            "seconds": round(time.perf_counter() - t0, 3)}


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_grid(model, fmt, decode, needles: list, haystack, frames: list, depths: list,
             scoring: str = "teacher", system_prompt: str | None = None, max_new_tokens: int = 32,
             max_context: int | None = None, out: Path | None = None, done: dict | None = None,
             write: bool = True, on_frames=None, log=None) -> list[dict]:
    """Every (frames, depth, needle) cell -> rows in that order. Cells in ``done`` are taken as they are;
    the others are decoded and, with ``out`` and ``write``, appended to ``out/cells.jsonl`` one by one.
    ``haystack``: (>= max(frames), 3, T, T) uint8 tiles; ``on_frames(rows so far)`` after each frame count;
    ``fmt``: the model's input format (lvita.data.input_format)."""
    done = done or {}
    limit = max_context or llm_config(fmt.spec).max_position_embeddings
    needle_tiles = {n.id: uint8_tiles([fmt.frame_tile(n.image)]) for n in needles}
    answers = {n.id: fmt.tok.encode(n.answer, add_special_tokens=False) for n in needles}
    total = len(frames) * len(depths) * len(needles)
    todo = sum(cell_key(f, d, n.id) not in done for f in frames for d in depths for n in needles)
    rows, computed, t_start = [], 0, time.perf_counter()
    if out is not None and write:
        out.mkdir(parents=True, exist_ok=True)
    cells = open(out / "cells.jsonl", "a+") if out is not None and write else None
    if cells is not None and cells.tell() > 0:  # a torn last line (killed mid-write) must not swallow the next
        cells.seek(cells.tell() - 1)
        if cells.read(1) != "\n":
            cells.write("\n")
    try:
        for n_frames in frames:
            ids = {}
            for depth in depths:
                for needle in needles:
                    key = cell_key(n_frames, depth, needle.id)
                    if key in done:
                        rows.append(done[key])
                        continue
                    row = {"frames": n_frames, "depth": depth, "needle": needle.id, "name": needle.name,
                           "needle_index": needle_index(depth, n_frames), "answer": needle.answer}
                    if needle.id not in ids:
                        try:
                            ids[needle.id] = prompt_ids(needle.question, n_frames + 1, fmt, system_prompt)
                        except SampleError as e:
                            ids[needle.id] = e
                    if isinstance(ids[needle.id], SampleError):
                        row.update(skipped=ids[needle.id].reason, detail=str(ids[needle.id]))
                    else:
                        pixels = frames_with_needle(haystack, needle_tiles[needle.id], n_frames, depth)
                        row.update(score_cell(model, fmt, decode, ids[needle.id], pixels, needle,
                                              answers[needle.id], scoring, max_new_tokens, max_context, limit))
                    rows.append(row)
                    computed += 1
                    if cells is not None:
                        cells.write(json.dumps(row) + "\n")
                        cells.flush()
                        os.fsync(cells.fileno())
                    if log is not None:
                        rate = (time.perf_counter() - t_start) / computed
                        log(f"vniah: {total - todo + computed}/{total} cells, {rate:.2f} s/cell, "
                            f"ETA {_eta(rate * (todo - computed))}")
            if on_frames is not None:
                on_frames(rows)
    finally:
        if cells is not None:
            cells.close()
    return rows


def summarise(rows: list[dict], frames: list, depths: list, needles: list, skipped: list) -> dict:
    """Cell rows -> results: accuracy per (frames, depth), LongVA's mean over the grid, per needle, skips."""
    def acc(sel):
        scored = [r for r in sel if "correct" in r]
        right = sum(r["correct"] for r in scored)
        return {"accuracy": right / len(scored) if scored else None, "correct": right, "scored": len(scored)}

    grid = [{"frames": f, "depth": d, **acc([r for r in rows if r["frames"] == f and r["depth"] == d])}
            for f in frames for d in depths]
    filled = [g["accuracy"] for g in grid if g["accuracy"] is not None]
    by_needle = {n.id: {"name": n.name, "answer": n.answer, **acc([r for r in rows if r["needle"] == n.id])}
                 for n in needles}
    skips = [{"id": s.id, "reason": s.reason, "detail": s.detail, "what": "needle"} for s in skipped] + \
        [{"id": cell_key(r["frames"], r["depth"], r["needle"]), "reason": r["skipped"], "detail": r["detail"],
          "what": "cell"} for r in rows if "skipped" in r]
    reasons = {}
    for s in skips:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    return {"benchmark": "vniah", "frames": frames, "depths": depths,
            "accuracy": {str(f): {f"{g['depth']:g}": g["accuracy"] for g in grid if g["frames"] == f} for f in frames},
            "mean": sum(filled) / len(filled) if filled else None, "grid": grid, "needles": by_needle,
            "cells": rows, "skipped": {"total": len(skips), "by_reason": reasons, "items": skips}}


def write_results(out: Path, results: dict) -> None:
    """results.json and heatmap.png, each whole or not at all (the picture first: results.json names it)."""
    out.mkdir(parents=True, exist_ok=True)
    grid = {(g["frames"], g["depth"]): g["accuracy"] for g in results["grid"]}
    mean = results["mean"]
    title = f"V-NIAH ({results['options']['scoring']}): mean {'-' if mean is None else f'{mean:.3f}'}"
    png = vniah_heatmap.png_bytes(grid, results["frames"], results["depths"], title)
    tmp = out / f".heatmap.png.tmp{os.getpid()}"
    tmp.write_bytes(png)
    os.replace(tmp, out / "heatmap.png")
    atomic_write(out / "results.json", json.dumps(dict(results, heatmap="heatmap.png"), indent=1) + "\n")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lvita eval --benchmark vniah", description="Video needle-in-a-haystack.")
    add_model_args(ap)
    add_arguments(ap)
    ap.add_argument("--benchmark", choices=("vniah",), default="vniah", help=argparse.SUPPRESS)
    ap.set_defaults(max_new_tokens=32)
    return ap


def main(argv=None) -> int:
    """``lvita eval --benchmark vniah ...`` (``--benchmark vniah`` may be left in ``argv``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    return run_main("lvita eval --benchmark vniah", _main, args, argv)


def _main(args, argv: list[str]) -> int:
    rank0 = os.environ.get("RANK", "0") == "0"
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank0 else None
    frames = parse_grid(args.haystack_frames, "haystack-frames", integer=True)
    depths = parse_grid(args.depths, "depths", integer=False)
    opts = options(args)
    needles, skipped = load_needles(args.needles)
    if not needles:
        raise UserError(f"--needles {args.needles}: no usable needle ({'; '.join(s.detail for s in skipped)})")
    haystack_info(args.haystack, max(frames))  # before a long model load: is the haystack long enough?
    out = Path(args.out or f"vniah-{Path(args.haystack).stem}")
    done = read_cells(out)  # before the first collective: every rank skips the same cells
    model, fmt, decode, rank = load_for_args(args, opts)
    setup = {"model": str(Path(args.model).resolve()), "haystack": str(Path(args.haystack).resolve()),
             "needles": str(Path(args.needles).resolve()), "scoring": args.scoring,
             "system_prompt": opts["system_prompt"], "max_context": args.max_context,
             "format": fmt.model_format.name,
             "max_new_tokens": args.max_new_tokens if args.scoring == "generate" else None}
    check_setup(out, setup, rank == 0)
    haystack, about = haystack_tiles(args.haystack, max(frames), fmt)
    if log is not None:
        log(f"vniah: {len(needles)} needles, {len(frames)} frame counts x {len(depths)} depths, haystack "
            f"{about['frames_at_1fps']} frames at 1 fps; {len(done)} cells already in {out}/cells.jsonl")
    meta = {"options": {k: v for k, v in vars(args).items() if k != "local_rank"} | {"frames": frames, "depths": depths},
            "haystack": about, "setup": setup, "command": shlex.join(sys.argv), "argv": argv}

    def write(rows):
        if rank == 0:
            write_results(out, summarise(rows, frames, depths, needles, skipped) | meta)

    run_grid(model, fmt, decode or generate, needles, haystack, frames, depths, args.scoring,
             opts["system_prompt"], args.max_new_tokens, args.max_context, out, done, rank == 0, write, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
