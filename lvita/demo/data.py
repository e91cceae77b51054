"""Synthetic multi-source demo dataset: JSONL samples plus the PNG/MP4 files they reference.

Owns: drawing the pictures and videos and writing one ``<source>.jsonl`` per source under a root.

    from lvita.demo.data import generate_demo_data
    generate_demo_data(Path("demo_out/data"), seed=0, scale=1)   # {source: jsonl path}
    python -c "from pathlib import Path; from lvita.demo.data import generate_demo_data as g; print(g(Path('d')))"

Sources: ``captions`` (one image; ~10% in LLaVA ``conversations`` format), ``multi_image``
(2-4 images, comparison question), ``comic`` (6-12 panels, ordered summary), ``video`` (mp4 of a
moving shape), ``text_short`` (arithmetic, instructions, system prompts, multi-turn) and
``text_long`` (1500-4000 words with a planted secret number).

Trade-off: content is deliberately trivial (flat shapes, template sentences) so it is generated in
seconds on a CPU, byte-identical for a seed (seeded ``random.Random`` per source, fixed PNG/codec
settings, bit-exact muxing, no timestamps) and learnable by a tiny model; it is no substitute for
real data when measuring model quality.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (230, 210, 40), "purple": (140, 60, 170), "orange": (240, 140, 30)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250), "grey": (150, 150, 150), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
COUNTS = {"captions": 200, "multi_image": 80, "comic": 20, "video": 20, "text_short": 200, "text_long": 20}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
VIDEO_FPS, VIDEO_SIZE = 8, 64

Shape = tuple[str, str, str]  # (colour, shape, quadrant)


def _draw(d: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _picture(rng: random.Random, lo: int = 64, hi: int = 160, n: int | None = None) -> tuple[Image.Image, str, list[Shape]]:
    """Random-size image with 1-3 shapes, each inside its own quadrant (corners stay background)."""
    w, h = rng.randint(lo, hi), rng.randint(lo, hi)
    bg = rng.choice(list(BACKGROUNDS))
    img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    d = ImageDraw.Draw(img)
    shapes: list[Shape] = []
    for quad in rng.sample(QUADRANTS, n or rng.randint(1, 3)):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        cw, ch = w // 2, h // 2
        s = rng.randint(int(0.45 * min(cw, ch)), int(0.8 * min(cw, ch)))
        x0 = (cw if "right" in quad else 0) + rng.randint(3, cw - s - 3)
        y0 = (ch if "bottom" in quad else 0) + rng.randint(3, ch - s - 3)
        _draw(d, shape, (x0, y0, x0 + s, y0 + s), COLOURS[colour])
        shapes.append((colour, shape, quad))
    return img, bg, shapes


def _save_png(img: Image.Image, root: Path, rel: str) -> str:
    img.save(root / rel, format="PNG", compress_level=6)  # pillow writes no time chunk
    return rel


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _phrase(s: Shape) -> str:
    return f"{_a(s[0])} {s[1]} in the {s[2]}"


def _list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(bg: str, shapes: list[Shape]) -> str:
    """Caption naming count, colours, shapes, positions and background."""
    n = len(shapes)
    noun = "shape" if n == 1 else "shapes"
    return f"{NUMBER_WORDS[n].capitalize()} {noun} on a {bg} background: {_list([_phrase(s) for s in shapes])}."


def _sample(sid: str, turns: list[tuple[str, str]], images: list[str] | None = None,
            videos: list[str] | None = None, llava: bool = False) -> dict:
    """One sample; ``turns`` are (role, text) with roles system/user/assistant."""
    out: dict = {"id": sid}
    if llava:
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        out["conversations"] = [{"from": names[r], "value": t} for r, t in turns]
    else:
        out["messages"] = [{"role": r, "content": t} for r, t in turns]
    if images:
        out["images"] = images
    if videos:
        out["videos"] = videos
    return out


def _captions(rng: random.Random, root: Path, n: int) -> list[dict]:
    llava = set(rng.sample(range(n), max(1, round(n * 0.1))))
    prompts = ("Describe the image.", "What do you see in this picture?", "Write a short caption for this image.")
    out = []
    for i in range(n):
        img, bg, shapes = _picture(rng)
        rel = _save_png(img, root, f"images/captions-{i:06d}.png")
        turns = [("user", f"<image>\n{rng.choice(prompts)}"), ("assistant", describe(bg, shapes))]
        out.append(_sample(f"captions-{i}", turns, images=[rel], llava=i in llava))
    return out


def _multi_image(rng: random.Random, root: Path, n: int) -> list[dict]:
    out = []
    for i in range(n):
        pics = [_picture(rng) for _ in range(rng.randint(2, 4))]
        rels = [_save_png(img, root, f"images/multi-{i:06d}-{j}.png") for j, (img, _, _) in enumerate(pics)]
        k = len(pics)
        questions: list[tuple[str, str]] = []
        for kind in SHAPES:
            counts = [sum(s[1] == kind for s in shapes) for _, _, shapes in pics]
            if counts.count(max(counts)) == 1:
                best = counts.index(max(counts))
                questions.append((f"Which image has the most {kind}s?",
                                  f"Image {best + 1} has the most {kind}s ({counts[best]})."))
        totals = [len(shapes) for _, _, shapes in pics]
        if totals.count(max(totals)) == 1:
            best = totals.index(max(totals))
            questions.append(("Which image has the most shapes?", f"Image {best + 1} has the most shapes ({totals[best]})."))
        colour = rng.choice(list(COLOURS))
        m = sum(any(s[0] == colour for s in shapes) for _, _, shapes in pics)
        questions.append((f"How many images show {_a(colour)} shape?", f"{m} of the {k} images show {_a(colour)} shape."))
        q, a = rng.choice(questions)
        prompt = "".join(f"Image {j + 1}: <image>\n" for j in range(k)) + q
        out.append(_sample(f"multi_image-{i}", [("user", prompt), ("assistant", a)], images=rels))
    return out


def _comic(rng: random.Random, root: Path, n: int) -> list[dict]:
    out = []
    for i in range(n):
        k = rng.randint(6, 12)
        rels, sentences = [], []
        for j in range(k):
            img, bg, shapes = _picture(rng, 64, 96, n=rng.randint(1, 2))
            rels.append(_save_png(img, root, f"images/comic-{i:06d}-{j:02d}.png"))
            lead = "First" if j == 0 else "Finally" if j == k - 1 else "Next"
            verb = "appears" if len(shapes) == 1 else "appear"
            sentences.append(f"{lead}, in panel {j + 1}, {_list([_phrase(s) for s in shapes])} {verb} on a {bg} background.")
        prompt = "".join(f"Panel {j + 1}: <image>\n" for j in range(k)) + "Summarize the story told by these panels in order."
        answer = f"The story has {k} panels. " + " ".join(sentences)
        out.append(_sample(f"comic-{i}", [("user", prompt), ("assistant", answer)], images=rels))
    return out


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = VIDEO_FPS) -> None:
    """Encode RGB uint8 frames as MPEG-4 Part 2 in MP4, single-threaded and bit-exact."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.options = {"flags": "+bitexact", "qscale": "3"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


