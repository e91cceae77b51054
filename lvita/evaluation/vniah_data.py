"""V-NIAH inputs: the needles, the haystack's 1-fps frames, where a needle goes, and the prompt's ids.

Owns everything :mod:`lvita.evaluation.vniah` feeds the model, following LongVA's ``vision_niah/``
(repository ``EvolvingLMMs-Lab/LongVA``: ``produce_haystack_embedding.py``, ``eval_vision_niah.py``,
``needle_datasets/``), re-implemented on pixels instead of precomputed embeddings:

- **Needles** (``--needles``, :func:`load_needles`): the published set as downloaded
  (``huggingface-cli download lmms-lab/v_niah_needles --repo-type dataset --local-dir DIR``: parquet
  files under ``DIR/data/`` with columns ``image`` (``{bytes, path}``, the datasets Image feature),
  ``question``, ``answer``), or LongVA's source layout: ``DIR/dataset.json``, a list of
  ``{"path": "ucsd.jpeg", "prompt": "\\nFind the frame ...", "answer": "B"}`` with the images in
  ``DIR/images/`` (or ``DIR/``); ``image`` / ``question`` are accepted for ``path`` / ``prompt``.
  A single ``.parquet`` or ``.json`` file works too. Parquet files win when both are there. A needle
  without an image, question or answer, or whose image does not decode, is skipped and counted.
- **Haystack** (``--haystack``, :func:`haystack_tiles`): a video file sampled as LongVA does, frames
  ``0, r, 2r, ...`` with ``r = round(native fps)`` (one per second), the first N of them; or a folder
  of frame images, each one second (natural-sorted under ``model.format: longvita`` as
  :mod:`lvita.data.longvita` reads folders, else by name). Like LongVA (which asserts), a haystack
  with fewer 1-fps frames than the largest ``--haystack-frames`` is refused: no uniform resampling, so the
  frames before a needle are the same seconds of video at every frame count.
- **Frames** are one tile each, made as training makes video frames: padded to a square with the
  mean colour then resized (``longvita``, :func:`lvita.data.longvita.pad_to_square`), or resized
  (``internvl``). The needle image is one frame made the same way (LongVA's needle goes through the
  same "pad" preprocessing as its haystack frames). Tiles stay uint8 (the vision encoder normalises
  them with :func:`lvita.data.media.normalise`'s function): the largest haystack is decoded once per
  run and a 3000-frame haystack of 448 px tiles is 1.8 GB.
- **Depth** d (percent) of N frames puts the needle at frame index ``floor(d * N / 100)``
  (:func:`needle_index`; LongVA's ``int(depth * num_frames)`` with exact arithmetic) in front of the
  haystack frame there: the model sees N + 1 frames, depth 100 puts it last.
- **Prompt** (:func:`prompt_ids`): one user turn, ``<video>`` (the N + 1 frames) then the needle's
  question (LongVA's questions open with ``\\n``; one is added if not), then the open assistant turn,
  encoded as :mod:`lvita.infer.prompt` encodes a video of that many frames.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from PIL import Image

from lvita.evaluation.items import Skip
from lvita.evaluation.video_common import read_json_list
from lvita.data.media import INTERNVL_FRAMES, FrameRule, MediaError, decoded_rgb, uint8_tiles
from lvita.data.planned import PlannedVideo
from lvita.data.template import valid_text
from lvita.errors import PathError, UserError

DECODE_CHUNK = 64  # haystack frames decoded per decord call: bounds the RGB frames held at once


@dataclass
class Needle:
    id: str  # the needle's number in the set's order (LongVA's index), as a string
    name: str  # its image file's name where the set gives one, else the id
    question: str
    answer: str
    image: Image.Image  # RGB


# -- needles --------------------------------------------------------------------------------------

def _needle_files(root: Path) -> tuple[str, list[Path]]:
    if root.is_file():
        kinds = {".parquet": "parquet", ".json": "json"}
        if root.suffix not in kinds:
            raise PathError(f"--needles {root}: expected a folder, a .parquet or a .json file")
        return kinds[root.suffix], [root]
    if not root.is_dir():
        raise PathError(f"--needles {root}: no such file or folder")
    if parquet := sorted(root.rglob("*.parquet")):
        return "parquet", parquet
    if (root / "dataset.json").is_file():
        return "json", [root / "dataset.json"]
    if found := sorted(root.glob("*.json")):
        return "json", found
    raise PathError(f"--needles {root}: no *.parquet (lmms-lab/v_niah_needles as downloaded) and no dataset.json "
                    f"(LongVA's needle_datasets/ layout) in it")


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise PathError(f"--needles {path}: cannot read it as parquet ({e})") from None


def _open_rgb(src, where: str) -> Image.Image:
    try:
        return decoded_rgb(src)
    except MediaError as e:
        raise MediaError(f"{where}: {e}") from None


def _needle_image(row: dict, folder: Path, where: str) -> tuple[Image.Image, str]:
    img = row.get("image", row.get("path"))
    if isinstance(img, dict):  # the datasets Image feature: {"bytes": ..., "path": ...}
        name = Path(str(img.get("path") or "")).name
        if img.get("bytes"):
            return _open_rgb(io.BytesIO(img["bytes"]), where), name
        img = img.get("path")
    if isinstance(img, (bytes, bytearray)):
        return _open_rgb(io.BytesIO(img), where), ""
    if not isinstance(img, str) or not img:
        raise MediaError(f"{where}: no image (expected 'image' or 'path')")
    found = next((p for p in (folder / img, folder / "images" / img) if p.is_file()), folder / img)
    return _open_rgb(found, f"{where} ({found})"), Path(img).name


def load_needles(root) -> tuple[list[Needle], list[Skip]]:
    """``--needles`` -> (needles in the set's order, skipped needles with reasons)."""
    kind, files = _needle_files(Path(root))
    needles, skipped, index = [], [], 0
    for path in files:
        for i, row in enumerate(_parquet_rows(path) if kind == "parquet" else read_json_list(path, "--needles")):
            nid, where, index = str(index), f"{path} row {i}", index + 1
            if not isinstance(row, dict):
                skipped.append(Skip(nid, "bad_needle", f"{where}: not an object"))
                continue
            question, answer = row.get("question", row.get("prompt")), row.get("answer")
            if not isinstance(question, str) or not question.strip():
                skipped.append(Skip(nid, "bad_needle", f"{where}: no 'question' (or 'prompt') text"))
                continue
            if not isinstance(answer, (str, int, float)) or not str(answer).strip():
                skipped.append(Skip(nid, "bad_needle", f"{where}: no 'answer'"))
                continue
            try:
                image, name = _needle_image(row, path.parent, where)
            except MediaError as e:
                skipped.append(Skip(nid, "bad_image", str(e)))
                continue
            # lone surrogates (an emoji cut in half) cleaned here, where the text enters, as lvita.data.formats does
            needles.append(Needle(nid, name or nid, valid_text(question), valid_text(str(answer).strip()), image))
    return needles, skipped


# -- frames ---------------------------------------------------------------------------------------

def one_fps_indices(total: int, native_fps: float, count: int) -> list[int]:
    """LongVA's haystack frames: ``range(0, total, round(fps))``, the first ``count``."""
    step = max(1, round(native_fps))
    return list(range(0, total, step))[:count]


def _haystack_source(path: Path, frames: FrameRule):
    """-> (frame files or a decord reader, its 1-fps frame numbers, a description); PathError if unreadable.
    ``frames``: the model format's frame rule (which files of a folder are frames, in which order)."""
    if path.is_dir():
        files = [str(f) for f in frames.folder_files(path)]
        return files, list(range(len(files))), {"path": str(path), "kind": "frame folder (1 frame per second)",
                                                "frames_at_1fps": len(files)}
    if not path.is_file():
        raise PathError(f"--haystack {path}: no such video file or frame folder")
    try:
        import decord

        vr = decord.VideoReader(str(path), num_threads=1)
        total, native = len(vr), float(vr.get_avg_fps() or 0.0)
    except Exception as e:  # decord raises DECORDError (and others) for corrupt files
        raise PathError(f"--haystack {path}: cannot decode the video ({e})") from None
    if native <= 0:
        raise UserError(f"--haystack {path}: the video has no frame rate; pass a folder of 1-fps frames instead")
    idx = one_fps_indices(total, native, total)
    return vr, idx, {"path": str(path), "kind": "video", "frames": total, "native_fps": native,
                     "step": max(1, round(native)), "frames_at_1fps": len(idx)}


def haystack_info(path, count: int, frames: FrameRule = INTERNVL_FRAMES) -> dict:
    """What ``--haystack`` holds (metadata only); UserError when it has fewer than ``count`` 1-fps frames."""
    about = _haystack_source(Path(path), frames)[2]
    if about["frames_at_1fps"] < count:
        held = (f"{about['frames']} frames at {about['native_fps']:g} fps" if about["kind"] == "video"
                else "frame images")
        raise UserError(f"--haystack {path}: {about['frames_at_1fps']} frames at 1 fps ({held}), --haystack-frames "
                        f"asks for {count}: use a longer video or smaller --haystack-frames (LongVA refuses it too)")
    return about


def haystack_tiles(path, count: int, fmt) -> tuple[torch.Tensor, dict]:
    """The first ``count`` 1-fps frames of ``--haystack`` -> ((count, 3, T, T) uint8, a description), as the
    input format ``fmt`` prepares frames. Fewer than ``count`` there: UserError naming the video and what it holds."""
    path, tile = Path(path), fmt.tile
    about = haystack_info(path, count, fmt.frames)
    source, idx, _ = _haystack_source(path, fmt.frames)
    idx = idx[:count]
    out = torch.empty(count, 3, tile, tile, dtype=torch.uint8)
    for s in range(0, count, DECODE_CHUNK):
        part = idx[s:s + DECODE_CHUNK]
        if isinstance(source, list):
            imgs = [_open_rgb(source[i], f"haystack frame {source[i]}") for i in part]
        else:
            try:
                imgs = [Image.fromarray(f).convert("RGB") for f in source.get_batch(part).asnumpy()]
            except Exception as e:
                raise PathError(f"--haystack {path}: cannot decode frames {part[0]}..{part[-1]} ({e})") from None
        out[s:s + len(part)] = uint8_tiles([fmt.frame_tile(im) for im in imgs])
    return out, about


def needle_index(depth, frames: int) -> int:
    """Where the needle goes among ``frames`` haystack frames at ``depth`` percent: floor(d * N / 100)."""
    return math.floor(Fraction(str(depth)) * frames / 100)


def frames_with_needle(haystack: torch.Tensor, needle: torch.Tensor, frames: int, depth) -> torch.Tensor:
    """The first ``frames`` haystack tiles with the needle tile (1, 3, T, T) inserted at its depth."""
    i = needle_index(depth, frames)
    return torch.cat([haystack[:i], needle, haystack[i:frames]])


# -- prompt ---------------------------------------------------------------------------------------

def question_text(question: str) -> str:
    """The user's turn: the video, then the question (on its own line)."""
    return "<video>" + (question if question.startswith("\n") else "\n" + question)


def prompt_ids(question: str, n_frames: int, fmt, system_prompt: str | None) -> list[int]:
    """Ids of a one-video prompt of ``n_frames`` frames, as :func:`lvita.infer.prompt.build_prompt`
    encodes it in the input format ``fmt``, ending in the open assistant turn. SampleError for a question
    holding context tokens."""
    return fmt.prompt_ids([{"role": "user", "content": question_text(question)}], system_prompt,
                          [PlannedVideo(None, n_frames, 1.0, n_frames)])
