"""VLMEvalKit's image benchmark TSVs, read as published: MMBench, MMStar, AI2D, MMMU, HallusionBench, OCRBench.

Owns turning one ``<NAME>.tsv`` (the file VLMEvalKit downloads into ``$LMUData``) into
:class:`lvita.evaluation.items.Item` s, and the :class:`lvita.evaluation.items.Benchmark` of each supported name
(:data:`BENCHMARKS`). Followed: ``vlmeval/dataset/image_base.py`` (``ImageBaseDataset.__init__``: rows
without an image are left out, a cell of at most 64 characters is the index of the row whose image it
reuses, ``toliststr`` reads a ``[...]`` cell as several images; ``dump_image``), ``vlmeval/smp/vlm.py``
(``decode_base64_to_image_file``: RGBA / P / LA become RGB, saved as PNG), ``image_mcq.py`` (options are the
non-empty single-letter columns; MMMU's ``<image k>`` placeholders), ``image_yorn.py`` and ``image_vqa.py``.
Columns: ``index, image, question, hint, A.., answer, category, l2-category, split`` (all but index,
image and question optional).

    lvita eval --model M --benchmark MMBench_DEV_EN --data LMUData/MMBench_DEV_EN.tsv [--out DIR]

Images are decoded once into ``<work>/images/<index>.png`` (``<index>_<i>.png`` for a list cell), written
via a temp file and a rename, and reused on a rerun. A bad row (no image, an image cell naming a missing
row, undecodable base64, no answer, a malformed placeholder or HallusionBench index) is a
:class:`lvita.evaluation.items.Skip` with the row's index, never fatal. Trade-off: the TSV is read whole with
pandas (as VLMEvalKit reads it, NaN rules included): MMBench's ~200 MB fits in memory easily.
"""
from __future__ import annotations

import ast
import base64
import binascii
import io
import os
import string
from functools import partial
from pathlib import Path
from typing import Iterator

from lvita.evaluation import prompts
from lvita.evaluation import vlmevalkit_score as scoring
from lvita.evaluation.items import Benchmark, Item, LoadOptions, Skip
from lvita.evaluation.wrappers import HF, Wrapper
from lvita.errors import PathError

REF_MAX_CHARS = 64  # ImageBaseDataset: an image cell this short is another row's index