MOTIONS = {"left": ("to the left", "from the right to the left"), "right": ("to the right", "from the left to the right"),
           "up": ("up", "from the bottom to the top"), "down": ("down", "from the top to the bottom")}


def _video(rng: random.Random, root: Path, n: int) -> list[dict]:
    out = []
    for i in range(n):
        t, s = rng.randint(8, 16), rng.randint(12, 18)
        direction, shape = rng.choice(list(MOTIONS)), rng.choice(SHAPES)
        colour, bg = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        fixed, lo, hi = rng.randint(4, VIDEO_SIZE - s - 4), 4, VIDEO_SIZE - s - 4
        frames = []
        for f in range(t):
            p = lo + (hi - lo) * f // (t - 1)
            p = hi + lo - p if direction in ("left", "up") else p
            x, y = (p, fixed) if direction in ("left", "right") else (fixed, p)
            img = Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), BACKGROUNDS[bg])
            _draw(ImageDraw.Draw(img), shape, (x, y, x + s, y + s), COLOURS[colour])
            frames.append(np.asarray(img))
        rel = f"videos/video-{i:06d}.mp4"
        write_mp4(root / rel, frames)
        word, path = MOTIONS[direction]
        answer = f"The {colour} {shape} moves {word}, {path} of the frame."
        out.append(_sample(f"video-{i}", [("user", "<video>\nWhere does the shape move?"), ("assistant", answer)], videos=[rel]))
    return out


