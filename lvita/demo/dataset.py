"""The demo's synthetic multi-source dataset, written in lvita's sample format (JSONL + media).

    from lvita.demo.dataset import generate_demo_data
    generate_demo_data(Path("demo_out/data"))      # {source: jsonl path}

Sources mirror the kinds of data in the paper's Table 1, at toy scale: ``captions`` (one image,
caption says exactly what is drawn; ~10% in LLaVA ``conversations`` format), ``multi_image``
(compare 2-4 images), ``comic`` (6-12 panels, summarise in order), ``video`` (short mp4 of a
moving shape), ``text_short`` (arithmetic, instructions, multi-turn, system prompts) and
``text_long`` (500-1500 words with a planted "secret number" to retrieve).

Trade-off: everything is drawn with pillow and written with PyAV in a few seconds, deterministic
for a seed, so the demo and tests need no downloads; the content is simple enough that a
few-million-parameter model visibly learns it.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (140, 60, 170), "orange": (240, 140, 30)}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (150, 150, 150), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("the river the garden a lantern the old bridge a quiet road the market the library a tall tree "
         "the harbour a small boat the mountain path the village the morning light an open window").split(" ")


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _picture(rng: random.Random, n_shapes: int | None = None) -> tuple[Image.Image, list[tuple[str, str, str]]]:
    """An image with 1-3 shapes; returns it and [(colour, shape, side)]."""
    w, h = rng.randrange(64, 161), rng.randrange(64, 161)
    bg = rng.choice(list(BACKGROUNDS))
    img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    d = ImageDraw.Draw(img)
    shapes = []
    n = n_shapes or rng.randrange(1, 4)
    for i in range(n):
        side = "left" if i % 2 == 0 else "right"
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        s = max(12, min(w, h) // 3)
        x0 = rng.randrange(0, max(1, w // 2 - s)) + (0 if side == "left" else w // 2)
        y0 = rng.randrange(0, max(1, h - s))
        _draw_shape(d, shape, (x0, y0, x0 + s, y0 + s), COLOURS[colour])
        shapes.append((colour, shape, side))
    return img, shapes


def _describe(shapes: list[tuple[str, str, str]]) -> str:
    parts = [f"a {c} {s} on the {side}" for c, s, side in shapes]
    count = {1: "one shape", 2: "two shapes", 3: "three shapes"}[len(shapes)]
    return f"The image shows {count}: " + ", ".join(parts) + "."


def _save(img: Image.Image, root: Path, rel: str) -> str:
    img.save(root / rel, format="PNG", optimize=False)
    return rel


def _write(root: Path, name: str, samples: list[dict]) -> Path:
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(s, sort_keys=True) + "\n" for s in samples))
    return path


def _turns(user: str, answer: str, llava: bool = False) -> dict:
    if llava:
        return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]}
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _captions(root: Path, rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        img, shapes = _picture(rng)
        rel = _save(img, root, f"images/captions-{i:06d}.png")
        q = rng.choice(["Describe the image.", "What do you see?", "Describe the shapes in this picture."])
        out.append({"id": f"captions-{i}", "images": [rel], **_turns(f"<image>\n{q}", _describe(shapes), i % 10 == 0)})
    return out


def _multi_image(root: Path, rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        k = rng.randrange(2, 5)
        pics = [_picture(rng) for _ in range(k)]
        rels = [_save(p, root, f"images/multi-{i:06d}-{j}.png") for j, (p, _) in enumerate(pics)]
        counts = [sum(s == "circle" for _, s, _ in shapes) for _, shapes in pics]
        best = max(range(k), key=lambda j: (counts[j], -j))
        text = "".join(f"Image {j + 1}: <image>\n" for j in range(k))
        answer = (f"Image {best + 1} has the most circles ({counts[best]})." if counts[best]
                  else "None of the images has a circle.")
        out.append({"id": f"multi_image-{i}", "images": rels,
                    **_turns(text + "Which image has the most circles?", answer)})
    return out


def _comic(root: Path, rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        k = rng.randrange(6, 13)
        panels = [_picture(rng, n_shapes=1) for _ in range(k)]
        rels = [_save(p, root, f"images/comic-{i:06d}-{j:02d}.png") for j, (p, _) in enumerate(panels)]
        story = [f"In panel {j + 1} a {c} {s} stands on the {side}." for j, (_, [(c, s, side)]) in enumerate(panels)]
        out.append({"id": f"comic-{i}", "images": rels,
                    **_turns("<image>" * k + "\nSummarise this comic panel by panel.",
                             " ".join(story) + f" The story ends after {k} panels.")})
    return out


def _video(root: Path, rng: random.Random, n: int) -> list[dict]:
    import av

    out = []
    for i in range(n):
        frames, direction = rng.randrange(8, 17), rng.choice(["left", "right", "up", "down"])
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        rel = f"videos/video-{i:06d}.mp4"
        with av.open(str(root / rel), "w") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
            for f in range(frames):
                t = f / (frames - 1)
                pos = int(8 + t * 36) if direction in ("right", "down") else int(44 - t * 36)
                x, y = (pos, 24) if direction in ("left", "right") else (24, pos)
                img = Image.new("RGB", (64, 64), BACKGROUNDS["white"])
                _draw_shape(ImageDraw.Draw(img), shape, (x, y, x + 14, y + 14), COLOURS[colour])
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        out.append({"id": f"video-{i}", "videos": [rel],
                    **_turns("<video>\nWhere does the shape move?", f"The {colour} {shape} moves {direction}.")})
    return out


def _text_short(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        kind = i % 4
        if kind == 0:
            s = _turns(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.")
        elif kind == 1:
            s = _turns(f"What is {a} times {b % 13}?", f"{a} times {b % 13} is {a * (b % 13)}.")
            s["messages"].insert(0, {"role": "system", "content": "You are a careful maths tutor."})
        elif kind == 2:
            colour = rng.choice(list(COLOURS))
            s = {"messages": [{"role": "user", "content": f"Name a fruit that can be {colour}."},
                              {"role": "assistant", "content": f"An apple can be {colour}." if colour != "blue"
                               else "Blueberries are blue."},
                              {"role": "user", "content": f"And what is {a} minus {b}?"},
                              {"role": "assistant", "content": f"{a} - {b} = {a - b}."}]}
        else:
            words = rng.sample(WORDS[:12], 3)
            s = _turns("Write the words in reverse order: " + ", ".join(words), ", ".join(reversed(words)) + ".")
        out.append({"id": f"text_short-{i}", **s})
    return out


def _text_long(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        n_words = rng.randrange(500, 1501)
        sentences, count = [], 0
        while count < n_words:
            a, b, c = rng.sample(WORDS, 3)
            s = f"Near {a} we walked past {b} and saw {c} in the {rng.choice(['rain', 'sun', 'fog', 'wind'])}."
            sentences.append(s)
            count += len(s.split())
        secret = rng.randrange(1000, 10000)
        sentences.insert(len(sentences) // 2 + rng.randrange(-5, 6), f"The secret number is {secret}.")
        out.append({"id": f"text_long-{i}",
                    **_turns(" ".join(sentences) + "\n\nWhat is the secret number in the text above?",
                             f"The secret number is {secret}.")})
    return out


def generate_demo_data(root: Path, seed: int = 0, scale: int = 1) -> dict[str, Path]:
    """Write every demo source under ``root``; returns {source name: JSONL path}."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    make = {
        "captions": lambda r: _captions(root, r, 200 * scale),
        "multi_image": lambda r: _multi_image(root, r, 80 * scale),
        "comic": lambda r: _comic(root, r, 20 * scale),
        "video": lambda r: _video(root, r, 20 * scale),
        "text_short": lambda r: _text_short(r, 200 * scale),
        "text_long": lambda r: _text_long(r, 20 * scale),
    }
    return {name: _write(root, name, fn(random.Random(f"{seed}-{name}"))) for name, fn in make.items()}
