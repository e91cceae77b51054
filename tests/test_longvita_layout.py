"""The released Long-VITA input layout (model.format longvita), rule by rule, on the demo tokenizer.

The official code's own outputs are compared in tests/test_longvita_official_data.py; here each
rule of lvita.data.longvita is pinned separately so a failure names the rule.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvita.data.media import LONGVITA_FRAMES
from lvita.model.formats import INTERNVL, LONGVITA
from tests.synthetic import tiny_input
from lvita.config.schema import DataConfig, load_stage
from lvita.data import longvita
from lvita.data.media import image_tiles, tile_grid, video_frame_count, video_tiles
from lvita.data.plan import Planner
from lvita.data.sources import Record
from lvita.data.template import IGNORE, SampleError
from lvita.data.tokenizer import load_tokenizer, special_token_ids

TPT, TILE = 16, 112  # the tiny preset's tiles: the same rules at 16 tokens per tile


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    t = load_tokenizer(tokenizer_dir, LONGVITA)
    return t, special_token_ids(t, LONGVITA)


def _plan(tok, root: Path, raw: dict, fmt=LONGVITA, **data):
    t, sp = tok
    cfg = DataConfig(**{"seq_length": 8192, "system_prompt": "", **data})
    return Planner(cfg, tiny_input(t, fmt)).plan(Record("s", raw, "f:1", (0, 0, 0), root))


def _img(root: Path, name: str, w: int, h: int) -> str:
    rng = np.random.default_rng(w * 7 + h)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    return name


def test_frame_sampling_of_a_video_file_is_the_official_step():
    # NOTES: a 10.5 s clip at 10 fps, N = 64 -> 11 frames 0, 10, ..., 100 (about 1 per second from frame 0)
    assert longvita.video_indices(105, 10.0, 64, 1.0) == list(range(0, 101, 10))
    # a long video: total / (N + 1) wins over fps / max_fps
    assert longvita.video_indices(1000, 10.0, 4, 1.0) == [0, 200, 400, 600]
    assert longvita.video_indices(3, 30.0, 8, 1.0) == [0]


def test_frame_folders_are_natural_sorted_and_taken_at_1_fps(tmp_path):
    assert longvita.folder_indices(150, 64, 1.0) == list(range(0, 128, 2))
    assert longvita.folder_indices(10, 64, 1.0) == list(range(10))
    assert longvita.folder_indices(10, 64, 0.5) == [0, 2, 4, 6, 8]
    for i in (1, 2, 10, 11):
        Image.new("RGB", (8, 8)).save(tmp_path / f"frame{i}.png")
    (tmp_path / "x.PNG").write_bytes(b"")  # case-sensitive ending, as the official test
    (tmp_path / "notes.txt").write_text("-")
    assert [Path(p).name for p in longvita.folder_frames(tmp_path)] == ["frame1.png", "frame2.png", "frame10.png",
                                                                         "frame11.png"]


def test_frames_are_padded_with_the_mean_colour_not_stretched():
    img = Image.fromarray(np.full((20, 40, 3), 255, np.uint8))  # 40 wide, 20 high: white
    out = np.asarray(longvita.pad_to_square(img, 40))
    assert out.shape == (40, 40, 3)
    assert tuple(out[0, 0]) == (123, 116, 103) and tuple(out[39, 20]) == (123, 116, 103)  # int(mean * 255)
    assert tuple(out[20, 20]) == (255, 255, 255)


def test_an_image_is_the_thumbnail_first_then_rows_of_patches(tok, tmp_path):
    _, sp = tok
    name = _img(tmp_path, "w.png", 400, 200)  # at 112 px tiles: a 2x1 grid... (cols, rows) below
    cols, rows = tile_grid(400, 200, 1, 12, TILE)
    assert cols * rows > 1
    plan = _plan(tok, tmp_path, {"images": [name], "messages": [
        {"role": "user", "content": "<image>\nQ"}, {"role": "assistant", "content": "A"}]})
    ids = plan.input_ids
    start = ids.index(sp["img_start"])
    nl = ids[start + TPT + 2]
    want = ([sp["img_start"]] + [sp["img_context"]] * TPT + [sp["img_end"]] +
            ([nl] + ([sp["patch_start"]] + [sp["patch_context"]] * TPT + [sp["patch_end"]]) * cols) * rows)
    assert ids[start:start + len(want)] == want
    assert plan.media[0].tiles == cols * rows + 1
    # the decoded tiles: the thumbnail first, then the grid row-major
    tiles = image_tiles(tmp_path / name, TILE, 1, 12, thumbnail_first=True)
    last = image_tiles(tmp_path / name, TILE, 1, 12)
    assert torch.equal(tiles[0], last[-1]) and torch.equal(tiles[1:], last[:-1])
    # one tile: only the <img> run, no newline, no <patch>
    one = _plan(tok, tmp_path, {"images": [_img(tmp_path, "s.png", 100, 100)], "messages": [
        {"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}]})
    assert sp["patch_start"] not in one.input_ids and one.input_ids.count(sp["img_context"]) == TPT


def test_every_image_gets_up_to_max_tiles_whatever_the_image_count(tok, tmp_path):
    names = [_img(tmp_path, f"{i}.png", 448, 336) for i in range(3)]  # 4x3 = 12 tiles each at 112 px
    raw = {"images": names, "messages": [{"role": "user", "content": "<image><image><image>Q"},
                                         {"role": "assistant", "content": "A"}]}
    assert [m.tiles for m in _plan(tok, tmp_path, raw).media] == [13, 13, 13]
    assert [m.tiles for m in _plan(tok, tmp_path, raw, INTERNVL).media] == [5, 5, 5]  # InternVL: 12 // 3 each


def test_only_a_sample_that_does_not_fit_gets_fewer_tiles(tok, tmp_path):
    name = _img(tmp_path, "big.png", 448, 336)
    raw = {"images": [name], "messages": [{"role": "user", "content": "<image>Q"},
                                          {"role": "assistant", "content": "A"}]}
    full = _plan(tok, tmp_path, raw)
    n = len(full.input_ids)
    assert full.media[0].tiles == 13
    assert _plan(tok, tmp_path, raw, seq_length=n).media[0].tiles == 13  # fits exactly: every official tile
    fewer = _plan(tok, tmp_path, raw, seq_length=n - 1)
    assert fewer.media[0].tiles < 13 and len(fewer.input_ids) <= n - 1
    # the budget is the largest that fits (halving 12 -> 6 -> 3): 6 tiles fit here
    assert fewer.media[0].max_tiles == 6
    with pytest.raises(SampleError, match="even at 1 tile"):
        _plan(tok, tmp_path, raw, seq_length=TPT + 2)


def test_video_is_one_vid_run_per_frame_and_labels_end_with_the_newline(tok, tmp_path):
    t, sp = tok
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(1, 6):
        Image.new("RGB", (30, 20), (i * 40, 0, 0)).save(folder / f"{i}.jpg")
    plan = _plan(tok, tmp_path, {"videos": ["clip"], "messages": [
        {"role": "user", "content": "<video>\nWhat?"}, {"role": "assistant", "content": "Red."}]}, max_frames=64)
    run = [sp["vid_start"]] + [sp["vid_context"]] * TPT + [sp["vid_end"]]
    ids = plan.input_ids
    s = ids.index(sp["vid_start"])
    assert ids[s:s + 5 * len(run)] == run * 5 and ids[s + 5 * len(run)] != sp["vid_start"]
    labels = [IGNORE] + plan.targets[:-1]
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    nl = t("\n", add_special_tokens=False)["input_ids"]
    assert trained == t("Red.", add_special_tokens=False)["input_ids"] + [sp["im_end"]] + nl
    assert video_frame_count(folder, 64, 1.0, LONGVITA_FRAMES) == 5
    frames = video_tiles(folder, TILE, 64, 1.0, frames=LONGVITA_FRAMES)
    assert frames.shape == (5, 3, TILE, TILE)
    assert tuple(frames[0, :, 0, 0].tolist()) == (123, 116, 103)  # the padded band


def test_longvita_stages_have_no_default_system_prompt_unless_set(tmp_path):
    stage = {"model": {"preset": "tiny", "format": "longvita"}, "data": {}}
    p = tmp_path / "s.json"
    p.write_text(json.dumps(stage))
    assert load_stage(p).data.system_prompt == ""
    assert load_stage(p, ["data.system_prompt=Be brief."]).data.system_prompt == "Be brief."
    p.write_text(json.dumps({"model": {"preset": "tiny", "format": "internvl"}}))
    assert load_stage(p).data.system_prompt == "You are a helpful assistant."  # InternVL keeps today's default


def test_sequence_shards_count_every_context_kind(tok):
    from lvita.parallel.sequence import shard_tiles

    _, sp = tok
    ids = torch.tensor([1] * 4 + [sp["img_context"]] * 4 + [sp["patch_context"]] * 4 + [sp["vid_context"]] * 4)
    _, tiles, _ = shard_tiles(ids, 1, 2, 1, longvita.context_ids(sp), 4)  # second half: the patch and frame tiles
    assert tiles.tolist() == [1, 2]


def test_a_frame_folder_above_1_fps_gives_its_own_frames_not_frame_0_repeated():
    # the official int(total / target) is 0 when target > total; lvita caps target at the frames there are
    assert longvita.folder_indices(8, 16, 4.0) == list(range(8))


def test_the_demo_stages_use_the_released_layout_at_16_tokens_per_tile(tmp_path, tokenizer_dir, capsys):
    from lvita.cli import main
    from lvita.demo.dataset import generate_demo_data

    generate_demo_data(tmp_path, seed=0)
    stage = Path(__file__).resolve().parents[1] / "stages" / "demo" / "2_general.json"
    sets = ["--set", f"data.root={tmp_path}", "--set", f"model.tokenizer={tokenizer_dir}"]
    assert main(["data", "show", "--stage", str(stage), "--source", "video", "--index", "0",
                 "--save", str(tmp_path / "v.npz")] + sets) == 0
    out = capsys.readouterr().out
    assert "model.format longvita, 16 tokens per 112 px tile" in out
    assert "<|im_start|>user\n<vid><VID_CONTEXT>x16</vid>" in out and "system" not in out
    saved = np.load(tmp_path / "v.npz")
    frames = out.count("<vid><VID_CONTEXT>x16</vid>")
    assert saved["pixel_values"].shape == (frames, 3, 112, 112) and frames >= 2


@pytest.mark.parametrize("ulysses, ring", [(2, 1), (1, 2)])
def test_a_sequence_rank_decodes_its_shard_tiles_of_all_three_context_kinds(tok, tmp_path, ulysses, ring):
    """Thumbnail, patch and frame runs all hold tiles: a rank's share counts every context id, and
    its tiles are exactly those of the full decode at the shard's tile numbers."""
    from lvita.config.schema import SourceConfig
    from lvita.data.stream import DataStream, PixelShare
    from lvita.parallel.sequence import shard_tiles
    from tests.test_rank_decode import write_video_dataset

    t, sp = tok
    root = write_video_dataset(tmp_path)
    ctx = longvita.context_ids(sp)

    def stream(pixels=PixelShare()):
        cfg = DataConfig(root=str(root), seq_length=768, reset_position_ids=False, same_source=False, pack_buffer=4,
                         max_tiles=4, max_frames=10, video_fps=1.0, system_prompt="", workers=1, prefetch=1,
                         sources=[SourceConfig("videos", ["videos.jsonl"]), SourceConfig("captions", ["captions.jsonl"])])
        return DataStream(cfg, tiny_input(t, LONGVITA), 2, seed=2, log=lambda *a: None, pixels=pixels)

    full = []
    s0 = stream()
    for _ in range(3):
        full.append(s0.decode(s0.next_sequence())[0])
    kinds = torch.cat([s.input_ids for s in full])
    assert all(int((kinds == c).sum()) > 0 for c in ctx)  # the sequences hold all three kinds
    covered = [set() for _ in full]
    for r in range(ulysses * ring):
        sr = stream(PixelShare(True, r, ulysses, ring, ctx))
        for k, x in enumerate(full):
            y = sr.decode(sr.next_sequence())[0]
            assert torch.equal(y.input_ids, x.input_ids)
            tiles = shard_tiles(x.input_ids, r, ulysses, ring, ctx, TPT)[1]
            assert torch.equal(y.tiles, x.tiles[tiles])
            covered[k] |= set(tiles.tolist())
    assert all(c == set(range(x.tiles.shape[0])) for c, x in zip(covered, full))


