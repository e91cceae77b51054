"""A small copy of every published layout of Table 1's data, written on the fly (no downloads).

    sources, expect = write_layouts(root)   # stage ``data.sources`` entries; {record id: outcome}

``expect[id]`` is ``("ok", answer)`` (the labelled text is ``answer`` + ``<|im_end|>`` per assistant
turn, joined) or ``(reason, None)`` for a record that must be skipped with that reason; records whose
pixels only fail when decoded are ``("bad_media_at_decode", answer)``. Images are real files written
with pillow (every awkward mode), parquet and arrow with ``datasets`` (the Image feature), the video a
real mpeg4 file written with PyAV.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def _image(path: Path, size=(96, 80), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(np.full((h, w), 40000, dtype=np.uint16))
    elif mode == "P":
        img = rgb.convert("P")
        save.setdefault("transparency", 0)
    elif mode == "GIF":
        frames = [rgb.convert("P"), Image.new("RGB", size, "blue").convert("P")]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        return path
    else:
        img = rgb.convert(mode)
    img.save(path, **save)
    return path


def _png_bytes(size=(96, 80), colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_video(path: Path, frames: int = 8, fps: int = 4, size: int = 64) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            arr = np.full((size, size, 3), i * 30 % 256, dtype=np.uint8)  # every frame another grey
            out.mux(s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(s.encode())
    return path


def write_frame_videos(root: Path, n: int, frames: int, size=(96, 80)) -> Path:
    """``n`` frame-directory videos ``v0`` .. (PNG frames, a white box moving right on a colour of
    its own) and ``videos.jsonl`` with one question per video."""
    from PIL import ImageDraw

    for v in range(n):
        d = root / f"v{v}"
        d.mkdir(parents=True)
        for f in range(frames):
            img = Image.new("RGB", size, (37 * v % 255, 7 * f % 255, 120))
            x = 5 * f % max(size[0] - 20, 1)
            ImageDraw.Draw(img).rectangle([x, 10, x + 20, 40], fill="white")
            img.save(d / f"{f:04d}.png")
    with open(root / "videos.jsonl", "w") as fh:
        for v in range(n):
            fh.write(json.dumps({"videos": [f"v{v}"], "messages": [
                {"role": "user", "content": "<video>\nWhat moves?"},
                {"role": "assistant", "content": f"A white box, video {v}."}]}) + "\n")
    return root


def _conv(q: str, a: str, sys_: str | None = None) -> list[dict]:
    head = [{"from": "system", "value": sys_}] if sys_ else []
    return head + [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _array(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")


def write_layouts(root: Path) -> tuple[list[dict], dict]:
    import datasets
    from datasets import Features, Image as HFImage, Sequence, Value

    root = Path(root)
    expect: dict = {}

    def ok(rid, answer):
        expect[rid] = ("ok", answer)

    # Long-VITA's own JSON arrays: messages + images/videos, media under a separate folder.
    lv = root / "long-vita"
    _image(lv / "media" / "a.png")
    write_video(lv / "media" / "clip.mp4")
    _array(lv / "longvita_stage2.json", [
        {"id": "lv-img", "images": ["a.png"], "messages": [{"role": "user", "content": "<image>\nWhat is it?"},
                                                          {"role": "assistant", "content": "Noise."}]},
        {"id": "lv-vid", "videos": ["clip.mp4"], "messages": [{"role": "user", "content": "<video>\nSummarise."},
                                                             {"role": "assistant", "content": "It brightens."}]},
        {"id": "lv-txt", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ])
    for rid, a in (("lv-img", "Noise."), ("lv-vid", "It brightens."), ("lv-txt", "Hello.")):
        ok(rid, a)

    # LLaVA-665K / ShareGPT4V / M4-Instruct: a JSON array, `image` string or list, from/value turns.
    im = root / "llava" / "images"
    for name, kw in (("coco/train2017/0.jpg", {}), ("coco/train2017/wide.jpg", {"size": (240, 100)}),
                     ("gqa/images/cmyk.jpg", {"mode": "CMYK"}), ("ocr/gray.png", {"mode": "L"}),
                     ("ocr/rgba.png", {"mode": "RGBA"}), ("ocr/palette.png", {"mode": "P"}),
                     ("ocr/deep.png", {"mode": "I;16"}), ("web/anim.gif", {"mode": "GIF"})):
        _image(im / name, **kw)
    good = (im / "coco/train2017/0.jpg").read_bytes()
    (im / "coco/train2017/truncated.jpg").write_bytes(good[: len(good) // 2])
    llava = [
        ("ll-0", "coco/train2017/0.jpg", "<image>\nWhat is shown?", "Noise.", "ok"),
        ("ll-end", "coco/train2017/wide.jpg", "What is shown here?\n<image>", "A wide image.", "ok"),
        ("ll-text", None, "Tell me a joke.", "No.", "ok"),
        ("ll-noph", "coco/train2017/0.jpg", "Describe the picture.", "Random pixels.", "ok"),
        ("ll-multi", ["coco/train2017/0.jpg", "coco/train2017/wide.jpg"], "<image>\n<image>\nCompare.", "Sizes.", "ok"),
        ("ll-cmyk", "gqa/images/cmyk.jpg", "<image>\nColour?", "Mixed.", "ok"),
        ("ll-gray", "ocr/gray.png", "<image>\nGray?", "Yes.", "ok"),
        ("ll-rgba", "ocr/rgba.png", "<image>\nAlpha?", "Yes.", "ok"),
        ("ll-palette", "ocr/palette.png", "<image>\nPalette?", "Yes.", "ok"),
        ("ll-16bit", "ocr/deep.png", "<image>\nDeep?", "Yes.", "ok"),
        ("ll-gif", "web/anim.gif", "<image>\nAnimated?", "Yes.", "ok"),
        ("ll-missing", "coco/train2017/missing.jpg", "<image>\nWhere?", "Gone.", "bad_media"),
        ("ll-truncated", "coco/train2017/truncated.jpg", "<image>\nHalf?", "Cut.", "bad_media_at_decode"),
        ("ll-twice", "coco/train2017/0.jpg", "<image>\nOne and <image> two?", "One.", "placeholder_mismatch"),
        ("ll-url", "http://images.cocodataset.org/x.jpg", "<image>\nWeb?", "No.", "bad_media"),
        ("ll-form", 7, "<image>\nNumber?", "No.", "bad_media"),
    ]
    records = []
    for rid, image, q, a, outcome in llava:
        rec = {"id": rid, "conversations": _conv(q, a, "Be brief." if rid == "ll-text" else None)}
        if image is not None:
            rec["image"] = image
        records.append(rec)
        expect[rid] = (outcome, a if outcome in ("ok", "bad_media_at_decode") else None)
    _array(root / "llava" / "llava_v1_5_mix665k.json", records)

    # LLaVA-Video-178K: `video` with an <image> placeholder; a frame folder; a missing video.
    vd = root / "llava-video" / "videos"
    write_video(vd / "academic/clip.mp4")
    for i in range(5):
        _image(vd / "frames/clip_frames" / f"{i:03d}.jpg", size=(64, 64))
    _array(root / "llava-video" / "0_30_s_academic.json", [
        {"id": "vid-0", "video": "academic/clip.mp4", "data_source": "academic",
         "conversations": _conv("<image>\nWhat happens?", "It gets brighter.")},
        {"id": "vid-frames", "video": "frames/clip_frames", "conversations": _conv("<image>\nFrames?", "Five.")},
        {"id": "vid-missing", "video": "academic/missing.mp4", "conversations": _conv("<image>\nGone?", "Yes.")},
    ])
    ok("vid-0", "It gets brighter."), ok("vid-frames", "Five.")
    expect["vid-missing"] = ("bad_media", None)

    # LLaVA-ReCap / LLaVA-OneVision: HF parquet with the Image feature ({"bytes", "path"}).
    conv_feat = [{"from": Value("string"), "value": Value("string")}]
    feats = Features({"id": Value("string"), "image": HFImage(), "conversations": conv_feat,
                      "data_source": Value("string")})
    rows = {"id": ["rc-0", "rc-1", "rc-text"],
            "image": [{"bytes": _png_bytes((96, 80)), "path": "0.png"},
                      {"bytes": _png_bytes((240, 100), "green"), "path": "1.png"}, None],
            "conversations": [_conv("<image>\nCaption.", "Red."), _conv("<image>\nCaption.", "Green."),
                              _conv("Text only.", "Fine.")],
            "data_source": ["recap"] * 3}
    (root / "recap" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(root / "recap/data/train-00000-of-00001.parquet"))
    ok("rc-0", "Red."), ok("rc-1", "Green."), ok("rc-text", "Fine.")
    # ... and the same rows written by save_to_disk (arrow, memory-mapped through `datasets`).
    ov = dict(rows, id=["ov-0", "ov-1", "ov-text"])
    datasets.Dataset.from_dict(ov, features=feats).save_to_disk(str(root / "onevision-disk"))
    ok("ov-0", "Red."), ok("ov-1", "Green."), ok("ov-text", "Fine.")

    # the_cauldron / Docmatix: `images` list + `texts` [{user, assistant, source}], no placeholders.
    cfeats = Features({"images": Sequence(HFImage()), "texts": [{"user": Value("string"),
                       "assistant": Value("string"), "source": Value("string")}]})
    for subset, rid, imgs, turns in (
            ("ai2d", "cd-0", [_png_bytes()], [("Which label?", "B.")]),
            ("vqav2", "cd-1", [_png_bytes(), _png_bytes((240, 100))], [("Two images?", "Yes."), ("Same?", "No.")])):
        d = root / "the_cauldron" / subset
        d.mkdir(parents=True)
        datasets.Dataset.from_dict({"images": [[{"bytes": b, "path": None} for b in imgs]],
                                    "texts": [[{"user": u, "assistant": a, "source": subset} for u, a in turns]]},
                                   features=cfeats).to_parquet(str(d / "train-00000-of-00001.parquet"))
        expect[rid] = ("ok", "".join(a + "<|im_end|>" for _, a in turns)[: -len("<|im_end|>")])

    # Instruction-style text.
    t = root / "text"
    t.mkdir()
    (t / "databricks-dolly-15k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "Summarise.", "context": "Dolly is a sheep.", "response": "A sheep.",
         "category": "summarization"},
        {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}]))
    _array(t / "MetaMathQA-395K.json", [{"query": "1+1?", "response": "2.", "type": "GSM_AnsAug"}])
    _array(t / "MathInstruct.json", [{"instruction": "2+2?", "output": "4.", "source": "data/CoT/gsm.json"}])
    datasets.Dataset.from_dict({"question": ["3+3?"], "answer": ["6."]}).to_parquet(str(t / "orca-math.parquet"))
    lima = {"conversations": ["Hi?", "Hello.", "Bye?", "Bye."], "source": "x"}
    (t / "lima.jsonl").write_text(json.dumps(lima) + "\n")
    _array(t / "openhermes2_5.json", [{"conversations": _conv("Capital of France?", "Paris.", "You are wise.")}])
    _array(t / "LongAlpaca-12k.json", [{"instruction": "Read the paper.", "input": "A long paper.", "output": "Read."}])
    (t / "LongAlign-10k.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Long?"},
                                                                    {"role": "assistant", "content": "Yes."}]}) + "\n")
    datasets.Dataset.from_dict({"input": ["Write a story."], "output": ["Once."], "source": ["x"], "subset": ["y"]}
                               ).to_parquet(str(t / "LongForm-train.parquet"))  # the input alone is the prompt
    (t / "LongQLoRA.jsonl").write_text(json.dumps({"conversation": [{"human": "Q1", "assistant": "A1."},
                                                                    {"human": "Q2", "assistant": "A2."}]}) + "\n")
    for a in ("A sheep.", "Blue.", "2.", "4.", "6.", "Hello.<|im_end|>Bye.", "Paris.", "Read.", "Yes.", "Once.",
              "A1.<|im_end|>A2."):
        ok(f"text:{a}", a)

    sources = [
        {"name": "long-vita", "paths": ["long-vita/*.json"], "media_root": "long-vita/media"},
        {"name": "llava", "paths": ["llava/llava_v1_5_mix665k.json"], "media_root": "llava/images"},
        {"name": "llava-video", "paths": ["llava-video"], "media_root": "llava-video/videos"},
        {"name": "recap", "paths": ["recap"]},
        {"name": "onevision", "paths": ["onevision-disk"]},
        {"name": "cauldron", "paths": ["the_cauldron"]},
        {"name": "text", "paths": ["text"]},
    ]
    return sources, expect
