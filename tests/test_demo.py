"""Demo tokenizer and synthetic data: deterministic, well-formed, every file readable."""
from __future__ import annotations

import json
import re

import decord
import pytest
from PIL import Image

from lvita.demo.dataset import generate_demo_data
from lvita.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_token_ids, train_demo_tokenizer
from lvita.errors import PathError

COUNTS = {"captions": 200, "multi_image": 80, "comic": 20, "video": 20, "text_short": 200, "text_long": 20}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, generate_demo_data(root, seed=0)


def test_tokenizer_round_trips_and_keeps_specials(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    text = "What is 17 + 25? The answer: 42.\n\tDone — ok"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = special_token_ids(tok)
    assert sorted(ids.values()) == list(range(6))
    for t in SPECIAL_TOKENS:
        assert tok.encode(t, add_special_tokens=False) == [tok.convert_tokens_to_ids(t)]


def test_load_tokenizer_adds_missing_image_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=base)
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert all(t in tok.get_vocab() for t in ("<img>", "</img>", "<IMG_CONTEXT>"))
    with pytest.raises(PathError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "missing")


def test_tokenizer_training_is_deterministic(tmp_path):
    a = train_demo_tokenizer(tmp_path / "a")
    b = train_demo_tokenizer(tmp_path / "b")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_data_is_deterministic(demo, tmp_path):
    root, files = demo
    again = generate_demo_data(tmp_path, seed=0)
    for name in files:
        assert files[name].read_bytes() == again[name].read_bytes(), name
    assert (root / "images" / "captions-000003.png").read_bytes() == (tmp_path / "images" / "captions-000003.png").read_bytes()
    other = generate_demo_data(tmp_path / "other", seed=1)
    assert other["captions"].read_bytes() != files["captions"].read_bytes()


def test_every_sample_is_well_formed(demo):
    root, files = demo
    assert set(files) == set(COUNTS)
    formats = set()
    for name, path in files.items():
        samples = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(samples) == COUNTS[name]
        for s in samples:
            turns = s.get("messages") or s.get("conversations")
            formats.add("messages" if "messages" in s else "conversations")
            text = "".join(t.get("content", t.get("value", "")) for t in turns)
            assert len(re.findall("<image>", text)) == len(s.get("images", []))
            assert len(re.findall("<video>", text)) == len(s.get("videos", []))
            assert any(t.get("role", t.get("from")) in ("assistant", "gpt") and (t.get("content") or t.get("value"))
                       for t in turns)
            for rel in s.get("images", []):
                with Image.open(root / rel) as img:
                    assert 64 <= min(img.size) and max(img.size) <= 160
            for rel in s.get("videos", []):
                assert 8 <= len(decord.VideoReader(str(root / rel))) <= 16
    assert formats == {"messages", "conversations"}
