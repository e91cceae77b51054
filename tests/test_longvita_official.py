"""The released Long-VITA layout against the official code's own outputs (issue 22).

A tiny checkpoint in the released layout is written from the official key list
(``tests/fixtures/longvita_official/model_keys.json``, made by the official ``LongVITAForCausalLM``)
with the fixture recipe's weights; ``make_model_fixtures.py`` ran the official model on the same
weights and recorded its logits and greedy tokens. Here lvita loads that directory as a user would
(``lvita generate|eval --model``, ``lvita convert from-hf``, ``model.init_from`` at pipeline 2) and
must give the same numbers; ``from-hf`` then ``to-hf --format longvita`` must return the same tensors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, stage_dict, write_stage
from lvita.model.formats import LONGVITA
from tests.distributed import run_world

FIXTURES = REPO / "tests" / "fixtures" / "longvita_official"
sys.path.insert(0, str(FIXTURES))
import model_recipe as recipe  # noqa: E402

EXPECTED = json.loads((FIXTURES / "model_expected.json").read_text())
KEYS = json.loads((FIXTURES / "model_keys.json").read_text())


def write_released_fixture(out: Path) -> Path:
    """The released-layout directory: config.json as released, the official keys' weights, the tokenizer
    as released checkpoints ship it: WITHOUT the Long-VITA tokens it lacks (the official code adds them
    at load time, in its order; so must lvita, giving the fixture tokenizer's ids)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(recipe.CONFIG, indent=2))
    save_file(recipe.state_dict(KEYS), str(out / "model.safetensors"), {"format": "pt"})
    tok = json.loads((recipe.TOKENIZER_DIR / "tokenizer.json").read_text())
    base = {t["content"] for t in tok["added_tokens"] if t["id"] < 512}  # the demo tokenizer's own specials
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] in base]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    tcfg = json.loads((recipe.TOKENIZER_DIR / "tokenizer_config.json").read_text())
    tcfg["extra_special_tokens"] = [t for t in tcfg["extra_special_tokens"] if t in base]
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "pad_token_id": 0}))
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return write_released_fixture(tmp_path_factory.mktemp("released") / "Long-VITA-tiny")


@pytest.fixture(scope="module")
def loaded(released):
    from lvita.infer.generate import load_model

    return load_model(released)


