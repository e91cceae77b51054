"""Samples with videos end to end: the template (one <img>...</img> group per sampled frame), the
planner/packer (frame counts from the header), the stream (frames decoded into tiles in token order),
a training step on the packed batch (loss and gradients reach the vision encoder through the
frames), and ``lvita generate --video`` (the same answer as the prompt built by hand). The videos
are written here with PyAV, as lvita/demo/dataset.py writes the demo's."""
from __future__ import annotations

import json

import pytest
import torch

from tests.synthetic import tiny_input
from lvita.data.input_format import InputFormat
from lvita.config.schema import DataConfig, SourceConfig
from lvita.data.media import normalise, video_frame_count, video_tiles
from lvita.data.stream import DataStream, collate
from lvita.data.template import IGNORE
from lvita.data.tokenizer import load_tokenizer, special_token_ids
from tests.layouts import write_video

TPT, TILE, FPS, MAX_FRAMES = 16, 112, 2.0, 4  # tiny preset: 16 tokens per 112 px tile


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    (root / "v").mkdir()
    write_video(root / "v" / "short.mp4", frames=8, fps=8)  # 1 s at 8 fps: 2 frames at 2 fps
    write_video(root / "v" / "long.mp4", frames=16, fps=8)  # 2 s: 4 frames
    recs = [{"id": f"vid-{i}", "videos": [f"v/{name}.mp4"], "messages": [
        {"role": "user", "content": "<video>\nHow does the picture change?"},
        {"role": "assistant", "content": f"It gets brighter ({name})."}]} for i, name in enumerate(["short", "long"])]
    (root / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    t = load_tokenizer(tokenizer_dir)
    return t, special_token_ids(t)


@pytest.fixture(scope="module")
def batch(videos, tok):
    t, sp = tok
    cfg = DataConfig(root=str(videos), seq_length=256, sources=[SourceConfig("videos", ["videos.jsonl"])],
                     max_frames=MAX_FRAMES, video_fps=FPS, pack_buffer=2)
    stream = DataStream(cfg, tiny_input(t), global_batch=1, seed=0, log=lambda *a: None)
    rows = stream.next_global_batch()
    stream.close()
    return rows


def test_video_samples_through_template_packer_and_stream(videos, tok, batch):
    t, sp = tok
    (seq,) = batch
    assert sorted(s["id"] for s in seq.samples) == ["vid-0", "vid-1"]  # both packed in one sequence
    frames = {p.id: p.media[0].frames for p in seq.plans}
    assert frames == {"vid-0": video_frame_count(videos / "v" / "short.mp4", MAX_FRAMES, FPS),
                      "vid-1": video_frame_count(videos / "v" / "long.mp4", MAX_FRAMES, FPS)} == {"vid-0": 2, "vid-1": 4}
    ids = seq.input_ids.tolist()
    expected_tiles = []
    for plan, meta in zip(seq.plans, seq.samples):
        part = ids[meta["start"]:meta["end"]]
        n = frames[plan.id]
        # the template: one <img> [IMG_CONTEXT x 16] </img> group per frame
        assert part.count(sp["img_start"]) == part.count(sp["img_end"]) == n
        assert part.count(sp["img_context"]) == n * TPT == meta["image_tokens"]
        first = part.index(sp["img_start"])
        assert part[first:first + n * (TPT + 2)] == ([sp["img_start"]] + [sp["img_context"]] * TPT + [sp["img_end"]]) * n
        learned = [part[i + 1] for i, x in enumerate(seq.targets[meta["start"]:meta["end"]].tolist()) if x != IGNORE]
        assert t.decode(learned).startswith("It gets brighter")  # labels on the answer only
        name = "short" if plan.id == "vid-0" else "long"
        expected_tiles.append(video_tiles(videos / "v" / f"{name}.mp4", TILE, MAX_FRAMES, FPS))
    # the stream decoded every frame, in token order, kept as uint8 (normalised on the device)
    assert seq.tiles.shape == (6, 3, TILE, TILE)
    torch.testing.assert_close(seq.tiles, torch.cat(expected_tiles), rtol=0, atol=0)


def test_a_training_step_on_video_samples(tok, batch):
    """Forward, backward and an SGD step of the plain model on the packed video batch: a finite loss
    that the frames' pixels change, gradients on the vision encoder, and a lower loss after the step."""
    from lvita.model.longvita import LongVita

    _, sp = tok
    torch.manual_seed(0)
    model = LongVita("tiny", sp["img_context"], seed=5)
    ids, pos, pix, tgt = collate(batch)
    assert pix.shape[0] == 6 and (ids == sp["img_context"]).sum() == 6 * TPT
    loss_sum, n = model(ids, pos, pix, tgt)
    loss = loss_sum / n
    loss.backward()
    vision = [p.grad for name, p in model.named_parameters() if "vision" in name]
    assert vision and all(g is not None and torch.isfinite(g).all() for g in vision)
    assert sum(g.abs().sum() for g in vision) > 0
    with torch.no_grad():
        other = model(ids, pos, pix.flip(0), tgt)[0] / n  # frames in another order: another loss
        assert abs(other.item() - loss.item()) > 1e-6
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
        after = model(ids, pos, pix, tgt)[0] / n
    assert torch.isfinite(loss) and after < loss


def test_generate_with_a_video(videos, tok, tokenizer_dir, tmp_path, capsys):
    """``lvita generate --video`` answers from the prompt and frames built here by hand."""
    from lvita.ckpt.hf import write_hf_dir
    from lvita.data.template import encode_conversation
    from lvita.infer.decode import generate
    from lvita.infer.generate import main
    from lvita.infer.prompt import MediaOptions, build_prompt
    from lvita.model.longvita import LongVita

    t, sp = tok
    model = LongVita("tiny", sp["img_context"], seed=9).eval().requires_grad_(False)
    hf = write_hf_dir(model.state_dict(), "tiny", tokenizer_dir, tmp_path / "hf", sp["img_context"], system_prompt=None)
    clip = videos / "v" / "long.mp4"
    messages = [{"role": "user", "content": "<video>\nHow does the picture change?"}]
    ids = encode_conversation(messages, t, sp, None, [[TPT] * 4])[0] + [sp["im_start"]] + \
        t.encode("assistant\n", add_special_tokens=False)
    pixels = normalise(video_tiles(clip, TILE, 4, FPS))
    prompt = build_prompt(messages, InputFormat.of("tiny", t), videos=[clip], system_prompt=None,
                          media=MediaOptions(max_frames=4, video_fps=FPS))
    assert prompt.input_ids == ids and torch.equal(prompt.pixel_values, pixels)  # what the CLI decodes from
    assert [(type(m).__name__, str(m.ref), m.frames) for m in prompt.media] == [("PlannedVideo", str(clip), 4)]
    ref = generate(model, ids, pixels, sp, max_new_tokens=6)
    blank = generate(model, ids, torch.zeros_like(pixels), sp, max_new_tokens=6, keep_logits=True)
    capsys.readouterr()
    assert main(["--model", str(hf), "--video", str(clip), "--prompt", "How does the picture change?",
                 "--max-new-tokens", "6", "--max-frames", "4", "--video-fps", str(FPS), "--system-prompt", ""]) == 0
    assert capsys.readouterr().out.strip() == t.decode(ref.tokens, skip_special_tokens=False).strip()
    assert len(ref.tokens) > 0 and blank.logits  # the frames matter: blank frames give other logits
    with torch.no_grad():
        from lvita.infer.decode import KVCache, prefill

        cache = KVCache.empty(model, 1, len(ids))
        real = prefill(model, torch.tensor([ids]), pixels, cache)[0]
    assert (real - blank.logits[0]).abs().max() > 1e-4
