"""Prompts for inference, encoded exactly as training encodes samples.

Owns what a model sees when asked a question: ChatML ids from :mod:`lvita.data.template`, the
media's tiles from :mod:`lvita.data.media` with the data stream's tile budget (tiles per image
start at ``max_tiles // n_images``, or ``max_tiles`` for every image under ``model.format:
longvita``, and halve while the prompt is too long), then an open assistant turn. Under longvita
the ids and tiles follow released Long-VITA's layout (:mod:`lvita.data.longvita`). Used by :mod:`lvita.generate` and :mod:`lvita.eval`.

    p = build_prompt([{"role": "user", "content": "<image>\nWhat is this?"}], tok, specials, "tiny", ["a.png"])
    p.input_ids, p.pixel_values          # ids ending in "<|im_start|>assistant\n", (N, 3, T, T)

A video is a path, or anything with ``.path`` and ``.start`` / ``.end`` seconds (a benchmark's
``lvita.bench.items.Video``; an optional ``.fps``: a frame folder's recording rate): only frames in
that window are sampled (:func:`lvita.data.media.sampled_frames`).

Trade-off: image headers are read first to plan tiles and pixels decoded once the plan fits, so a
too-long prompt fails before any decoding; an unreadable file is a MediaError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lvita.config.schema import DataConfig
from lvita.data import longvita
from lvita.data.media import (MediaError, grid_tiles, image_size, image_tiles, normalise, tile_count, tile_grid,
                              video_frame_count, video_tiles)
from lvita.data.template import PLACEHOLDER, ROLE_ALIASES, SampleError, encode_conversation
from lvita.model.presets import llm_config, spec_of, tile_size, tokens_per_tile

DEFAULTS = DataConfig()  # training's media and system-prompt defaults


class ContextError(SampleError):
    """The prompt does not fit the context limit (``reason`` "too_long")."""

    def __init__(self, detail: str):
        super().__init__("too_long", detail + "; the limit must leave room for one new token")


# -- loading --------------------------------------------------------------------------------------

@dataclass
class MediaOptions:
    """How media become tiles; the defaults are training's (``data.*`` of a stage file)."""
    min_tiles: int = DEFAULTS.min_tiles
    max_tiles: int = DEFAULTS.max_tiles
    max_frames: int = DEFAULTS.max_frames
    video_fps: float = DEFAULTS.video_fps


@dataclass
class Prompt:
    input_ids: list[int]  # ChatML ids ending in "<|im_start|>assistant\n"
    pixel_values: torch.Tensor  # (N tiles, 3, T, T) float32, normalised, in placeholder order
    media: list[tuple] = field(default_factory=list)  # ("image", path, tiles) / ("video", path, frames)


