"""Prompts for inference, encoded exactly as training encodes samples.

Owns what a model sees when asked a question, in the model's input format
(:class:`lvita.data.input_format.InputFormat`, the object training's planner uses): its ids and the
media's tiles with training's tile budget (:meth:`InputFormat.fit`: tiles per image start at
``max_tiles // n_images``, or ``max_tiles`` for every image under ``model.format: longvita``, and
halve while the prompt is too long), then an open assistant turn. Used by :mod:`lvita.generate`,
:mod:`lvita.eval` and the benchmarks.

    p = build_prompt([{"role": "user", "content": "<image>\nWhat is this?"}], fmt, ["a.png"])
    p.input_ids, p.pixel_values          # ids ending in "<|im_start|>assistant\n", (N, 3, T, T)

A video is a path or a :class:`lvita.data.planned.Video` (a path with ``.start`` / ``.end`` seconds and an
optional ``.fps``, a frame folder's recording rate): only frames in that window are sampled
(:func:`lvita.data.media.sampled_frames`).

Trade-off: image headers are read first to plan tiles and pixels decoded once the plan fits, so a
too-long prompt fails before any decoding; an unreadable file is a MediaError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lvita.config.schema import DataConfig
from lvita.data.input_format import InputFormat
from lvita.data.media import MediaError, image_size, normalise
from lvita.data.planned import ImageHeader, PlannedVideo, Video
from lvita.data.template import PLACEHOLDER, ROLE_ALIASES, SampleError, valid_text
from lvita.model.presets import llm_config

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
    media: list = field(default_factory=list)  # PlannedImage / PlannedVideo (lvita.data.planned), in order


def check_messages(messages) -> list[dict]:
    """role/content (or from/value) dicts -> [{"role", "content"}]; the last turn must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise SampleError("empty_conversation", "messages must be a non-empty JSON list of {role, content}")
    keys = [("role", "content") if isinstance(m, dict) and "role" in m else ("from", "value") for m in messages]
    for i, (m, (rk, ck)) in enumerate(zip(messages, keys)):
        role = m.get(rk) if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ROLE_ALIASES or not isinstance(m.get(ck), str):
            raise SampleError("malformed_message", f"message {i} needs 'role' in {sorted(ROLE_ALIASES)} "
                                                   f"and a string 'content'")
    out = [{"role": ROLE_ALIASES[m[rk]], "content": valid_text(m[ck])} for m, (rk, ck) in zip(messages, keys)]
    if out[-1]["role"] != "user":
        raise SampleError("malformed_message", f"the last message is the {out[-1]['role']}'s; it must be the "
                                               f"user's (the model answers it)")
    return out


def build_prompt(messages, fmt: InputFormat, images=(), videos=(),
                 system_prompt: str | None = DEFAULTS.system_prompt, media: MediaOptions = MediaOptions(),
                 max_context: int | None = None) -> Prompt:
    """Messages ending with the user's turn (``<image>``/``<video>`` placeholders matching
    ``images``/``videos`` in order) -> prompt ids + tiles, encoded as training encodes them in the
    input format ``fmt`` (:class:`lvita.data.input_format.InputFormat`, built once per model).

    The tile budget is training's (:meth:`InputFormat.fit`): tiles halve down to ``min_tiles`` while
    the prompt is over ``max_context - 1`` (default: the model's max_position_embeddings). Raises
    SampleError (reason "placeholder_mismatch" / "malformed_message"), MediaError naming the file, or
    ContextError.
    """
    messages = check_messages(messages)
    images, videos = media_list(images, "images"), media_list(videos, "videos")
    text = "".join(m["content"] for m in messages)
    n_img, n_vid = text.count("<image>"), text.count("<video>")
    if (n_img, n_vid) != (len(images), len(videos)):
        raise SampleError("placeholder_mismatch", f"{n_img} <image> / {n_vid} <video> placeholders for "
                                                  f"{len(images)} images / {len(videos)} videos")
    files = {"<image>": iter(map(Path, images)), "<video>": iter(map(video_source, videos))}
    order = [(ph, next(files[ph])) for ph in PLACEHOLDER.findall(text)]
    read = {}  # headers only, once per file; MediaError names the file
    for ph, p in order:
        if (ph, p) not in read:
            read[ph, p] = ImageHeader(p, *image_size(p)) if ph == "<image>" else PlannedVideo(
                p, media.max_frames, media.video_fps, fmt.video_frames(p.path, media.max_frames, media.video_fps,
                                                                       p.window))
    found = [read[key] for key in order]
    limit = (max_context if max_context is not None else llm_config(fmt.spec).max_position_embeddings) - 1
    opening = fmt.opening()
    fitted = fmt.fit(messages, system_prompt, found, media.min_tiles, media.max_tiles, limit - len(opening))
    ids = fitted.ids + opening
    if not fitted.fits:
        least = f" even at {media.min_tiles} tile(s) per image" if n_img else ""
        raise ContextError(f"the prompt is {len(ids)} tokens{least}; the context limit is {limit + 1} tokens "
                           f"(--max-context)")
    tiles = []
    for m in fitted.media:
        window = m.ref.window if isinstance(m, PlannedVideo) else None
        source = m.ref.path if isinstance(m, PlannedVideo) else m.ref
        tiles.append(normalise(fmt.medium_tiles(m, source, media.min_tiles, window=window)))
    pixels = torch.cat(tiles) if tiles else torch.zeros(0, 3, fmt.tile, fmt.tile)
    return Prompt(ids, pixels, fitted.media)


def media_list(given, what: str) -> list:
    """``images`` / ``videos`` as given -> a list of paths (or video sources); MediaError for anything else."""
    given = list(given) if isinstance(given, (list, tuple)) else given
    if not isinstance(given, list):
        raise MediaError(f"{what} must be a list of paths, got {type(given).__name__}")
    for k, m in enumerate(given):
        if not (isinstance(m, (str, Path)) and str(m)) and not (what == "videos" and hasattr(m, "path")):
            raise MediaError(f"{what}[{k}]: expected a file path, got {type(m).__name__} ({str(m)[:40]!r})")
    return given


def video_source(video) -> Video:
    """A path, or an object with ``.path`` (and optional ``.start`` / ``.end`` seconds, ``.fps``) -> a plain
    :class:`lvita.data.planned.Video` (hashable: headers are read once per distinct video)."""
    if hasattr(video, "path") and not isinstance(video, (str, Path)):
        return Video(Path(video.path), getattr(video, "start", None), getattr(video, "end", None),
                     getattr(video, "fps", None))
    return Video(Path(video))