def test_inference_prompts_use_the_layout_training_uses(tok, tmp_path):
    """lvita generate / eval under longvita: the prompt's ids are training's up to the assistant turn,
    and its pixels the training tiles in token order (thumbnail first, padded frames)."""
    from lvita.data.input_format import InputFormat
    from lvita.infer.prompt import MediaOptions, build_prompt
    from lvita.model.presets import spec_of

    t, sp = tok
    img = _img(tmp_path, "w.png", 400, 200)
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(1, 4):
        Image.new("RGB", (30, 20), (i * 40, 0, 0)).save(folder / f"{i}.png")
    user = {"role": "user", "content": "<image>\nAnd <video>?"}
    plan = _plan(tok, tmp_path, {"images": [img], "videos": ["clip"], "messages": [
        user, {"role": "assistant", "content": "A"}]}, max_frames=8)
    spec = spec_of("tiny", LONGVITA)
    p = build_prompt([user], InputFormat.of(spec, t), [tmp_path / img], [folder], None, MediaOptions(max_frames=8))
    opening = [sp["im_start"]] + t("assistant\n", add_special_tokens=False)["input_ids"]
    assert p.input_ids == plan.input_ids[:len(p.input_ids)] and p.input_ids[-len(opening):] == opening
    want = torch.cat([image_tiles(tmp_path / img, TILE, 1, 12, thumbnail_first=True),
                      video_tiles(folder, TILE, 8, 1.0, frames=LONGVITA_FRAMES)])
    from lvita.data.media import normalise
    assert torch.equal(p.pixel_values, normalise(want))


def test_a_context_token_typed_in_the_text_is_a_bad_sample(tok, tmp_path):
    # it would take a vision feature slot no tile fills (the features of every later tile would shift)
    with pytest.raises(SampleError, match="context token"):
        _plan(tok, tmp_path, {"messages": [{"role": "user", "content": "What is <PATCH_CONTEXT>?"},
                                           {"role": "assistant", "content": "A token."}]})