def _all_logits(model, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        h = model.embed(ids, pixels)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        for layer in model.layers:
            h = layer(h, pos)
        return model.head.lm_head(model.head(h))[0].float()


def test_logits_equal_the_official_models(released, loaded):
    from transformers import AutoTokenizer

    assert "<PATCH_CONTEXT>" not in AutoTokenizer.from_pretrained(str(released)).get_vocab()  # as released
    model, fmt = loaded
    tok, spec = fmt.tok, fmt.spec
    fixture = json.loads((recipe.TOKENIZER_DIR / "tokenizer.json").read_text())["added_tokens"]
    assert all(tok.convert_tokens_to_ids(t["content"]) == t["id"] for t in fixture)  # added at the official ids
    assert spec.format is LONGVITA and model.embed.image_token_id == tuple(
        tok.convert_tokens_to_ids(["<IMG_CONTEXT>", "<PATCH_CONTEXT>", "<VID_CONTEXT>"]))
    ids, positions, n_tiles = recipe.multimodal_input()
    assert ids[0].tolist() == EXPECTED["input_ids"] and positions == EXPECTED["context_positions"]
    logits = _all_logits(model, ids, recipe.pixel_values(n_tiles))
    # Tolerance 1e-5 (fp32, logits of magnitude ~1-4): two implementations of the same float32 maths
    # (fused vs split qkv, eager vs lvita's attention kernel, summation order) differ by ~1e-6 (the
    # noise floor: measured 2.3e-6 at most, with the 8 significant digits recorded). The bugs it guards move logits by
    # 1e-2 to 1: a wrong projector order or missing LayerNorm, CLS not dropped, pixel shuffle
    # transposed, features written at the wrong context tokens or in the wrong tile order, a q/k/v
    # third swapped, rope theta or RMSNorm eps wrong.
    atol = 1e-5
    want = torch.tensor(EXPECTED["logits_at_ids"])
    torch.testing.assert_close(logits[:, EXPECTED["logit_ids"]], want, rtol=0, atol=atol)
    torch.testing.assert_close(torch.logsumexp(logits, -1), torch.tensor(EXPECTED["logsumexp"]), rtol=0, atol=atol)
    torch.testing.assert_close(logits[-1], torch.tensor(EXPECTED["last_row"]), rtol=0, atol=atol)
    assert logits.argmax(-1).tolist() == EXPECTED["argmax"]
    # the vision path matters here: without the pixels' features the logits move far beyond the tolerance
    blank = _all_logits(model, ids, torch.zeros(n_tiles, 3, recipe.TILE, recipe.TILE))
    assert (blank[positions[0]:] - logits[positions[0]:]).abs().max() > 100 * atol


def test_generate_json_gives_the_official_greedy_tokens(released, loaded, capsys):
    from lvita.infer import generate as lvgen
    from lvita.infer.prompt import build_prompt

    model, fmt = loaded
    tok = fmt.tok
    messages = [{"role": "user", "content": recipe.PROMPT}]
    # the released model has no default system prompt; the prompt is the official code's, token for token
    assert lvgen.model_system_prompt(released, tok) is None
    assert build_prompt(messages, fmt, system_prompt=None).input_ids == EXPECTED["greedy_prompt_ids"]
    argv = ["--model", str(released), "--prompt", recipe.PROMPT, "--max-new-tokens", str(recipe.MAX_NEW_TOKENS)]
    assert lvgen.main(argv + ["--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    printed = json.loads(out)
    assert printed["tokens"] == EXPECTED["greedy_tokens"]
    assert printed["text"] == tok.decode(EXPECTED["greedy_tokens"], skip_special_tokens=False).strip()


def test_eval_runs_the_released_checkpoint(released, tmp_path):
    from lvita import eval as lveval
    from lvita.evaluation.jsonl_set import correct

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(recipe.TOKENIZER_DIR))
    model_answer = tok.decode(EXPECTED["greedy_tokens"], skip_special_tokens=False).strip()
    items = [{"id": "official", "messages": [{"role": "user", "content": recipe.PROMPT},
                                             {"role": "assistant", "content": model_answer}]},
             {"id": "other", "messages": [{"role": "user", "content": recipe.PROMPT},
                                          {"role": "assistant", "content": "something else entirely"}]}]
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    assert lveval.main(["--model", str(released), "--data", str(data), "--out", str(tmp_path / "res"),
                        "--max-new-tokens", str(recipe.MAX_NEW_TOKENS)]) == 0
    preds = {json.loads(line)["id"]: json.loads(line) for line in
             (tmp_path / "res" / "predictions.jsonl").read_text().splitlines()}
    assert preds["official"]["prediction"] == model_answer and correct(preds["official"])
    assert not correct(preds["other"])


def test_convert_from_hf_then_to_hf_longvita_returns_the_same_tensors(released, tmp_path):
    from safetensors.torch import load_file

    from lvita.ckpt.convert import from_hf, to_hf

    lvita_dir = from_hf([str(released)], str(tmp_path / "lvita"), log=lambda *a: None)  # shapes from config.json
    manifest = json.loads((lvita_dir / "checkpoints" / "global_step0" / "lvita_manifest.json").read_text())
    assert manifest["format"] == "longvita" and manifest["preset"] == str(released)
    assert manifest["system_prompt"] is None  # the released model trained with none
    from lvita.ckpt.checkpoint import CheckpointError
    from lvita.ckpt.hf_read import read_hf
    from lvita.model.presets import spec_of

    with pytest.raises(CheckpointError, match=r"is in the longvita format \(model_type long_vita\) but model.format "
                                              r"is 'internvl'"):
        read_hf([released], spec_of(str(released), "internvl"))
    with pytest.raises(CheckpointError, match=r"--format internvl: .* holds a model.format='longvita' model"):
        to_hf(str(lvita_dir), str(tmp_path / "internvl"), fmt="internvl", log=lambda *a: None)
    out = to_hf(str(lvita_dir), str(tmp_path / "back"), fmt="longvita", log=lambda *a: None)
    original, back = load_file(str(released / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(back) == sorted(original) == sorted(KEYS)
    for k in original:
        assert torch.equal(back[k], original[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "long_vita" and cfg["architectures"] == ["LongVITAForCausalLM"]
    for k, v in recipe.CONFIG.items():  # every shape-deciding field as released (the nested visual too)
        if k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                 "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings"):
            assert cfg[k] == v, k
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "image_size",
              "patch_size", "qkv_bias", "qk_normalization", "model_type"):
        assert cfg["visual"][k] == recipe.VISUAL[k], k
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0] and gen["pad_token_id"] == 0
    from transformers import AutoTokenizer

    tcfg = json.loads((out / "tokenizer_config.json").read_text())  # readable by transformers 4.x too
    assert "extra_special_tokens" not in tcfg and tcfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(str(out))
    official = ["<img>", "</img>", "<IMG_CONTEXT>", "<vid>", "</vid>", "<VID_CONTEXT>", "<patch>", "</patch>",
                "<PATCH_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<image>", "<video>"]
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in official)
    assert set(official) <= set(tcfg["additional_special_tokens"])
    fixture = AutoTokenizer.from_pretrained(str(recipe.TOKENIZER_DIR))
    assert tok.get_vocab() == fixture.get_vocab()  # the official ids: the ones the model was trained with
    # the exported directory loads back in lvita with the same logits
    from lvita.infer.generate import load_model

    a, b = load_model(released)[0], load_model(out)[0]
    ids, _, n = recipe.multimodal_input()
    assert torch.equal(_all_logits(a, ids, recipe.pixel_values(n)), _all_logits(b, ids, recipe.pixel_values(n)))


def _train(rank, cfg_path, overrides):
    from lvita.config.schema import load_stage
    from lvita.training.loop import run

    return run(load_stage(cfg_path, overrides))


def test_init_from_the_released_layout_trains_at_pipeline_2(released, dataset_dir, tmp_path):
    from lvita.ckpt.checkpoint import CheckpointError, check_fits, locate, tokenizer_fingerprint
    from lvita.ckpt.released import from_released_state
    from lvita.ckpt.weights import checkpoint_plain_state
    from lvita.data.tokenizer import load_tokenizer
    from lvita.model.presets import spec_of

    cfg = stage_dict(released, dataset_dir, tmp_path / "out")
    cfg["model"].update(preset=str(released), init_from=str(released))  # shapes and weights from the directory
    cfg["train"].update(iterations=2, lr={"vision": 0.0, "projector": 0.0, "llm": 0.0})
    stage = write_stage(tmp_path / "s.json", cfg)
    run_world(_train, 2, str(stage), ["parallel.pipeline=2"])
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(0 < m["loss"] < 20 for m in metrics)
    found = locate(tmp_path / "out", "test")
    assert found.manifest["format"] == "longvita" and found.manifest["layout"]["pipeline"] == 2
    # lr 0: the saved weights are the released tensors, every one of them, on both pipeline stages
    saved = checkpoint_plain_state(found.tag_dir, recipe.CONFIG["num_hidden_layers"])
    want = from_released_state(recipe.state_dict(KEYS))
    assert sorted(saved) == sorted(want)
    for k in want:
        assert torch.equal(saved[k], want[k]), k
    # init_from / resume across formats is refused, naming both formats
    fp = tokenizer_fingerprint(load_tokenizer(released))
    with pytest.raises(CheckpointError, match=r"saved in model.format='longvita' but this stage has "
                                              r"model.format='internvl'.*across formats is refused"):
        check_fits(found, "model.init_from", spec_of(str(released), "internvl"), fp)


def test_preset_takes_the_shapes_from_directories(released, tmp_path, tokenizer_dir, dataset_dir, capsys):
    """model.preset = the released directory, or [InternViT dir, Qwen2 dir]: the same shapes; `lvita check`
    plans either (parameters per pipeline stage, from the shapes alone)."""
    from lvita.config.check import main as check
    from lvita.config.schema import load_stage
    from lvita.model.longvita import LongVita
    from lvita.model.presets import spec_of

    vit, qwen = tmp_path / "InternViT", tmp_path / "Qwen2"
    vit.mkdir(), qwen.mkdir()
    (vit / "config.json").write_text(json.dumps(recipe.VISUAL))
    (qwen / "config.json").write_text(json.dumps({**{k: v for k, v in recipe.CONFIG.items() if k != "visual"},
                                                  "model_type": "qwen2"}))
    one, pair = spec_of(str(released)), spec_of([str(qwen), str(vit)])
    assert (one.vision, one.llm, one.format) == (pair.vision, pair.llm, pair.format) == (
        one.vision, one.llm, LONGVITA)
    with torch.device("meta"):
        n = sum(p.numel() for p in LongVita(one, 5).parameters())
    assert n == sum(torch.Size(s).numel() for s in KEYS.values())  # exactly the official model's parameters
    stage = write_stage(tmp_path / "s.json", stage_dict(tokenizer_dir, dataset_dir, tmp_path / "out"))
    for preset in (json.dumps(str(released)), json.dumps([str(vit), str(qwen)])):
        assert load_stage(stage, [f"model.preset={preset}"]).model.format == "longvita"
        assert check(str(stage), 2, [f"model.preset={preset}", "parallel.pipeline=2"]) == 0
        out = capsys.readouterr().out
        assert f"total {n / 1e6:,.1f}M parameters" in out and "(format longvita)" in out
    with pytest.raises(ValueError, match=r"a list names an InternViT directory .* and a Qwen2 directory"):
        spec_of([str(vit), str(vit)])
