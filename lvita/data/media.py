"""Images and videos -> uint8 tiles for the vision encoder, plus cheap tile-count planning.

Owns pixel decoding (pillow for images, decord for videos) and the rules that decide how many
tiles a piece of media becomes. Images use InternVL's dynamic tiling: the image is resized to the
``cols x rows`` grid of tiles whose aspect ratio best matches it (``tile_grid``), cut row-major, and
followed by a whole-image thumbnail when the grid has more than one tile. Videos are sampled
uniformly at no more than ``fps`` frames per second of video and at most ``max_frames``, one tile
per frame. Normalisation is InternViT's (ImageNet mean/std)::

    n = image_tile_count(path, min_tiles=1, max_tiles=12, tile=448)   # header only, no pixels
    t = image_tiles(path, 448, 1, 12)                                 # (n, 3, 448, 448) uint8
    x = normalise(t)                                                  # float32, ready for the ViT
    m = video_frame_count(vpath, max_frames=32, fps=1.0)              # decord metadata only
    v = video_tiles(vpath, 448, max_frames=32, fps=1.0)               # (m, 3, 448, 448) uint8

Under ``model.format: longvita`` (``thumbnail_first=True``, ``frames=LONGVITA_FRAMES``, both passed
down by :mod:`lvita.data.input_format`) the same grid comes with the thumbnail first, and videos
follow released Long-VITA's frame rules
(:mod:`lvita.data.longvita`: its sampling step, natural-sorted frame folders at 1 fps, frames
padded to a square with the mean colour before the resize).

Media sources: a path, or an in-memory file (``io.BytesIO``, for images and videos embedded in
parquet/arrow rows). A video may also be a directory of frame images, sorted by name (its frame rate
is unknown, so ``fps`` cannot bound the sampling there: up to ``max_frames`` frames are taken).

Time windows (benchmarks ask about one span of a video, MVBench's ``start``/``end``): the
``start=``/``end=`` seconds of ``video_frame_count`` / ``video_tiles`` / :func:`sampled_frames`
keep frames ``round(start * fps) .. round(end * fps)`` (clipped to the video; VLMEvalKit's MVBench
``get_index`` bounds) and sample inside them by the format's usual rule, as if the clip were the
whole video. ``folder_fps=``: a frame folder's recording rate (MVBench's frame tasks: 3); the
folder is then sampled as a video file at that rate (VLMEvalKit turns such a folder into an mp4
at that rate before Long-VITA reads it). Without these arguments nothing changes.
Every image mode becomes RGB the way InternVL's loaders end up: grayscale, palette (with
transparency through RGBA), RGBA (alpha dropped), CMYK, 16-bit (scaled to 8 bits, not clipped),
animated GIF / multi-frame TIFF (first frame).

Trade-offs: tiles stay uint8 until ``normalise`` so a buffer of pending samples is 4x smaller than
float32; training keeps them uint8 until they are on the GPU, where the vision encoder normalises
them. ``keep=`` decodes only some tiles (a sequence-parallel rank's shard). The counting functions read only headers/metadata, so a file whose header is fine but
whose pixels are corrupt is counted and only fails (MediaError) when decoded. All resizing is PIL
bicubic, as in InternVL, and everything is deterministic. EXIF orientation is ignored (as in
InternVL). Bad input raises ``MediaError`` naming the path; the data pipeline skips that sample.
"""
from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lvita.data import longvita
from lvita.data.planned import grid_tiles
from lvita.errors import UserError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # as lvita.model.longvita.PIXEL_MEAN / PIXEL_STD
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
MEAN_UINT8 = tuple(round(m * 255) for m in (0.485, 0.456, 0.406))  # a tile that normalises to about 0


class MediaError(UserError, ValueError):
    """A media file is missing or cannot be decoded; the sample is skipped."""


