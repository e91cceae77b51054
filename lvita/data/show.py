"""``lvita data show``: one record exactly as the model will see it.

    lvita data show --stage FILE [--source NAME] (--id ID | --index I) [--save FILE.npz] [--set KEY=VALUE]...

Finds the record (``--id``: the first record whose ``id`` field is ID, in the named source or in
every source in stage order; ``--index``: the I-th record of the source, from 0, in file order),
plans it with the training planner (:mod:`lvita.data.plan`: schema, placeholders, tiling, the
``model.format``'s layout and system prompt, ``data.seq_length``) and decodes its media. Prints the
encoded text with runs of one special token collapsed (``<IMG_CONTEXT>x256``) and the trained spans
between ``⟦`` and ``⟧``, then the media and their tiles. ``--save`` writes an ``.npz`` with
``input_ids``, ``labels`` (aligned with input_ids as in transformers: the token where it is trained,
-100 elsewhere), ``position_ids`` (the record alone: 0..n-1) and ``pixel_values`` (float32,
normalised, (tiles, 3, T, T), tiles in token order). A record the planner skips, a missing id or an
index out of range is one ``error:`` line and exit status 2 (through ``lvita.cli``).

Trade-off: ``--id`` reads the source(s) record by record until it finds the id (no index is kept),
so finding a record near the end of a source of millions takes as long as ``lvita data check``
reading that far; ``--index`` on a JSON-lines source also walks the lines before it.
"""
from __future__ import annotations

import os
from pathlib import Path

from lvita.config.shipped import add_stage_arguments
from lvita.errors import PathError

IGNORE = -100  # lvita.data.template.IGNORE; this module stays light to import (the CLI's parser imports it)

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ trained ⟧


def add_arguments(p) -> None:
    add_stage_arguments(p)
    p.add_argument("--source", help="the source to read (default: every source, for --id)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="the record whose 'id' field is this")
    which.add_argument("--index", type=int, help="the record at this position of the source (from 0)")
    p.add_argument("--save", metavar="FILE.npz", help="write input_ids, labels, position_ids, pixel_values")


def _records(reader):
    for i, r in enumerate(reader.readers):
        end = len(r) if r.rows else os.path.getsize(r.path) + 1
        yield from reader.scan(i, 0, 0, end)


def find_record(cfg, source: str | None, record_id: str | None, index: int | None):
    """-> (Record, SourceReader) or a ConfigError naming what was asked and what exists."""
    from lvita.config.schema import ConfigError
    from lvita.data.sources import SourceReader

    d = cfg.data
    names = [s.name for s in d.sources]
    if source is not None and source not in names:
        raise ConfigError(f"--source {source}: no such source; the stage has {', '.join(names) or 'none'}")
    if index is not None and source is None:
        if len(names) != 1:
            raise ConfigError(f"--index needs --source: the stage has {len(names)} sources ({', '.join(names)})")
        source = names[0]
    if index is not None and index < 0:
        raise ConfigError(f"--index {index}: must be 0 or more")
    for s in d.sources:
        if source is not None and s.name != source:
            continue
        reader = SourceReader(s.name, d.root, s.paths, s.media_root, s.format)
        if index is not None and index >= reader.size:
            raise ConfigError(f"--index {index}: source '{s.name}' has {reader.size} records (0..{reader.size - 1})")
        for k, rec in enumerate(_records(reader)):
            if index is not None and k == index:
                return rec, reader
            if record_id is not None and isinstance(rec.raw, dict) and str(rec.raw.get("id")) == record_id:
                return rec, reader
    where = f"source '{source}'" if source else f"sources {', '.join(names)}"
    raise ConfigError(f"--id {record_id}: no record with that id in {where}")


def label_ids(targets: list[int]) -> list[int]:
    """lvita's shifted targets (position t predicts ``targets[t]``) -> labels aligned with the ids."""
    return [IGNORE] + list(targets[:-1])


def render(ids: list[int], labels: list[int], tok) -> str:
    """The encoded text: special-token runs collapsed (``<X>xN``), trained spans in ``⟦ ⟧``."""
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    out, k, trained = [], 0, False
    while k < len(ids):
        now = labels[k] != IGNORE
        if now != trained:
            out.append(OPEN if now else CLOSE)
            trained = now
        j = k + 1
        if ids[k] in special:
            while j < len(ids) and ids[j] == ids[k] and (labels[j] != IGNORE) == now:
                j += 1
            name = tok.convert_ids_to_tokens(ids[k])
            out.append(name if j - k == 1 else f"{name}x{j - k}")
        else:
            while j < len(ids) and ids[j] not in special and (labels[j] != IGNORE) == now:
                j += 1
            out.append(tok.decode(ids[k:j]))
        k = j
    if trained:
        out.append(CLOSE)
    return "".join(out)


def show(stage: str, sets: list[str], source: str | None, record_id: str | None, index: int | None,
         save: str | None) -> int:
    import numpy as np
    import torch

    from lvita.data.media import normalise
    from lvita.data.plan import Planner, describe
    from lvita.data.stage import open_stage
    from lvita.data.template import SampleError

    cfg, fmt = open_stage(stage, sets)
    tok, tile, tpt = fmt.tok, fmt.tile, fmt.tpt
    planner = Planner(cfg.data, fmt)
    rec, reader = find_record(cfg, source, record_id, index)
    try:
        plan = planner.plan(rec)
    except SampleError as e:
        raise SampleError(e.reason, f"record {record_id if index is None else index} ({rec.where}) is skipped in "
                                    f"training: {e.reason}: {e}") from None
    read_at = lambda s, c: reader.read(tuple(c))[0]  # noqa: E731
    tiles = [fmt.medium_tiles(m, planner.media_source(m.ref, read_at), cfg.data.min_tiles) for m in plan.media]
    pixels = normalise(torch.cat(tiles)) if tiles else torch.zeros(0, 3, tile, tile)
    ids, labels = plan.input_ids, label_ids(plan.targets)
    trained = sum(t != IGNORE for t in labels)
    print(f"record {plan.id} of source '{rec.source}' ({rec.where}); model.format {fmt.model_format}, {tpt} tokens per "
          f"{tile} px tile")
    print(f"{len(ids)} tokens ({plan.tokens} before truncation to data.seq_length={cfg.data.seq_length}), "
          f"{trained} trained (between {OPEN} and {CLOSE}), {pixels.shape[0]} tiles")
    for m in plan.media:
        print(f"  {describe(m, settings=True)}")
    print("---")
    print(render(ids, labels, tok))
    if save:
        out = Path(save)
        if out.parent and not out.parent.is_dir():
            raise PathError(f"--save {save}: directory {out.parent} does not exist")
        try:
            np.savez(out, input_ids=np.asarray(ids, np.int64), labels=np.asarray(labels, np.int64),
                     position_ids=np.arange(len(ids), dtype=np.int64), pixel_values=pixels.numpy().astype(np.float32))
        except OSError as e:
            raise PathError(f"--save {save}: cannot write it ({e.strerror or e})") from None
        print(f"--- saved {out}")
    return 0
