"""Hostile but realistic records and media for the data path (issue 29, point 2), seeded.

Every record must end as a planned sample or a skip with a named reason; this module makes the
records and the files they point at, and runs them through the planner, so a test (or a person:
``python -m tests.hostile --records 5000``) can list every distinct crash.

    pool = write_media(tmp / "media")                        # images, videos, frame folders, broken files
    recs = [hostile_record(random.Random(f"7/{i}"), pool) for i in range(100)]
    files = write_sources(tmp / "media", recs, random.Random(7))   # JSONL / JSON-array files

Running them (settings grid, the one planner adapter, crash collection) is :mod:`tests.hostile_run`.

Media (``write_media``): images of modes L, LA, P, P with transparency, I;16, I, F, 1, CMYK, RGBA,
RGB, animated GIF, sized 1x1 to 8000x3 / 3x8000 (pixel area capped: headers are what the planner
reads); hand-made PNG headers claiming huge sizes; truncated, random, empty and text files named as
images; tiny mp4s written with PyAV and broken ones; frame folders (png, jpg, empty, nested, odd
names). Records (``hostile_record``): every schema of :mod:`lvita.data.formats` plus shapes of none,
random roles and content types, 0 to 50k characters of text with unicode, lone surrogates and
literal special tokens, placeholder counts that do and do not match 0-20 images and 0-2 videos,
media given as relative / absolute paths, URLs, ``{"bytes", "path"}`` dicts, wrong types.

Trade-off: one media pool per directory, shared by every record (writing files per record would
make thousands of records slow); variety comes from how records point at it.
"""
from __future__ import annotations

import json
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

SPECIAL_TEXT = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<IMG_CONTEXT>", "<PATCH_CONTEXT>",
                "<VID_CONTEXT>", "<img>", "</img>", "<vid>", "<patch>"]
UNICODE = ["héllo wörld", "世界你好", "🙂🚀", "مرحبا", "a\u0301\u0302", "\u2028", "\u00a0", "\x00", "\ufeff",
           "\ud83d", "\t\r\n"]  # "\ud83d": a lone surrogate (an emoji cut in half upstream)
WORDS = "the a red circle image video what is this describe answer question left right".split()
ROLES = ["user", "assistant", "human", "gpt", "system"]
BAD_ROLES = ["unknown", None, 3, "Human", "", ["user"], {"r": 1}]


# -- media -------------------------------------------------------------------------------------

def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h and whose pixel data is a few bytes (reads, never decodes)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _image(mode: str, size: tuple[int, int]) -> Image.Image:
    if mode == "P+t":
        img = Image.new("P", size, 1)
        img.info["transparency"] = 1
        return img
    return Image.new(mode, size)


def _write_mp4(path: Path, frames: int, rate: int, w: int = 32, h: int = 24) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), i * 20 % 255, np.uint8), format="rgb24")
            for pkt in s.encode(frame):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)


@dataclass
class Pool:
    root: Path
    images: list[str]  # paths relative to root that decode
    bad_images: list[str]  # exist, but do not decode (some have good headers)
    videos: list[str]
    bad_videos: list[str]
    folders: list[str]  # frame folders (some empty or odd)
    blobs: list[bytes]  # image / video file contents, for {"bytes": ...} entries


