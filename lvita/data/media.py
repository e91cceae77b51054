"""Images and videos -> normalised 448-style tiles for the vision encoder.

Owns pixel decoding only (pillow for images, decord for videos). An image becomes one tile
resized to the model's tile size; a video becomes up to ``max_frames`` frames sampled uniformly at
no more than ``fps``, one tile each. Normalisation is InternViT's (ImageNet mean/std).

Trade-off: one tile per image keeps this simple; InternVL dynamic tiling arrives with the data
pipeline issue, behind the same ``image_tiles`` signature.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class MediaError(ValueError):
    """A media file is missing or cannot be decoded; the sample is skipped."""


def _to_tile(img: Image.Image, size: int) -> torch.Tensor:
    img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - MEAN) / STD


def image_tiles(path: Path, size: int) -> torch.Tensor:
    """-> (1, 3, size, size)."""
    try:
        with Image.open(path) as img:
            return _to_tile(img, size).unsqueeze(0)
    except FileNotFoundError:
        raise MediaError(f"missing image {path}") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise MediaError(f"cannot decode image {path}: {e}") from None


def video_tiles(path: Path, size: int, max_frames: int, fps: float) -> torch.Tensor:
    """-> (n_frames, 3, size, size); frames uniform over the clip, at most ``fps`` per second."""
    if not Path(path).is_file():
        raise MediaError(f"missing video {path}")
    try:
        import decord

        vr = decord.VideoReader(str(path))
        total, native = len(vr), float(vr.get_avg_fps() or 1.0)
        n = max(1, min(max_frames, total, int(total / native * fps) or 1))
        idx = np.linspace(0, total - 1, n).round().astype(int).tolist()
        frames = vr.get_batch(idx).asnumpy()
    except Exception as e:
        raise MediaError(f"cannot decode video {path}: {e}") from None
    return torch.stack([_to_tile(Image.fromarray(f), size) for f in frames])