def read_tsv(path: Path):
    """The TSV as VLMEvalKit's ``load`` reads it (pandas, tab-separated, NaN for empty cells)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise PathError(f"--data {path}: no such file (expected the benchmark's VLMEvalKit TSV)")
    try:
        df = pd.read_csv(path, sep="\t")
    except Exception as e:  # pandas' parser errors have no common base class
        raise PathError(f"--data {path}: cannot read it as a VLMEvalKit TSV ({e})") from None
    if missing := [c for c in ("index", "question") if c not in df.columns]:
        raise PathError(f"--data {path}: no column {missing[0]!r} (columns: {', '.join(map(str, df.columns))}); "
                        "expected VLMEvalKit's layout index, image, question, hint, A.., answer, category")
    return df


def is_blank(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def toliststr(cell: str) -> list[str]:
    """``vlmeval.smp.toliststr``: a ``[...]`` literal is a list of strings, anything else one string."""
    if cell.startswith("[") and cell.endswith("]"):
        return [str(x) for x in ast.literal_eval(cell)]
    return [cell]


def decode_image(b64: str, path: Path) -> Path:
    """``decode_base64_to_image_file``: base64 -> PIL -> RGB if RGBA/P/LA -> ``path`` (PNG); kept if there."""
    from PIL import Image

    if path.is_file() and path.stat().st_size > 0:
        return path
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=False)))
    if image.mode in ("RGBA", "P", "LA"):
        image = image.convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)  # a kill mid-write leaves no half image to be reused
    return path


def image_cells(cell: str, image_map: dict) -> list[str]:
    """The base64 images of one row (resolving a reused-image cell); raises ValueError / SyntaxError."""
    if len(cell) <= REF_MAX_CHARS:
        source = image_map.get(cell)
        if source is None or len(source) <= REF_MAX_CHARS:
            raise ValueError(f"its image cell {cell!r} names no row with an image")
        cell = source
    return toliststr(cell)


def row_images(index: str, cell: str, image_map: dict, work: Path) -> list[Path]:
    """The decoded image files of one row (resolving a reused-image cell); raises ValueError."""
    cells = image_cells(cell, image_map)
    names = [f"{index}.png"] if len(cells) == 1 else [f"{index}_{i}.png" for i in range(len(cells))]
    return [decode_image(c, work / "images" / n) for c, n in zip(cells, names)]


def text_cell(row: dict, key: str) -> str | None:
    value = row.get(key)
    return None if is_blank(value) else str(value)


def load_tsv(path: Path, opts: LoadOptions, kind: str, dataset: str) -> Iterator[Item | Skip]:
    """Items of a VLMEvalKit TSV in file order. ``kind``: "MCQ", "Y/N" or "VQA" (VLMEvalKit's DATASET_TYPE)."""
    df = read_tsv(path)
    rows = df.to_dict("records")
    indices = [str(r["index"]) for r in rows]
    has_image = "image" in df.columns
    image_map = {i: ("" if is_blank(r.get("image")) else str(r["image"])) for i, r in zip(indices, rows)} \
        if has_image else {}
    letters = [c for c in string.ascii_uppercase if c in df.columns]
    for index, row in zip(indices, rows):
        where = f"{path} row index {index}"
        if has_image and not image_map[index]:
            yield Skip(index, "no_image", f"{where}: empty image cell (VLMEvalKit leaves such rows out)")
            continue
        try:
            if not has_image:
                images = []
            elif opts.media:
                images = row_images(index, image_map[index], image_map, opts.work)
            else:  # rescoring: the count matters (MMMU's placeholders), not the pixels
                images = [Path(f"{index}_{i}.png") for i in range(len(image_cells(image_map[index], image_map)))]
        except (ValueError, SyntaxError, binascii.Error, OSError) as e:
            yield Skip(index, "bad_image", f"{where}: {e}")
            continue
        answer = text_cell(row, "answer")
        if answer is None:
            yield Skip(index, "no_answer", f"{where}: empty answer cell (a test split: score it on the "
                                           "leaderboard's server)")
            continue
        meta = {k: str(row[k]) for k in ("category", "l2-category", "split") if k in row and not is_blank(row[k])}
        choices = {c: str(row[c]) for c in letters if not is_blank(row.get(c))} if kind == "MCQ" else None
        item = Item(id=index, question=str(row["question"]), images=images, choices=choices or None,
                    answer=answer, hint=text_cell(row, "hint"), meta=meta)
        if kind == "VQA" and dataset == "OCRBench":
            try:
                item.answer = [str(a) for a in ast.literal_eval(answer)]
            except (ValueError, SyntaxError):
                item.answer = [answer]  # a bare string: itself the one acceptable answer
        if dataset.startswith("MMMU"):
            try:
                order = prompts.interleave_order(prompts.vlmevalkit_text(item), len(images))
            except IndexError as e:
                yield Skip(index, "bad_placeholder", f"{where}: {e}")
                continue
            if order is not None:
                item.images, item.meta["interleaved"] = [images[k] for k in order], True
        if dataset == "HallusionBench":
            parts = index.split("_")
            if len(parts) < 6:
                yield Skip(index, "bad_index", f"{where}: HallusionBench indices read <cat>_<subcat>_<x>_<set_id>_"
                                               "<figure_id>_<question_id>; fAcc/qAcc group by them")
                continue
            item.meta.update(set_id=parts[3], figure_id=parts[4], question_id=parts[5])
        yield item


def prompt(item: Item, fmt, wrapper: Wrapper = HF, *, dataset: str, kind: str) -> str:
    """The user's text as ``wrapper`` builds it (:func:`lvita.evaluation.prompts.image_prompt`)."""
    return prompts.image_prompt(item, fmt, dataset, kind, wrapper)


def benchmark(name: str, kind: str, score) -> Benchmark:
    return Benchmark(name=name, load=partial(load_tsv, kind=kind, dataset=name),
                     prompt=partial(prompt, dataset=name, kind=kind), score=score)


BENCHMARKS = {
    **{name: benchmark(name, "MCQ", scoring.circular_score)
       for name in ("MMBench_DEV_EN", "MMBench_DEV_CN", "MMBench_DEV_EN_V11", "MMBench_DEV_CN_V11")},
    "MMStar": benchmark("MMStar", "MCQ", scoring.mcq_score),
    "AI2D_TEST": benchmark("AI2D_TEST", "MCQ", scoring.mcq_score),
    "MMMU_DEV_VAL": benchmark("MMMU_DEV_VAL", "MCQ", scoring.mmmu_score),
    "HallusionBench": benchmark("HallusionBench", "Y/N", scoring.hallusion_score),
    "OCRBench": benchmark("OCRBench", "VQA", scoring.ocrbench_score),
}
