"""Released Long-VITA's input layout (``model.format: longvita``): tokens, tile order, frames.

Owns the rules of the official data code (``VITA-MLLM/Long-VITA``: ``long_vita/data/dataset_qwen2.py``
``preprocess`` and ``long_vita/data/processor/image_processor.py``), re-implemented, not copied:

- ChatML turns ``<|im_start|>`` role ``\\n`` content ``<|im_end|>`` ``\\n``; each turn's content is
  tokenised whole (``<image>`` / ``<video>`` are added tokens); an assistant turn trains its
  content, ``<|im_end|>`` and the ``\\n`` after it. No default system prompt.
- ``<image>``: the thumbnail (or the single tile) FIRST as ``<img>`` + n x ``<IMG_CONTEXT>`` +
  ``</img>``; then, when the grid has more than one tile, per grid row ``\\n`` and per tile
  ``<patch>`` + n x ``<PATCH_CONTEXT>`` + ``</patch>`` (n = tokens per tile: 256 at 448 px).
  Tiles: InternVL's dynamic grid of 1..``data.max_tiles`` for EVERY image (no sharing out).
- ``<video>``: per sampled frame ``<vid>`` + n x ``<VID_CONTEXT>`` + ``</vid>``, nothing between.
  A video file: ``step = max(fps / max_fps, frames / (N + 1))``, frames ``int(i * step)`` for
  i < N kept while < frames (:func:`video_indices`). A frame folder (any depth; names ending in
  png/jpeg/jpg) is natural-sorted and taken as 1 fps (:func:`folder_indices`). N is
  ``data.max_frames``, ``max_fps`` is ``data.video_fps``.
- Frames are padded to a square with the ImageNet mean colour (each channel ``int(mean * 255)``:
  123, 116, 103), centred, then resized bicubic to the tile (:func:`pad_to_square`).

    ids, learn = encode_conversation(messages, tok, specials, None, [PlannedImage(p, 6, 3, 2), PlannedVideo(v, 8, 1.0, 5)], 256)

Departures, both outside the official settings: a frame folder read above 1 fps gives at most its
own frames (the official code then repeats frame 0); and the official code's ShareGPTVideo case
(frame folders whose path contains "ShareGPTVideo" read at 2 fps) is not kept: every frame folder
is 1 fps (``data.video_fps`` 0.5 gives such a source the same frames).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image

from lvita.data.planned import PlannedImage
from lvita.data.template import IGNORE, SampleError
from lvita.model.formats import LONGVITA

CONTEXT_NAMES = LONGVITA.context_tokens  # <IMG_CONTEXT>, <PATCH_CONTEXT>, <VID_CONTEXT>
PAD_COLOUR = tuple(int(m * 255) for m in (0.485, 0.456, 0.406))  # (123, 116, 103), as the official code
FOLDER_FRAME_ENDINGS = ("png", "jpeg", "jpg")  # the official test: str.endswith, case-sensitive, no dot


def video_indices(total: int, native_fps: float, max_frames: int, max_fps: float) -> list[int]:
    """The frames the official code samples from a video file of ``total`` frames."""
    if total < 1:
        raise ValueError(f"a video needs at least one frame, got {total}")
    if max_fps <= 0 or max_frames < 1:
        raise ValueError(f"need data.video_fps > 0 and data.max_frames >= 1, got {max_fps}, {max_frames}")
    step = max(native_fps / max_fps, total / (max_frames + 1))
    return [i for i in (int(k * step) for k in range(max_frames)) if i < total]


def folder_indices(total: int, max_frames: int, max_fps: float, folder_fps: float = 1.0) -> list[int]:
    """The frames the official code takes from a folder of ``total`` frame images (1 fps assumed)."""
    # capped at the folder's frames: above 1 fps the official code's int(total / target) becomes 0 and
    # it repeats frame 0 (at its max_fps 1 the cap never applies, so its frames are unchanged)
    target = min(int(min(total / folder_fps * max_fps, max_frames)), total)
    if target < 1:
        raise ValueError(f"a frame folder of {total} frames at data.video_fps={max_fps} gives no frame")
    step = int(1.0 * total / target)
    return [step * x for x in range(target)]


def natural_key(text: str) -> tuple:
    """Sort key putting ``frame2`` before ``frame10`` (natsort's default on the whole path)."""
    return tuple(int(t) if k % 2 else t for k, t in enumerate(re.split(r"(\d+)", text)))


def folder_frames(path: str | Path) -> list[str]:
    """Every frame image under ``path`` (walked to any depth), natural-sorted on the full path."""
    found = [os.path.join(root, f) for root, _, files in os.walk(str(path)) for f in files
             if f.endswith(FOLDER_FRAME_ENDINGS)]
    return sorted(found, key=natural_key)


def pad_to_square(img: Image.Image, tile: int) -> Image.Image:
    """The official frame preprocessing: centre on a square of the mean colour, then bicubic to ``tile``."""
    w, h = img.size
    if w != h:
        side = max(w, h)
        square = Image.new(img.mode, (side, side), PAD_COLOUR)
        square.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
        img = square
    return img.resize((tile, tile), Image.BICUBIC)


def image_run(specials: dict, cols: int, rows: int, tpt: int, newline: list[int]) -> list[int]:
    """The tokens of one image: thumbnail (or single tile) first, then per row ``\\n`` + its tiles."""
    out = [specials["img_start"]] + [specials["img_context"]] * tpt + [specials["img_end"]]
    if cols * rows > 1:
        tile = [specials["patch_start"]] + [specials["patch_context"]] * tpt + [specials["patch_end"]]
        for _ in range(rows):
            out += newline + tile * cols
    return out


def video_run(specials: dict, frames: int, tpt: int) -> list[int]:
    return ([specials["vid_start"]] + [specials["vid_context"]] * tpt + [specials["vid_end"]]) * frames


def encode_conversation(messages: list[dict], tok, specials: dict, system_prompt: str | None,
                        media: list[tuple], tokens_per_tile: int) -> tuple[list[int], list[int]]:
    """-> (ids, targets) as :func:`lvita.data.template.encode_conversation` returns them (targets
    shifted: ``targets[t]`` is what position t predicts). ``media`` per placeholder in text order:
    :class:`lvita.data.planned.PlannedImage` (its grid) or ``PlannedVideo`` (its frames)."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    texts = [m["content"] for m in messages]
    words = sorted({"\n", *(m["role"] for m in messages)})
    encoded = tok(texts + words, add_special_tokens=False)["input_ids"]
    word = dict(zip(words, encoded[len(texts):]))
    newline = word["\n"]
    tags = {specials["image_tag"]: "image", specials["video_tag"]: "video"}
    pending = iter(media)
    ids: list[int] = []
    learn: list[bool] = []

    def add(tokens: list[int], learned: bool) -> None:
        ids.extend(tokens)
        learn.extend([learned] * len(tokens))

    reserved = set(context_ids(specials))
    for m, body in zip(messages, encoded):
        if reserved.intersection(body):  # a feature slot without a tile: the sample would misplace features
            raise SampleError("placeholder_mismatch", f"a {m['role']} turn holds a context token "
                                                      f"({', '.join(CONTEXT_NAMES)}) as text")
        learned = m["role"] == "assistant"
        add([specials["im_start"]] + word[m["role"]] + newline, False)
        start = 0
        for k, t in enumerate(body):
            if t not in tags:
                continue
            add(body[start:k], learned)
            start = k + 1
            item = next(pending, None)
            if item is None or isinstance(item, PlannedImage) != (tags[t] == "image"):
                raise SampleError("placeholder_mismatch", f"the text's <{tags[t]}> placeholders do not match the "
                                                          f"record's media in order")
            add(image_run(specials, item.cols, item.rows, tokens_per_tile, newline) if isinstance(item, PlannedImage)
                else video_run(specials, item.frames, tokens_per_tile), False)
        add(body[start:], learned)
        add([specials["im_end"]] + newline, learned)
    if next(pending, None) is not None:
        raise SampleError("placeholder_mismatch", "more media than <image>/<video> placeholders in the text")
    targets = [ids[t + 1] if learn[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return ids, targets


def context_ids(specials: dict) -> tuple[int, ...]:
    """The ids whose positions take vision features, in the longvita layout."""
    return specials["img_context"], specials["patch_context"], specials["vid_context"]