def check_messages(messages) -> list[dict]:
    """role/content (or from/value) dicts -> [{"role", "content"}]; the last turn must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise SampleError("empty_conversation", "messages must be a non-empty JSON list of {role, content}")
    keys = [("role", "content") if isinstance(m, dict) and "role" in m else ("from", "value") for m in messages]
    for i, (m, (rk, ck)) in enumerate(zip(messages, keys)):
        if not isinstance(m, dict) or m.get(rk) not in ROLE_ALIASES or not isinstance(m.get(ck), str):
            raise SampleError("malformed_message", f"message {i} needs 'role' in {sorted(ROLE_ALIASES)} "
                                                   f"and a string 'content'")
    out = [{"role": ROLE_ALIASES[m[rk]], "content": m[ck]} for m, (rk, ck) in zip(messages, keys)]
    if out[-1]["role"] != "user":
        raise SampleError("malformed_message", f"the last message is the {out[-1]['role']}'s; it must be the "
                                               f"user's (the model answers it)")
    return out


def build_prompt(messages, tok, specials: dict, preset: str, images=(), videos=(),
                 system_prompt: str | None = DEFAULTS.system_prompt, media: MediaOptions = MediaOptions(),
                 max_context: int | None = None) -> Prompt:
    """Messages ending with the user's turn (``<image>``/``<video>`` placeholders matching
    ``images``/``videos`` in order) -> prompt ids + tiles, encoded as training encodes them.

    Tiles per image start at ``max_tiles // n_images`` and halve down to ``min_tiles`` while the
    prompt is over ``max_context - 1``, as the data stream does. Raises SampleError (reason
    "placeholder_mismatch" / "malformed_message"), MediaError naming the file, or ContextError.
    """
    messages = check_messages(messages)
    text = "".join(m["content"] for m in messages)
    n_img, n_vid = text.count("<image>"), text.count("<video>")
    if (n_img, n_vid) != (len(images), len(videos)):
        raise SampleError("placeholder_mismatch", f"{n_img} <image> / {n_vid} <video> placeholders for "
                                                  f"{len(images)} images / {len(videos)} videos")
    tile, tpt = tile_size(preset), tokens_per_tile(preset)
    fmt = spec_of(preset).format  # longvita: released Long-VITA's layout (lvita.data.longvita), as training
    files = {"<image>": iter(map(Path, images)), "<video>": iter(map(video_source, videos))}
    order = [(ph[1:-1], next(files[ph])) for ph in PLACEHOLDER.findall(text)]
    sizes = {p: image_size(p) for k, p in order if k == "image"}  # headers only; MediaError names the file
    frames = {p: video_frame_count(p.path, media.max_frames, media.video_fps, fmt, **p.window)
              for k, p in order if k == "video"}
    limit = (max_context if max_context is not None else llm_config(preset).max_position_embeddings) - 1
    budgets = [media.max_tiles if fmt == "longvita" else max(media.min_tiles, media.max_tiles // max(len(sizes), 1))]
    while sizes and budgets[-1] > media.min_tiles:  # as lvita.data.stream's _tile_budgets
        budgets.append(max(media.min_tiles, budgets[-1] // 2))
    for budget in budgets:
        plan = [("image", p, budget, tile_count(*sizes[p], media.min_tiles, budget, tile)) if k == "image"
                else ("video", p, frames[p]) for k, p in order]
        runs = [("image", *tile_grid(*sizes[m[1]], media.min_tiles, m[2], tile)) if m[0] == "image"
                else ("video", m[2]) for m in plan]
        ids = conversation_ids(messages, tok, specials, fmt, system_prompt, runs, tpt)
        if len(ids) <= limit:
            break
    else:
        raise ContextError(f"the prompt is {len(ids)} tokens" + (f" even at {media.min_tiles} tile(s) per image"
                           if sizes else "") + f"; the context limit is {limit + 1} tokens (--max-context)")
    tiles = []
    for m in plan:
        got = (image_tiles(m[1], tile, media.min_tiles, m[2], thumbnail_first=fmt == "longvita") if m[0] == "image"
               else video_tiles(m[1].path, tile, media.max_frames, media.video_fps, layout=fmt, **m[1].window))
        if got.shape[0] != m[-1]:
            raise MediaError(f"{m[1]}: decoded {got.shape[0]} tiles, its header promised {m[-1]}")
        tiles.append(normalise(got))
    pixels = torch.cat(tiles) if tiles else torch.zeros(0, 3, tile, tile)
    return Prompt(ids, pixels, [(m[0], str(m[1]), m[-1]) for m in plan])


def conversation_ids(messages, tok, specials: dict, fmt: str, system_prompt: str | None, runs: list[tuple],
                     tpt: int) -> list[int]:
    """Messages ending with the user's turn -> ids ending in the open assistant turn, encoded as training
    encodes the model format's samples. ``runs``: per placeholder in order, ("image", cols, rows) (the tile
    grid, plus a thumbnail when it has more than one tile) or ("video", frames); ``tpt``: tokens per tile."""
    opening = [specials["im_start"]] + tok.encode("assistant\n", add_special_tokens=False)
    if fmt == "longvita":
        return longvita.encode_conversation(messages, tok, specials, system_prompt, runs, tpt)[0] + opening
    groups = [[tpt * grid_tiles(r[1], r[2])] if r[0] == "image" else [tpt] * r[1] for r in runs]
    return encode_conversation(messages, tok, specials, system_prompt, groups)[0] + opening


@dataclass(frozen=True)
class VideoSource:
    """A video to sample: its path and the window arguments of lvita.data.media's video functions."""
    path: Path
    start: float | None = None
    end: float | None = None
    fps: float | None = None  # a frame folder's recording rate

    @property
    def window(self) -> dict:
        return dict(start=self.start, end=self.end, folder_fps=self.fps)

    def __str__(self) -> str:  # the path, as Prompt.media and error messages name a video
        return str(self.path)


def video_source(video) -> VideoSource:
    """A path, or an object with ``.path`` (and optional ``.start`` / ``.end`` seconds, ``.fps``)."""
    if hasattr(video, "path") and not isinstance(video, (str, Path)):
        return VideoSource(Path(video.path), getattr(video, "start", None), getattr(video, "end", None),
                           getattr(video, "fps", None))
    return VideoSource(Path(video))
