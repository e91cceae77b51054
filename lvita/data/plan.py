"""Planning one record: schema -> conversation -> media references -> token ids, targets, tile counts.

Owns the per-record decision every rank makes identically (and ``lvita data check`` makes for
every record): normalise the record's schema (:mod:`lvita.data.formats`), match placeholders to
media, resolve each medium to a path (relative to the source's media root, or absolute), a frame
directory, or an embedded ``{"bytes", "path"}`` entry, read headers only (image size, video frame
count), choose tiles per image, and encode the ChatML conversation.

    planner = Planner(cfg.data, tok, specials, tile=448, tokens_per_tile=256)
    plan = planner.plan(record)                 # SamplePlan, or raises SampleError / MediaError
    src = planner.media_source(plan.media[0][1], mixture.read_at)   # path or BytesIO, for decoding

Embedded media are never kept in a plan: the plan holds an ``Embedded`` reference (source, record
cursor, kind, index) and the decoding thread reads the bytes again from the record, so a packer
buffer of hundreds of samples stays a few token lists and the resume state stays cursors.
Trade-off: an embedded image is read twice (planning reads its header, decoding its pixels).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

from lvita.config.schema import DataConfig
from lvita.data.formats import normalise, resolve_placeholders
from lvita.data import longvita
from lvita.data.media import MediaError, image_size, tile_count, tile_grid, video_frame_count
from lvita.data.packer import SamplePlan
from lvita.data.sources import Record
from lvita.data.template import IGNORE, PLACEHOLDER, SampleError, encode_conversation


class Embedded(NamedTuple):
    """Media bytes stored inside a record (parquet/arrow Image feature): found again by cursor."""
    source: str
    cursor: tuple
    kind: str  # "images" | "videos"
    index: int

    def __str__(self) -> str:
        return f"{self.source}@{list(self.cursor)}/{self.kind}[{self.index}]"


def media_name(ref) -> str:
    return str(ref).rsplit("/", 1)[-1] if not isinstance(ref, Embedded) else str(ref)


def _ref(entry, kind: str, k: int, record: Record):
    what = f"{kind[:-1]} {k}"
    if isinstance(entry, dict):
        data = entry.get("bytes")
        if isinstance(data, (bytes, bytearray)) and data:
            return Embedded(record.source, tuple(record.cursor), kind, k)
        entry = entry.get("path")
        if not isinstance(entry, str) or not entry:
            raise MediaError(f"{what}: an embedded entry with neither bytes nor a path")
    if not isinstance(entry, str) or not entry:
        raise MediaError(f"{what}: unknown media form {type(entry).__name__} ({str(entry)[:40]!r}); expected a path "
                         f"or {{'bytes', 'path'}}")
    if "://" in entry:
        raise MediaError(f"{what}: {entry} is a URL; download the media and give local paths "
                         f"(data.sources[].media_root)")
    return entry if Path(entry).is_absolute() else str(record.base / entry)


def _bytes_of(sample, ref: Embedded) -> io.BytesIO:
    return io.BytesIO(getattr(sample, ref.kind)[ref.index]["bytes"])


class Planner:
    """``fmt``: the model format (``model.format``): "internvl" (one ``<img>`` run per image, grid
    then thumbnail, ``data.max_tiles`` shared out between a sample's images) or "longvita" (the
    released layout, :mod:`lvita.data.longvita`: every image up to ``data.max_tiles``)."""

    def __init__(self, data: DataConfig, tokenizer, specials: dict, tile: int, tokens_per_tile: int,
                 fmt: str = "internvl"):
        self.cfg, self.tok, self.specials, self.tile, self.tpt = data, tokenizer, specials, tile, tokens_per_tile
        self.fmt = fmt
        self.newline = tokenizer("\n", add_special_tokens=False)["input_ids"] if fmt == "longvita" else []

    def _image_tokens(self, media: list[tuple], sizes: dict) -> int:
        """Tokens the images of ``media`` take in the sequence (markers, context runs, row newlines)."""
        if self.fmt != "longvita":
            return sum(self.tpt * m[-1] + 2 for m in media if m[0] == "image")  # one <img> run per image
        return sum(len(longvita.image_run(self.specials, *tile_grid(*sizes[m[1]], self.cfg.min_tiles, m[2], self.tile),
                                          self.tpt, self.newline)) for m in media if m[0] == "image")

    def media_source(self, ref, read_at):
        """A path, or the embedded bytes (read again through ``read_at(source, cursor) -> Record``)."""
        if not isinstance(ref, Embedded):
            return ref
        record = read_at(ref.source, ref.cursor)
        return _bytes_of(normalise(record.raw, record.fmt), ref)

    def plan(self, record: Record) -> SamplePlan:
        raw = record.raw
        if isinstance(raw, Exception):
            raise SampleError("malformed_json", str(raw))
        sample = resolve_placeholders(normalise(raw, record.fmt))
        messages, cfg = sample.messages, self.cfg
        if len(sample.images) > cfg.max_images:
            raise SampleError("too_many_images", f"{len(sample.images)} images > data.max_images={cfg.max_images}")
        order = PLACEHOLDER.findall("".join(m["content"] for m in messages))
        it = {"images": iter(enumerate(sample.images)), "videos": iter(enumerate(sample.videos))}
        paths = []
        for ph in order:
            kind = "images" if ph == "<image>" else "videos"
            k, entry = next(it[kind])
            paths.append((kind[:-1], _ref(entry, kind, k, record)))
        src = lambda p: _bytes_of(sample, p) if isinstance(p, Embedded) else p  # noqa: E731
        # Header reads once per medium: image sizes and video frame counts.
        sizes = {p: image_size(src(p)) for k, p in paths if k == "image"}
        frames = {p: video_frame_count(src(p), cfg.max_frames, cfg.video_fps, self.fmt)
                  for k, p in paths if k == "video"}
        L = cfg.seq_length

        def media_at(max_tiles: int) -> list[tuple]:
            return [("image", p, max_tiles, tile_count(*sizes[p], cfg.min_tiles, max_tiles, self.tile))
                    if k == "image" else ("video", p, cfg.max_frames, cfg.video_fps, frames[p]) for k, p in paths]

        def encode(media: list[tuple]) -> tuple[list[int], list[int]]:
            if self.fmt == "longvita":
                return longvita.encode_conversation(messages, self.tok, self.specials, cfg.system_prompt, [
                    ("image", *tile_grid(*sizes[m[1]], cfg.min_tiles, m[2], self.tile)) if m[0] == "image"
                    else ("video", m[-1]) for m in media], self.tpt)
            groups = [[self.tpt * m[-1]] if m[0] == "image" else [self.tpt] * m[-1] for m in media]
            return encode_conversation(messages, self.tok, self.specials, cfg.system_prompt, groups)

        # InternVL's share of tiles per image (max_tiles // images); the released Long-VITA layout
        # gives every image max_tiles. Then halved down to min_tiles while the sample is too long:
        # tiles are reduced before a sample is dropped (a sample that fits keeps every tile). Only
        # image tokens change between budgets, so the text is tokenised once more at most.
        n_images = len(sizes)
        share = cfg.max_tiles if self.fmt == "longvita" else max(cfg.min_tiles, cfg.max_tiles // max(n_images, 1))
        media = media_at(share)
        ids, targets = encode(media)
        if len(ids) > L and n_images:
            text = len(ids) - self._image_tokens(media, sizes)
            for max_tiles in _tile_budgets(share, cfg.min_tiles)[1:]:
                fewer = media_at(max_tiles)
                if text + self._image_tokens(fewer, sizes) <= L:
                    break
            media = fewer
            ids, targets = encode(media)
        full = len(ids)
        if len(ids) > L:
            if media:
                raise SampleError("too_long_multimodal", f"{len(ids)} tokens > data.seq_length={L} even at "
                                                         f"{cfg.min_tiles} tile(s) per image")
            ids, targets = ids[:L], targets[:L - 1] + [IGNORE]
            if all(t == IGNORE for t in targets):
                raise SampleError("truncated_no_labels", f"text longer than data.seq_length={L}; after "
                                                         f"truncation no assistant token is left")
        return SamplePlan(record.source, str(raw.get("id", "?")), record.where, record.cursor, ids, targets, media,
                          full)


def _tile_budgets(max_tiles: int, min_tiles: int) -> list[int]:
    out, t = [max_tiles], max_tiles
    while t > min_tiles:
        t = max(min_tiles, t // 2)
        out.append(t)
    return out