@functools.lru_cache(maxsize=64)
def _target_ratios(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    # Built exactly like InternVL (set, then stable sort by area) so ties break the same way.
    ratios = set((i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1)
                 for j in range(1, n + 1) if min_tiles <= i * j <= max_tiles)
    return tuple(sorted(ratios, key=lambda r: r[0] * r[1]))


def tile_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(cols, rows) by InternVL's find_closest_aspect_ratio: the grid whose cols/rows is closest to
    width/height; on a tie the larger grid wins only if the image area > half the grid's pixel area."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for i, j in _target_ratios(min_tiles, max_tiles):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best_diff, best = diff, (i, j)
        elif diff == best_diff and area > 0.5 * tile * tile * i * j:
            best = (i, j)
    return best


def tile_count(width: int, height: int, min_tiles: int, max_tiles: int, tile: int) -> int:
    """Tiles an image of this size becomes: the grid, plus a thumbnail when the grid has > 1 tile."""
    return grid_tiles(*tile_grid(width, height, min_tiles, max_tiles, tile))


FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _name(src) -> str:
    return getattr(src, "name", None) or (str(src) if not isinstance(src, io.IOBase) else "embedded image")


def _open_image(path) -> Image.Image:
    if isinstance(path, io.IOBase):
        path.seek(0)
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise MediaError(f"missing image {_name(path)}") from None
    except Exception as e:  # PIL raises many types for unreadable files
        raise MediaError(f"cannot decode image {_name(path)}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (forces the full decode of the current frame)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")  # a copy even when already RGB: the caller may close the file


def image_size(path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding pixels."""
    with _open_image(path) as img:
        return img.size


def image_tile_count(path, min_tiles: int, max_tiles: int, tile: int) -> int:
    """Tiles ``image_tiles`` will return (grid + thumbnail when the grid has > 1 tile); header only."""
    return tile_count(*image_size(path), min_tiles, max_tiles, tile)


def uint8_tiles(imgs: list[Image.Image]) -> torch.Tensor:
    """RGB tiles -> (n, 3, T, T) uint8."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in imgs])  # (n, T, T, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def decoded_rgb(src, what: str = "image") -> Image.Image:
    """An image file (or in-memory file) fully decoded to RGB; MediaError naming it (``what``: how to call it)."""
    with _open_image(src) as img:
        try:
            return to_rgb(img)  # forces the full decode
        except Exception as e:
            raise MediaError(f"cannot decode {what} {_name(src)}: {e}") from None


class FrameRule:
    """How a model format turns a video into frames: InternVL's rule (this class: centres of equal
    segments at most ``fps`` a second, a frame folder of any image suffix sorted by name, each frame
    resized to the tile). :data:`LONGVITA_FRAMES` is released Long-VITA's. Passed down from the input
    format (:mod:`lvita.data.input_format`), never chosen by name here."""
    folder_endings: tuple[str, ...] = tuple(sorted(FRAME_SUFFIXES))
    folder_fps: float | None = None  # the rate a frame folder is read at for a time window (None: unknown)

    def folder_files(self, path: Path) -> list:
        return sorted(f for f in path.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)

    def indices(self, total: int, native: float, max_frames: int, fps: float, folder: bool) -> list[int]:
        """The frame numbers a video's tiles come from."""
        return video_frame_indices(total, native, max_frames, fps)

    def tile(self, img: Image.Image, tile: int) -> Image.Image:
        """One video frame -> its one tile."""
        return img.resize((tile, tile), Image.BICUBIC)


class LongVitaFrameRule(FrameRule):
    """Released Long-VITA's frames (:mod:`lvita.data.longvita`): its sampling step, natural-sorted frame
    folders (any depth, names ending png/jpeg/jpg) at 1 fps, frames padded to a square with the mean colour."""
    folder_endings = longvita.FOLDER_FRAME_ENDINGS
    folder_fps = 1.0  # the official code's rate for a frame folder

    def folder_files(self, path: Path) -> list:
        return longvita.folder_frames(path)

    def indices(self, total: int, native: float, max_frames: int, fps: float, folder: bool) -> list[int]:
        try:
            return (longvita.folder_indices(total, max_frames, fps) if folder
                    else longvita.video_indices(total, native, max_frames, fps))
        except ValueError as e:
            raise MediaError(str(e)) from None

    def tile(self, img: Image.Image, tile: int) -> Image.Image:
        return longvita.pad_to_square(img, tile)


INTERNVL_FRAMES, LONGVITA_FRAMES = FrameRule(), LongVitaFrameRule()


def _kept(n: int, keep, expect: int | None, name: str) -> list[int]:
    """The tile numbers to produce out of ``n``; checks ``n`` against the planned ``expect``."""
    if expect is not None and n != expect:
        raise MediaError(f"{name}: decodes to {n} tiles but its header promised {expect}")
    keep = list(range(n)) if keep is None else [int(i) for i in keep]
    if any(not 0 <= i < n for i in keep):
        raise MediaError(f"{name}: tiles {keep} asked for, it has {n}")
    return keep


def image_tiles(path, tile: int, min_tiles: int = 1, max_tiles: int = 12, keep=None,
                expect: int | None = None, thumbnail_first: bool = False) -> torch.Tensor:
    """-> (n, 3, tile, tile) uint8: grid tiles row-major, then the thumbnail last if n > 1
    (InternVL's dynamic_preprocess with use_thumbnail=True); ``thumbnail_first``: the thumbnail
    first (released Long-VITA's order). ``keep``: only these tile numbers, in order (the grid is
    resized only if one of its tiles is kept, the thumbnail made only if kept). ``expect``: the
    planned tile count; another count raises MediaError."""
    img = decoded_rgb(path)
    cols, rows = tile_grid(img.width, img.height, min_tiles, max_tiles, tile)
    grid = cols * rows
    keep = _kept(grid + (grid > 1), keep, expect, f"image {_name(path)}")
    shift = 1 if thumbnail_first and grid > 1 else 0  # tile number of grid tile 0
    cells = [i - shift if 0 <= i - shift < grid else None for i in keep]  # None: the thumbnail
    big = img.resize((cols * tile, rows * tile), Image.BICUBIC) if any(c is not None for c in cells) else None
    out = [big.crop((c % cols * tile, c // cols * tile, (c % cols + 1) * tile, (c // cols + 1) * tile))
           if c is not None else img.resize((tile, tile), Image.BICUBIC) for c in cells]
    return uint8_tiles(out) if out else torch.zeros(0, 3, tile, tile, dtype=torch.uint8)


def video_frame_indices(total_frames: int, native_fps: float, max_frames: int, fps: float) -> list[int]:
    """Centres of n equal segments, n = max(1, min(max_frames, total_frames, floor(seconds * fps))).

    An unknown native fps (<= 0) cannot bound the rate, so then n = min(max_frames, total_frames)."""
    if total_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {total_frames}")
    cap = math.floor(total_frames / native_fps * fps) if native_fps > 0 else total_frames
    n = max(1, min(max_frames, total_frames, cap))
    seg = total_frames / n
    return [min(int(seg / 2 + seg * i), total_frames - 1) for i in range(n)]


def window_frames(total: int, rate: float, start: float | None, end: float | None) -> tuple[int, int]:
    """(first, last) frame numbers inside ``[start, end]`` seconds of a video of ``total`` frames at
    ``rate`` fps: ``round(start * rate)`` .. ``round(end * rate)`` clipped to the video (VLMEvalKit's
    MVBench ``get_index``); None: from the first / to the last frame. An empty window is a MediaError."""
    if (start is not None or end is not None) and not rate > 0:
        raise MediaError("a time window needs the video's frame rate (a frame folder's folder_fps)")
    first = 0 if start is None else max(0, round(float(start) * rate))
    last = total - 1 if end is None else min(round(float(end) * rate), total - 1)
    if first > last:
        raise MediaError(f"the window {start}..{end} s holds no frame of a {total}-frame video at {rate:g} fps")
    return first, last


class Sampled(list):
    """The frame numbers a video's tiles come from (a list), with ``fps``: the rate those numbers
    count at (the file's native rate, a folder's ``folder_fps``; 0.0: unknown)."""
    fps: float = 0.0


def _window_sampled(vr, total: int, native: float, max_frames: int, fps: float, frames: FrameRule,
                    start=None, end=None, folder_fps=None) -> Sampled:
    """``frames.indices`` inside the time window, with a frame folder at ``folder_fps`` read as a video file."""
    folder = isinstance(vr, list)
    if folder and folder_fps:
        native, folder = float(folder_fps), False
    elif folder and frames.folder_fps and (start is not None or end is not None):
        native = frames.folder_fps
    first, last = window_frames(total, native, start, end) if (start is not None or end is not None) \
        else (0, total - 1)
    out = Sampled(first + i for i in frames.indices(last - first + 1, native, max_frames, fps, folder))
    out.fps = native
    return out


def sampled_frames(path, max_frames: int, fps: float, frames: FrameRule = INTERNVL_FRAMES,
                   start: float | None = None, end: float | None = None, folder_fps: float | None = None) -> Sampled:
    """The frame numbers ``video_tiles`` decodes (same arguments), with their rate: timestamps of
    exactly the frames the model sees (Video-MME's subtitles are chosen by them). Metadata only."""
    vr, total, native = _open_video(path, frames)
    return _window_sampled(vr, total, native, max_frames, fps, frames, start, end, folder_fps)


def _open_video(path, frames: FrameRule = INTERNVL_FRAMES):
    """-> (reader, total frames, native fps); the reader is a decord VideoReader or a list of frame files."""
    if not isinstance(path, io.IOBase):
        try:  # a name too long for the file system: is_dir/is_file raise OSError (ENAMETOOLONG)
            is_dir, is_file = Path(path).is_dir(), Path(path).is_file()
        except OSError as e:
            raise MediaError(f"cannot open video {path}: {e.strerror or e}") from None
        if is_dir:
            files = frames.folder_files(Path(path))
            if not files:
                raise MediaError(f"video directory {path} has no frame images ({', '.join(frames.folder_endings)})")
            return files, len(files), 0.0
        if not is_file:
            raise MediaError(f"missing video {path}")
    try:
        import decord

        if isinstance(path, io.IOBase):
            path.seek(0)
        vr = decord.VideoReader(path if isinstance(path, io.IOBase) else str(path), num_threads=1)
        total, native = len(vr), float(vr.get_avg_fps() or 0.0)
    except Exception as e:  # decord raises DECORDError (and others) for corrupt files
        raise MediaError(f"cannot decode video {_name(path)}: {e}") from None
    if total < 1:
        raise MediaError(f"cannot decode video {_name(path)}: no frames")
    return vr, total, native


def video_frame_count(path, max_frames: int, fps: float, frames: FrameRule = INTERNVL_FRAMES,
                      start: float | None = None, end: float | None = None, folder_fps: float | None = None) -> int:
    """Frames ``video_tiles`` will return, from decord metadata only (no frame decoding)."""
    return len(sampled_frames(path, max_frames, fps, frames, start, end, folder_fps))


def video_tiles(path, tile: int, max_frames: int, fps: float, keep=None, expect: int | None = None,
                frames: FrameRule = INTERNVL_FRAMES, start: float | None = None, end: float | None = None,
                folder_fps: float | None = None) -> torch.Tensor:
    """-> (n, 3, tile, tile) uint8: the sampled frames, each one tile (no dynamic tiling), by the format's
    :class:`FrameRule` (InternVL's: resized; :data:`LONGVITA_FRAMES`: padded to a square with the mean
    colour, then resized, with the official sampling: :mod:`lvita.data.longvita`). ``keep``: only these
    sampled frames (tile numbers), the others are not decoded; ``expect``: the planned frame count;
    another count raises MediaError. ``start``/``end``/``folder_fps``: a time window (module doc)."""
    vr, total, native = _open_video(path, frames)
    idx = list(_window_sampled(vr, total, native, max_frames, fps, frames, start, end, folder_fps))
    idx = [idx[i] for i in _kept(len(idx), keep, expect, f"video {_name(path)}")]
    if not idx:
        return torch.zeros(0, 3, tile, tile, dtype=torch.uint8)
    if isinstance(vr, list):
        return uint8_tiles([frames.tile(decoded_rgb(vr[i], "frame"), tile) for i in idx])
    try:
        decoded = vr.get_batch(idx).asnumpy()
    except Exception as e:
        raise MediaError(f"cannot decode video {_name(path)}: {e}") from None
    return uint8_tiles([frames.tile(Image.fromarray(f).convert("RGB"), tile) for f in decoded])


def normalise(tiles_uint8: torch.Tensor) -> torch.Tensor:
    """(n, 3, T, T) uint8 -> float32 ``(x / 255 - MEAN) / STD``, on the tiles' device: the same
    function the vision encoder applies to uint8 tiles (training sends them as uint8)."""
    from lvita.model.longvita import normalise_pixels

    return normalise_pixels(tiles_uint8)
