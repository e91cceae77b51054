"""The V-NIAH heatmap: accuracy per (frame count, needle depth) as a PNG drawn with pillow.

Owns the picture :mod:`lvita.evaluation.vniah` writes next to results.json. It reads like LongVA's
(``vision_niah/eval_vision_niah.py``'s ``plot``: seaborn heatmap, colours #F0496E -> #EBB839 ->
#9ad5b3 for 0 -> 0.5 -> 1): frame counts across (x axis "frames"), depths down (y axis "depth %", 0
at the top), each cell coloured red..yellow..green by its accuracy with the value written in it; a
cell with nothing scored is grey with "-". The title carries the mean. No matplotlib: pillow's
default font, fixed cell size, so the image is (left margin + cells x 64) by (top + cells x 36 +
bottom) pixels.

    png_bytes(grid, frames=[200, 400], depths=[0, 50, 100], title="mean 0.83")   # -> PNG bytes
"""
from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

STOPS = ((0.0, (0xF0, 0x49, 0x6E)), (0.5, (0xEB, 0xB8, 0x39)), (1.0, (0x9A, 0xD5, 0xB3)))  # LongVA's colour map
EMPTY = (200, 200, 200)
CELL_W, CELL_H = 64, 36
LEFT, TOP, BOTTOM, RIGHT = 72, 34, 44, 12


def colour(acc: float | None) -> tuple[int, int, int]:
    """Accuracy in [0, 1] -> RGB on LongVA's red -> yellow -> green scale; None -> grey."""
    if acc is None:
        return EMPTY
    acc = min(1.0, max(0.0, float(acc)))
    for (a, ca), (b, cb) in zip(STOPS, STOPS[1:]):
        if acc <= b:
            t = (acc - a) / (b - a)
            return tuple(round(x + (y - x) * t) for x, y in zip(ca, cb))
    return STOPS[-1][1]


def _label(n) -> str:
    return f"{n / 1000:.1f}K" if n >= 1000 else f"{n:g}"


def _centred(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - (right - left) / 2, xy[1] - (bottom - top) / 2 - top), text, fill="black", font=font)


def draw(grid: dict, frames: list, depths: list, title: str = "") -> Image.Image:
    """``grid[(frames, depth)]`` accuracy (or None) -> the heatmap image."""
    font = ImageFont.load_default()
    w, h = LEFT + CELL_W * len(frames) + RIGHT, TOP + CELL_H * len(depths) + BOTTOM
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    for c, n in enumerate(frames):
        for r, depth in enumerate(depths):
            acc = grid.get((n, depth))
            x, y = LEFT + c * CELL_W, TOP + r * CELL_H
            d.rectangle([x, y, x + CELL_W - 2, y + CELL_H - 2], fill=colour(acc))  # a white 2 px grid line
            _centred(d, (x + CELL_W / 2 - 1, y + CELL_H / 2 - 1), "-" if acc is None else f"{acc:.2f}", font)
        _centred(d, (LEFT + c * CELL_W + CELL_W / 2, TOP + CELL_H * len(depths) + 10), _label(n), font)
    for r, depth in enumerate(depths):
        _centred(d, (LEFT - 22, TOP + r * CELL_H + CELL_H / 2), f"{depth:g}", font)
    _centred(d, (LEFT + CELL_W * len(frames) / 2, h - 12), "frames", font)
    d.text((4, TOP - 16), "depth %", fill="black", font=font)
    _centred(d, (w / 2, 10), title, font)
    return img


def png_bytes(grid: dict, frames: list, depths: list, title: str = "") -> bytes:
    buf = io.BytesIO()
    draw(grid, frames, depths, title).save(buf, format="PNG")
    return buf.getvalue()
