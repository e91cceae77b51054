"""Planning one record: schema -> conversation -> media references -> token ids, targets, tile counts.

Owns the per-record decision every rank makes identically (and ``lvita data check`` makes for
every record): normalise the record's schema (:mod:`lvita.data.formats`), match placeholders to
media, resolve each medium to a path (relative to the source's media root, or absolute), a frame
directory, or an embedded ``{"bytes", "path"}`` entry, read headers only (image size, video frame
count), choose tiles per image, and encode the ChatML conversation.

    planner = Planner(cfg.data, fmt)            # fmt: the run's InputFormat (lvita.data.input_format)
    plan = planner.plan(record)                 # SamplePlan, or raises SampleError / MediaError
    src = planner.media_source(plan.media[0].ref, mixture.read_at)   # path or BytesIO, for decoding

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
from lvita.data.input_format import InputFormat
from lvita.data.media import MediaError, image_size
from lvita.data.packer import SamplePlan
from lvita.data.planned import ImageHeader, PlannedImage, PlannedVideo
from lvita.data.sources import Record
from lvita.data.template import IGNORE, PLACEHOLDER, SampleError


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


def describe(m, settings: bool = False) -> str:
    """One planned medium in words: ``image a.png (7 tiles)``; ``settings``: with its budget / sampling."""
    if isinstance(m, PlannedImage):
        return f"image {media_name(m.ref)} ({m.tiles} tiles" + (f", max {m.max_tiles})" if settings else ")")
    return f"video {media_name(m.ref)} ({m.frames} frames" + (f", max {m.max_frames}, {m.fps} fps)" if settings
                                                              else ")")


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
    """Plans records for one stage: ``data`` (the stage's DataConfig) and ``fmt`` (the run's
    :class:`lvita.data.input_format.InputFormat`, which owns tokens, encoding and the tile budget)."""

    def __init__(self, data: DataConfig, fmt: InputFormat):
        self.cfg, self.fmt = data, fmt

    def media_source(self, ref, read_at):
        """A path, or the embedded bytes (read again through ``read_at(source, cursor) -> Record``)."""
        if not isinstance(ref, Embedded):
            return ref
        record = read_at(ref.source, ref.cursor)
        return _bytes_of(normalise(record.raw, record.schema), ref)

    def plan(self, record: Record) -> SamplePlan:
        raw = record.raw
        if isinstance(raw, Exception):
            raise SampleError("malformed_json", str(raw))
        sample = resolve_placeholders(normalise(raw, record.schema))
        messages, cfg = sample.messages, self.cfg
        if len(sample.images) > cfg.max_images:
            raise SampleError("too_many_images", f"{len(sample.images)} images > data.max_images={cfg.max_images}")
        order = PLACEHOLDER.findall("".join(m["content"] for m in messages))
        it = {"images": iter(enumerate(sample.images)), "videos": iter(enumerate(sample.videos))}
        refs = []
        for ph in order:
            kind = "images" if ph == "<image>" else "videos"
            k, entry = next(it[kind])
            refs.append((kind == "images", _ref(entry, kind, k, record)))
        src = lambda p: _bytes_of(sample, p) if isinstance(p, Embedded) else p  # noqa: E731
        # Header reads once per medium: image sizes and video frame counts. The input format then
        # chooses the tile budget (shared out or not, halved while too long: InputFormat.fit).
        read = {}  # a medium repeated in the record is read once
        for key in refs:
            is_image, p = key
            if key not in read:
                read[key] = ImageHeader(p, *image_size(src(p))) if is_image else PlannedVideo(
                    p, cfg.max_frames, cfg.video_fps, self.fmt.video_frames(src(p), cfg.max_frames, cfg.video_fps))
        found = [read[key] for key in refs]
        L = cfg.seq_length
        fitted = self.fmt.fit(messages, cfg.system_prompt, found, cfg.min_tiles, cfg.max_tiles, L)
        ids, targets, media = fitted.ids, fitted.targets, fitted.media
        full = len(ids)
        if not fitted.fits:
            if media:
                least = (f" even at {cfg.min_tiles} tile(s) per image"
                         if any(isinstance(m, PlannedImage) for m in media) else " with its videos' frames")
                raise SampleError("too_long_multimodal", f"{len(ids)} tokens > data.seq_length={L}{least}")
            ids, targets = ids[:L], targets[:L - 1] + [IGNORE]
            if all(t == IGNORE for t in targets):
                raise SampleError("truncated_no_labels", f"text longer than data.seq_length={L}; after "
                                                         f"truncation no assistant token is left")
        return SamplePlan(record.source, str(raw.get("id", "?")), record.where, record.cursor, ids, targets, media,
                          full)
