"""Planned media: what a sample (or a prompt) will feed the vision encoder, decided from headers.

Owns the two named types every planner produces and every decoder reads, so no caller indexes a
tuple: :class:`PlannedImage` (an image's tile grid at the tile budget it was planned with) and
:class:`PlannedVideo` (a video's sampled frame count, with the settings that reproduce it). ``ref``
is whatever the decoder is handed back: a path, a frame folder, an embedded-bytes reference
(:class:`lvita.data.plan.Embedded`) or a :class:`Video` (inference and benchmarks: a path with a time window).
:class:`ImageHeader` is an image before its budget is chosen (its size, from the header).

    m = PlannedImage("a.png", max_tiles=6, cols=3, rows=2)   # m.tiles == 7 (grid + thumbnail)
    v = PlannedVideo("v.mp4", max_frames=32, fps=1.0, frames=11)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Video:
    """A video as a prompt or a benchmark names it: a file or a folder of frames, optionally one time window
    (the one video type of inference and evaluation; training's records name videos by path)."""
    path: Path
    start: float | None = None  # seconds; None: from the beginning (MVBench's bound)
    end: float | None = None  # seconds; None: to the end
    fps: float | None = None  # a frame folder's recording rate (MVBench's 3-fps frame tasks); None: a file's own

    @property
    def window(self) -> dict:
        """The window arguments of lvita.data.media's video functions."""
        return dict(start=self.start, end=self.end, folder_fps=self.fps)

    def __str__(self) -> str:  # the path, as Prompt.media and error messages name a video
        return str(self.path)


def grid_tiles(cols: int, rows: int) -> int:
    """Tiles of a ``cols x rows`` grid: the grid, plus a thumbnail when it has more than one tile."""
    return cols * rows + (1 if cols * rows > 1 else 0)


@dataclass(frozen=True)
class ImageHeader:
    """An image whose size is known (header only) and whose tile budget is not chosen yet."""
    ref: Any
    width: int
    height: int


@dataclass(frozen=True)
class PlannedImage:
    ref: Any
    max_tiles: int  # the tile budget it was planned at (data.max_tiles, shared out or halved)
    cols: int
    rows: int

    @property
    def tiles(self) -> int:
        """The grid, plus a thumbnail when it has more than one tile."""
        return grid_tiles(self.cols, self.rows)


@dataclass(frozen=True)
class PlannedVideo:
    ref: Any
    max_frames: int
    fps: float
    frames: int  # the sampled frames, one tile each

    @property
    def tiles(self) -> int:
        return self.frames


Planned = PlannedImage | PlannedVideo