def write_media(root: Path, seed: int = 0) -> Pool:
    """The files records point at, under ``root`` (same files for the same seed)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    images, bad, videos, bad_videos, folders = [], [], [], [], []
    sizes = [(1, 1), (1, 2), (2, 1), (8000, 3), (3, 8000), (112, 112), (97, 61), (2, 2000), (1200, 900)]
    formats = {"L": "png", "LA": "png", "P": "png", "P+t": "png", "I;16": "png", "1": "png", "RGBA": "png",
               "RGB": "jpg", "CMYK": "jpg", "I": "tif", "F": "tif"}
    for mode, ext in formats.items():
        for size in rng.sample(sizes, 4) + [(1, 1)]:
            name = f"img_{mode.replace(';', '').replace('+', '_')}_{size[0]}x{size[1]}.{ext}"
            _image(mode, size).save(root / name)
            images.append(name)
    gif = [Image.new("P", (40, 30), i) for i in range(3)]
    gif[0].save(root / "anim.gif", save_all=True, append_images=gif[1:])
    Image.new("RGB", (50, 50)).save(root / "weird name ü 1.webp")
    Image.new("RGB", (30, 20)).save(root / "really_png.jpg", format="PNG")  # extension lies
    images += ["anim.gif", "weird name ü 1.webp", "really_png.jpg"]
    good = (root / "img_RGBA_1x1.png").read_bytes() if (root / "img_RGBA_1x1.png").exists() else b""
    real = (root / images[0]).read_bytes()
    broken = {"truncated.png": real[: len(real) // 2], "random.png": rng.randbytes(300), "zero.png": b"",
              "text.png": b"just some text, not an image\n", "random.jpg": rng.randbytes(50),
              "huge_header.png": png_header(20000, 20000),  # over PIL's decompression-bomb limit
              "big_header.png": png_header(12000, 8000),  # a bomb warning; pixels missing
              "wide_header.png": png_header(100000, 1)}
    for name, data in broken.items():
        (root / name).write_bytes(data)
        bad.append(name)
    (root / "a_dir.png").mkdir(exist_ok=True)
    bad.append("a_dir.png")
    for name, frames, rate in (("v8.mp4", 8, 4), ("v1.mp4", 1, 1), ("v30.mp4", 30, 30), ("v3_slow.mp4", 3, 1)):
        _write_mp4(root / name, frames, rate)
        videos.append(name)
    v = (root / "v8.mp4").read_bytes()
    for name, data in {"cut.mp4": v[: len(v) // 3], "noise.mp4": rng.randbytes(500), "empty.mp4": b"",
                       "png.mp4": real, "text.avi": b"not a video"}.items():
        (root / name).write_bytes(data)
        bad_videos.append(name)
    layouts = {"frames_png": [f"frame{i}.png" for i in (1, 2, 10, 3)], "frames_jpg": ["a.jpg", "b.jpeg"],
               "frames_nested": ["x/1.png", "x/y/2.png", "3.png"], "frames_upper": ["A.PNG", "B.JPG"],
               "frames odd ü": ["f 1.png", "f 02.png", ".hidden.png"], "frames_mixed": ["1.png", "notes.txt"],
               "frames_empty": []}
    for folder, names in layouts.items():
        (root / folder).mkdir(exist_ok=True)
        for n in names:
            (root / folder / n).parent.mkdir(parents=True, exist_ok=True)
            if n.endswith("txt"):
                (root / folder / n).write_text("hello")
            else:
                Image.new("RGB", (16, 12)).save(root / folder / n, format="JPEG" if "j" in n.lower()[-4:] else "PNG")
        folders.append(folder)
    (root / "frames_broken").mkdir(exist_ok=True)
    (root / "frames_broken" / "1.png").write_bytes(b"nope")
    folders.append("frames_broken")
    blobs = [real, good, v, b"", rng.randbytes(64), (root / "anim.gif").read_bytes()]
    return Pool(root, images, bad, videos, bad_videos, folders, blobs)


def media_entry(rng: random.Random, pool: Pool, kind: str, embed: bool):
    """One images[] / videos[] entry: mostly a good relative path, else any hostile form."""
    r = rng.random()
    good = pool.images if kind == "image" else pool.videos + pool.folders
    broken = pool.bad_images if kind == "image" else pool.bad_videos + pool.folders[-2:]
    if r < 0.55:
        return rng.choice(good)
    if r < 0.62:
        return str(pool.root / rng.choice(good))  # absolute
    if r < 0.70:
        return rng.choice(broken)
    if r < 0.74:
        return rng.choice(["missing.png", "sub/missing.mp4", "/nonexistent/abs.png", "x" * 300 + ".png"])
    if r < 0.77:
        return rng.choice(["https://example.com/a.png", "s3://bucket/v.mp4", "file:///tmp/a.png"])
    if r < 0.85:
        d = rng.choice([{"path": rng.choice(good)}, {"path": rng.choice(good), "bytes": None}, {},
                        {"bytes": "not bytes"}, {"path": ""}, {"path": 5}, {"bytes": None, "path": None}])
        if embed and rng.random() < 0.6:  # what a parquet/arrow Image feature gives (Records only)
            d = {"bytes": rng.choice(pool.blobs), "path": rng.choice(["x.png", None])}
        return d
    if r < 0.88 and kind == "video":
        return rng.choice(pool.images)  # an image where a video belongs
    return rng.choice([0, 7, None, [], ["a.png"], 1.5, True, "", " ", ".", "a\x00b.png", "media"])


# -- records -----------------------------------------------------------------------------------

def text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.05:
        return ""
    if r < 0.08:
        return rng.choice([" ", "\n\n", "\t"])
    if r < 0.10:
        return " ".join(rng.choices(WORDS, k=rng.randrange(8000, 10000)))  # ~50k characters
    parts = rng.choices(WORDS, k=rng.randrange(1, 30))
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(SPECIAL_TEXT + UNICODE))
    return " ".join(parts)


def content(rng: random.Random, s: str):
    """Turn content: mostly a string, else None, an int, a list of parts or a dict."""
    r = rng.random()
    if r < 0.88:
        return s
    if r < 0.94:
        parts = [{"type": "text", "text": p} if p not in ("<image>", "<video>") else {"type": p[1:-1]}
                 for p in s.replace("<image>", "\0<image>\0").replace("<video>", "\0<video>\0").split("\0") if p]
        if rng.random() < 0.3:
            parts.append(rng.choice([{"type": "audio"}, "text", {"type": "text", "text": 3}, None]))
        return parts
    return rng.choice([None, 42, {"text": s}, 1.0])


def _place(rng: random.Random, turns: list[list], n_img: int, n_vid: int) -> None:
    """Put placeholders into random turns (any role: user, assistant, system)."""
    for ph in ["<image>"] * n_img + ["<video>"] * n_vid:
        t = turns[rng.randrange(len(turns))] if rng.random() < 0.2 else next(
            (t for t in turns if t[0] in ("user", "human")), turns[0])
        t[1] = (ph + rng.choice(["\n", " ", ""]) + t[1]) if rng.random() < 0.7 else (t[1] + " " + ph)


def _counts(rng: random.Random, n_media: int) -> int:
    r = rng.random()
    return n_media if r < 0.65 else 0 if r < 0.87 else rng.randrange(0, 21)


def hostile_record(rng: random.Random, pool: Pool, embed: bool = False):
    """One record. ``embed``: entries may hold real bytes (only for Record objects, not JSON files)."""
    if rng.random() < 0.02:
        return rng.choice([[1, 2], 3, "a string", None, [], {"messages": "hi"}, {"conversations": {}},
                           {"texts": None}, {"id": 1}, {"messages": None, "images": ["a.png"]}])
    n_turns = rng.choice([0, 1, 2, 2, 2, 3, 4, 6]) if rng.random() < 0.15 else rng.choice([2, 2, 4])
    roles = [rng.choice(BAD_ROLES) if rng.random() < 0.03 else
             ("system" if rng.random() < 0.05 else ["user", "assistant"][i % 2]) for i in range(n_turns)]
    turns = [[r, text(rng)] for r in roles]
    n_img = rng.choice([0, 0, 0, 1, 1, 2, 3]) if rng.random() < 0.9 else rng.randrange(0, 21)
    n_vid = rng.choice([0, 0, 0, 0, 1, 2])
    if turns:
        _place(rng, turns, _counts(rng, n_img), _counts(rng, n_vid))
    images = [media_entry(rng, pool, "image", embed) for _ in range(n_img)]
    videos = [media_entry(rng, pool, "video", embed) for _ in range(n_vid)]
    schema = rng.choice(["messages"] * 3 + ["sharegpt"] * 2 + ["sharegpt_rc", "cauldron", "firefly", "instruction",
                                                                "lima"]) if rng.random() < 0.97 else "none"
    alias = {"user": "human", "assistant": "gpt"}
    if schema == "messages":
        rec = {"messages": [{"role": r, "content": content(rng, s)} for r, s in turns]}
    elif schema in ("sharegpt", "sharegpt_rc"):
        k = ("from", "value") if schema == "sharegpt" else ("role", "content")
        rec = {"conversations": [{k[0]: alias.get(r, r) if isinstance(r, str) and schema == "sharegpt" else r,
                                  k[1]: content(rng, s)} for r, s in turns]}
    elif schema in ("cauldron", "firefly"):
        pairs = [{"user" if schema == "cauldron" else "human": turns[i][1],
                  "assistant": content(rng, turns[i + 1][1]) if i + 1 < len(turns) else None}
                 for i in range(0, len(turns), 2)]
        rec = {"texts": pairs} if schema == "cauldron" else {"conversation": pairs}
    elif schema == "instruction":
        s = [t[1] for t in turns] + [""] * 3
        rec = {rng.choice(["instruction", "query", "question", "prompt", "input"]): content(rng, s[0]),
               rng.choice(["output", "response", "answer", "completion"]): content(rng, s[1])}
        if rng.random() < 0.3:
            rec[rng.choice(["input", "context", "system", "system_prompt"])] = content(rng, s[2])
    elif schema == "lima":
        rec = {"conversations": [content(rng, s) for _, s in turns]}
    else:
        rec = {rng.choice(["text", "caption", "data"]): text(rng)}
    if images or rng.random() < 0.05:
        rec[rng.choice(["images", "images", "image"])] = (images[0] if len(images) == 1 and rng.random() < 0.3
                                                          else rng.choice([images, images, None, "", {}]))
    if videos:
        rec[rng.choice(["videos", "video"])] = videos if len(videos) > 1 or rng.random() < 0.7 else videos[0]
    rec["id"] = rng.choice([rng.randrange(10 ** 6), f"r{rng.randrange(99)}", None, ["x"]])
    return rec


BREAKERS = [b'{"messages": "\xff\xfe"}', b"[" * 100000 + b"]" * 100000]  # invalid UTF-8; nested too deep


def write_sources(root: Path, records: list, rng: random.Random, breakers: bool = False) -> list[str]:
    """Records into JSONL and JSON-array files under ``root`` (with malformed / blank JSONL lines;
    ``breakers``: also invalid UTF-8 and too-deep lines, which crash the JSONL reader today)
    -> the file names, for ``data.sources[].paths``. Media paths are relative to ``root``."""
    jl, arr = [], []
    for rec in records:
        (arr if rng.random() < 0.3 else jl).append(rec)
    bad_lines = [b"{not json", b"", b"   ", b"[1, 2", b'{"messages": [}', b"null", b"\x00", b"\xef\xbb\xbf{}"]
    bad_lines += BREAKERS if breakers else []
    with open(root / "records.jsonl", "wb") as f:
        for rec in jl:  # non-ASCII as UTF-8 (lone surrogates as CESU-8 bytes) or as \\u escapes
            f.write(json.dumps(rec, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass") + b"\n")
            if rng.random() < (0.01 if not breakers else 0.03):
                f.write(rng.choice(bad_lines) + b"\n")
    (root / "records.json").write_text(json.dumps(arr, indent=rng.choice([None, 1])) if arr else "[]",
                                       encoding="utf-8")
    return ["records.jsonl"] + (["records.json"] if arr else [])
