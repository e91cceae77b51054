"""Long-VITA's 17 added tokens: order and ids as the released checkpoints have them (no downloads)."""
from __future__ import annotations

from lvita.model.formats import INTERNVL, LONGVITA
from lvita.data.tokenizer import (OFFICIAL_ADDED_TOKENS, QWEN25_OFFICIAL_IDS, load_tokenizer, special_token_ids,
                                  train_demo_tokenizer)


def _qwen25_shaped(tmp_path):
    """A tokenizer with Qwen2.5's id layout: 151643 ordinary entries, then its 22 added specials
    (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, ...), nothing of Long-VITA's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(151643)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] +
                             [f"<|q{i}|>" for i in range(19)]})
    assert len(fast) == 151665
    fast.save_pretrained(tmp_path)
    return tmp_path


def test_official_tokens_get_the_released_ids_on_a_qwen25_layout(tmp_path):
    tok = load_tokenizer(_qwen25_shaped(tmp_path), LONGVITA)
    assert [tok.convert_tokens_to_ids(t) for t in OFFICIAL_ADDED_TOKENS] == list(range(151665, 151682))
    assert {t: tok.convert_tokens_to_ids(t) for t in OFFICIAL_ADDED_TOKENS} == QWEN25_OFFICIAL_IDS
    ids = special_token_ids(tok, LONGVITA)
    assert (ids["img_context"], ids["vid_context"], ids["patch_context"], ids["image_tag"]) == (151667, 151670,
                                                                                               151673, 151680)
    # the InternVL format adds only its three image markers, at the same first ids
    plain = load_tokenizer(tmp_path)
    assert len(plain) == 151668 and special_token_ids(plain)["img_context"] == 151667


def test_demo_tokenizer_keeps_its_markers_and_adds_the_rest_in_order(tmp_path):
    tok = load_tokenizer(train_demo_tokenizer(tmp_path), LONGVITA)
    got = [tok.convert_tokens_to_ids(t) for t in OFFICIAL_ADDED_TOKENS]
    assert got[:3] == [3, 4, 5] and got[3:] == list(range(1024, 1038))
    for t in OFFICIAL_ADDED_TOKENS:  # each one token, also inside text
        assert tok.encode(f"a{t}b", add_special_tokens=False)[1:-1] == [tok.convert_tokens_to_ids(t)]


def _plain_released(tmp_path):
    """The official tests' tiny released directory, its tokenizer without the 14 tokens beyond
    InternVL's markers (as released: the official code adds them when it loads the tokenizer)."""
    import json

    from tests.test_longvita_official import write_released_fixture

    plain = write_released_fixture(tmp_path / "plain")
    tj = json.loads((plain / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] not in OFFICIAL_ADDED_TOKENS[3:]]
    (plain / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((plain / "tokenizer_config.json").read_text())
    tc["extra_special_tokens"] = [t for t in tc["extra_special_tokens"] if t not in OFFICIAL_ADDED_TOKENS[3:]]
    (plain / "tokenizer_config.json").write_text(json.dumps(tc))
    assert "<vid>" not in load_tokenizer(plain).get_vocab()
    return plain


def test_a_released_directory_whose_tokenizer_lacks_the_official_tokens_loads(tmp_path):
    """Released Long-VITA directories ship Qwen2.5's tokenizer without the 17 tokens. lvita adds them,
    at the same ids, on every path that reads the directory: generate / eval (load_model) and
    model.init_from's tokenizer check."""
    from lvita.ckpt.checkpoint import tokenizer_fingerprint
    from lvita.ckpt.weights import check_tokenizer
    from lvita.infer.generate import load_model
    from tests.test_longvita_official import EXPECTED, recipe, write_released_fixture

    full = write_released_fixture(tmp_path / "full")
    plain = _plain_released(tmp_path)

    _, full_fmt = load_model(full)
    model, fmt = load_model(plain)  # reads the weights after the tokenizer check
    tok, specials = fmt.tok, fmt.specials
    assert specials == full_fmt.specials and tok.get_vocab() == full_fmt.tok.get_vocab()
    assert fmt.context_ids == full_fmt.context_ids
    fp = tokenizer_fingerprint(load_tokenizer(plain, LONGVITA))
    check_tokenizer([plain], fp, LONGVITA)  # init_from of a longvita stage: the same vocabulary
    import pytest
    from lvita.ckpt.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="token ids would mean other words"):
        check_tokenizer([plain], fp, INTERNVL)  # compared without the format's tokens: a mismatch
    from lvita.infer.generate import generate
    from lvita.infer.prompt import build_prompt

    p = build_prompt([{"role": "user", "content": recipe.PROMPT}], fmt, system_prompt=None)
    assert p.input_ids == EXPECTED["greedy_prompt_ids"]
    assert generate(model, p.input_ids, p.pixel_values, specials, recipe.MAX_NEW_TOKENS).tokens == \
        EXPECTED["greedy_tokens"]


def test_convert_from_a_released_directory_keeps_the_vocabulary_a_longvita_stage_loads(tmp_path):
    """from-hf of such a directory records the vocabulary with the 17 tokens (what a longvita stage's
    model.tokenizer gives), so model.init_from of the result and to-hf of it accept it."""
    from lvita.ckpt.checkpoint import check_fits, locate, tokenizer_fingerprint
    from lvita.ckpt.convert import from_hf, to_hf

    plain = _plain_released(tmp_path)
    out = from_hf([str(plain)], str(tmp_path / "lvita"), log=lambda *a: None)
    found = locate(out, "model.init_from")
    stage_vocab = tokenizer_fingerprint(load_tokenizer(plain, LONGVITA))
    assert found.manifest["tokenizer"] == stage_vocab
    check_fits(found, "model.init_from", found.manifest["preset"], stage_vocab)
    back = to_hf(str(out), str(tmp_path / "back"), fmt="longvita", log=lambda *a: None)
    assert load_tokenizer(back).convert_tokens_to_ids("<video>") == load_tokenizer(plain, LONGVITA).convert_tokens_to_ids("<video>")
