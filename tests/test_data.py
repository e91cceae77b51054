"""Template labels, packing (reset vs preserved positions), layout-independent batches, bad samples."""
from __future__ import annotations

import json

import pytest
import torch

from lvita.config import DataConfig, SourceConfig
from lvita.data.packed import PackedStream, rank_micro_batches
from lvita.data.template import IGNORE, SampleError, encode_conversation, normalise_messages
from lvita.tokenizer import load_tokenizer, special_token_ids


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    t = load_tokenizer(tokenizer_dir)
    return t, special_token_ids(t)


def test_labels_only_on_assistant_content_and_im_end(tok):
    t, sp = tok
    msgs = normalise_messages({"conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                 {"from": "gpt", "value": "Red."}]})
    ids, targets = encode_conversation(msgs, t, sp, "You are a helpful assistant.", [[4]])
    learned = [ids[i + 1] for i, x in enumerate(targets) if x != IGNORE]
    assert t.decode(learned) == "Red.<|im_end|>"
    assert ids.count(sp["img_context"]) == 4 and ids.count(sp["img_start"]) == 1
    assert t.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<img>")
    assert targets[-1] == IGNORE and len(ids) == len(targets)


@pytest.mark.parametrize("sample, reason", [
    ({"messages": []}, "empty_conversation"),
    ({"id": 1}, "empty_conversation"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "malformed_message"),
])
def test_malformed_conversations(sample, reason):
    with pytest.raises(SampleError) as e:
        normalise_messages(sample)
    assert e.value.reason == reason


def _stream(tok, root, reset=True, same=True, seq=192, gb=4, seed=1):
    t, sp = tok
    cfg = DataConfig(root=str(root), seq_length=seq, reset_position_ids=reset, same_source=same,
                     sources=[SourceConfig("captions", ["captions.jsonl"]), SourceConfig("text", ["text.jsonl"])])
    return PackedStream(cfg, t, sp, tile=112, tokens_per_tile=16, global_batch=gb, seed=seed, log=lambda *a: None)


def test_reset_positions_restart_per_sample(tok, dataset_dir):
    batch = _stream(tok, dataset_dir, reset=True).next_global_batch()
    for seq in batch:
        assert seq.input_ids.shape == (192,)
        for s in seq.samples:
            assert seq.position_ids[s["start"]:s["end"]].tolist() == list(range(s["end"] - s["start"]))
        assert len({s["source"] for s in seq.samples}) == 1  # same_source
        assert seq.tiles.shape[0] * 16 == int((seq.input_ids == 5).sum())
        assert (seq.targets[192 - seq.pad:] == IGNORE).all()


def test_preserved_positions_run_over_the_sequence(tok, dataset_dir):
    batch = _stream(tok, dataset_dir, reset=False, same=False).next_global_batch()
    for seq in batch:
        assert seq.position_ids.tolist() == list(range(192))
    assert any(len({s["source"] for s in seq.samples}) > 1 for seq in batch)


def test_layout_independent_micro_batches(tok, dataset_dir):
    batch = _stream(tok, dataset_dir, gb=4).next_global_batch()
    rows = {}
    for dp, micro in [(1, 1), (1, 2), (2, 1), (4, 1)]:
        got, scales = [], set()
        for r in range(dp):
            for (ids, _, _), (_, scale) in rank_micro_batches(batch, r, dp, micro):
                got += [tuple(x.tolist()) for x in ids]
                scales.add(float(scale) / (4 // micro))  # scale = micro-batches*ranks / labelled
        rows[(dp, micro)] = sorted(got)
        assert len(scales) == 1
    assert len({tuple(v) for v in rows.values()}) == 1


def test_stream_resume_is_exact(tok, dataset_dir):
    a = _stream(tok, dataset_dir, gb=2)
    for _ in range(3):
        a.next_global_batch()
    state = a.state_dict()
    expect = [a.next_global_batch() for _ in range(6)]  # crosses an epoch boundary
    b = _stream(tok, dataset_dir, gb=2)
    b.load_state_dict(state)
    got = [b.next_global_batch() for _ in range(6)]
    for x, y in zip(expect, got):
        assert all(torch.equal(s.input_ids, t.input_ids) for s, t in zip(x, y))


def test_bad_samples_are_skipped_and_counted(tok, tmp_path):
    from tests.conftest import write_dataset

    root = write_dataset(tmp_path, n_captions=8, n_text=8)
    with open(root / "captions.jsonl", "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"id": "x1", "images": ["images/missing.png"], "messages": [
            {"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "ok"}]}) + "\n")
        f.write(json.dumps({"id": "x2", "images": ["images/0.png"], "messages": [
            {"role": "user", "content": "no placeholder"}, {"role": "assistant", "content": "ok"}]}) + "\n")
        f.write(json.dumps({"id": "x3", "messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    (root / "images" / "corrupt.png").write_bytes(b"not a png")
    with open(root / "captions.jsonl", "a") as f:
        f.write(json.dumps({"id": "x4", "images": ["images/corrupt.png"], "messages": [
            {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "ok"}]}) + "\n")
    logged = []
    t, sp = tok
    cfg = DataConfig(root=str(root), seq_length=192, sources=[SourceConfig("captions", ["captions.jsonl"])])
    s = PackedStream(cfg, t, sp, 112, 16, 1, 0, log=logged.append)
    assert dict(s.skipped) == {"malformed_json": 1, "bad_media": 2, "placeholder_mismatch": 1, "no_assistant_turn": 1}
    assert len(s.samples["captions"]) == 8
    assert "captions.jsonl:9" in logged[0] and len(logged) == 5