SYSTEMS = ("You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
           "You are a careful tutor who shows the result clearly.")
WORDS = ("apple", "river", "garden", "lantern", "bridge", "market", "window", "harbour", "pencil", "cloud")


def _short_qa(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(7)
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if kind == 0:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", f"{a} - {b} = {a - b}."
    if kind == 2:
        a, b = a % 13, b % 13
        return f"What is {a} * {b}?", f"{a} * {b} = {a * b}."
    w = rng.choice(WORDS)
    if kind == 3:
        k = rng.randint(2, 4)
        return f"Repeat the word '{w}' {NUMBER_WORDS[k]} times.", " ".join([w] * k)
    if kind == 4:
        return f"Spell the word '{w}' backwards.", w[::-1]
    if kind == 5:
        return f"Write '{w}' in capital letters.", w.upper()
    nums = [rng.randint(0, 50) for _ in range(rng.randint(3, 6))]
    return f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}.", ", ".join(map(str, sorted(nums)))


def _text_short(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        turns: list[tuple[str, str]] = [("system", rng.choice(SYSTEMS))] if rng.random() < 0.3 else []
        for _ in range(2 if rng.random() < 0.25 else 1):
            q, a = _short_qa(rng)
            turns += [("user", q), ("assistant", a)]
        out.append(_sample(f"text_short-{i}", turns))
    return out


SUBJECTS = ("The old fisherman", "A young painter", "The village baker", "My neighbour", "The tired traveller",
            "A curious child", "The librarian", "The gardener", "A quiet student", "The ship's captain")
VERBS = ("carried", "painted", "found", "repaired", "described", "remembered", "watched", "cleaned", "sold", "drew")
OBJECTS = ("a wooden box", "the broken lantern", "an old map", "a basket of pears", "the blue kite",
           "a letter from home", "the heavy anchor", "a jar of honey", "the stone bench", "a small clock")
PLACES = ("near the river", "in the market", "behind the library", "on the old bridge", "at the harbour",
          "under a tall tree", "beside the mountain path", "in the quiet garden", "by the open window")
TIMES = ("in the morning", "before sunset", "late at night", "after the rain", "during the festival",
         "on a cold day", "at noon", "while the bells rang")
EXTRAS = ("Nobody said a word about it.", "The wind was soft and warm.", "It had been a long week.",
          "Birds circled slowly overhead.", "Somewhere a dog was barking.", "The streets were nearly empty.")


def _filler(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return rng.choice(EXTRAS)
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
    return s + (f" {rng.choice(TIMES)}." if rng.random() < 0.6 else ".")


def _text_long(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        target, words, sents = rng.randint(1500, 4000), 0, []
        secret = rng.randint(10000, 99999)
        planted = f"Remember this carefully: the secret number is {secret}."
        while words + len(planted.split()) < target:
            sents.append(_filler(rng))
            words += len(sents[-1].split())
        sents.insert(rng.randint(int(0.3 * len(sents)), int(0.7 * len(sents))), planted)
        paras, j = [], 0
        while j < len(sents):
            step = rng.randint(4, 9)
            paras.append(" ".join(sents[j:j + step]))
            j += step
        text = "\n\n".join(paras) + "\n\nWhat is the secret number mentioned in the text above?"
        out.append(_sample(f"text_long-{i}", [("user", text), ("assistant", f"The secret number is {secret}.")]))
    return out


def generate_demo_data(root: Path, seed: int = 0, scale: int = 1) -> dict[str, Path]:
    """Write every source's JSONL (and media) under ``root``; returns {source: jsonl path}."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    makers = {
        "captions": lambda r, k: _captions(r, root, k), "multi_image": lambda r, k: _multi_image(r, root, k),
        "comic": lambda r, k: _comic(r, root, k), "video": lambda r, k: _video(r, root, k),
        "text_short": _text_short, "text_long": _text_long}
    paths: dict[str, Path] = {}
    for name, make in makers.items():
        rng = random.Random(f"lvita-demo:{seed}:{name}")  # str seeds are stable across processes
        samples = make(rng, COUNTS[name] * scale)
        path = root / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        paths[name] = path
    return paths
