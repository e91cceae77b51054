"""``lvita convert`` and ``model.init_from`` end to end: a pipeline-2 checkpoint exported to HF gives
the same logits in transformers as in lvita; HF directories (InternVL, or InternViT + Qwen2) start a
stage with exactly their weights; and ``lvita ckpt to-universal`` converts by hand."""
from __future__ import annotations

import pytest
import torch

from lvita.checkpoint import tokenizer_fingerprint
from lvita.cli import main as cli
from lvita.model.longvita import LongVita
from lvita.model.presets import llm_config, tokens_per_tile, vision_config
from lvita.tokenizer import load_tokenizer, special_token_ids
from lvita.weights import init_from
from tests.conftest import stage_dict, write_stage
from tests.distributed import run_world
from tests.test_hf import _lvita_logits, _save
from tests.test_training import _layer_states, _train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir, dataset_dir):
    """Two steps at pipeline 2 (bf16 ZeRO-1 would do as well; fp32 keeps logits comparable at 1e-5)."""
    root = tmp_path_factory.mktemp("convert")
    cfg = stage_dict(tokenizer_dir, dataset_dir, root / "run", iterations=2)
    stage = write_stage(root / "s.json", cfg)
    run_world(_train, 2, str(stage), ["parallel.pipeline=2"])
    return root, stage


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    t = load_tokenizer(tokenizer_dir)
    return t, special_token_ids(t), tokenizer_fingerprint(t)


def _inputs(ids):
    n = tokens_per_tile("tiny")
    torch.manual_seed(0)
    input_ids = torch.randint(10, 1000, (1, 40))
    input_ids[0, 2], input_ids[0, 3 + n] = ids["img_start"], ids["img_end"]
    input_ids[0, 3:3 + n] = ids["img_context"]
    return input_ids, torch.randn(1, 3, 112, 112)


def test_to_hf_from_a_pipeline_checkpoint_gives_lvita_logits(trained, tok, tmp_path):
    from transformers import AutoModelForImageTextToText

    root, _ = trained
    _, ids, fp = tok
    assert cli(["convert", "to-hf", str(root / "run"), str(tmp_path / "hf")]) == 0
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    model = LongVita("tiny", ids["img_context"], seed=123).eval()
    assert "global_step2" in init_from(model, str(root / "run"), "tiny", fp)
    input_ids, pixels = _inputs(ids)
    with torch.no_grad():
        got = hf(input_ids=input_ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, _lvita_logits(model, input_ids, pixels), rtol=1e-5, atol=1e-5)
    assert cli(["convert", "to-hf", str(root / "run"), str(tmp_path / "hf")]) == 2  # never overwrites


def test_from_hf_and_init_from_hf_start_a_pipeline_stage_with_those_weights(trained, tok, tmp_path):
    root, stage = trained
    _, ids, fp = tok
    saved = _layer_states(root / "run" / "checkpoints" / "global_step2")
    assert cli(["convert", "to-hf", str(root / "run"), str(tmp_path / "hf")]) == 0
    assert cli(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "lv"), "--preset", "tiny"]) == 0
    frozen = 'train.lr={"vision":0,"projector":0,"llm":0}'
    for source in (tmp_path / "hf", tmp_path / "lv"):  # HF directory read directly, and converted once
        out = tmp_path / f"from_{source.name}"
        run_world(_train, 2, str(stage), ["parallel.pipeline=2", "train.iterations=1", frozen,
                                          f"model.init_from={source}", f"output_dir={out}"])
        after = _layer_states(out / "checkpoints" / "global_step1")
        assert after.keys() == saved.keys()
        for k in saved:
            assert torch.equal(after[k], saved[k]), (source, k)


def test_init_from_internvit_and_qwen2_dirs(tok, tmp_path):
    from transformers import InternVLVisionModel, Qwen2ForCausalLM

    _, ids, fp = tok
    torch.manual_seed(1)
    vit = InternVLVisionModel(vision_config("tiny"))
    cfg = llm_config("tiny")
    cfg._attn_implementation = "sdpa"
    qwen = Qwen2ForCausalLM(cfg)
    model = LongVita("tiny", ids["img_context"], seed=5)
    projector = {k: v.clone() for k, v in model.embed.vision.multi_modal_projector.state_dict().items()}
    where = init_from(model, [str(_save(vit, tmp_path / "vit")), str(_save(qwen, tmp_path / "qwen"))], "tiny", fp)
    assert "6 projector weights start fresh" in where
    for k, v in vit.state_dict().items():
        assert torch.equal(model.embed.vision.vision_tower.state_dict()[k], v), k
    for k, v in model.embed.vision.multi_modal_projector.state_dict().items():
        assert torch.equal(v, projector[k]), k
    assert torch.equal(model.layers[2].layer.mlp.up_proj.weight, qwen.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(model.head.lm_head.weight, qwen.lm_head.weight)


def test_ckpt_to_universal_by_hand(trained):
    root, _ = trained
    assert cli(["ckpt", "to-universal", str(root / "run")]) == 0
    universal = root / "run" / "checkpoints" / "universal" / "global_step2"
    assert (universal / "lvita_manifest.json").is_file() and list((universal / "zero").glob("*/fp32.pt"))
    assert len(list(universal.glob("layer_*-model_states.pt"))) == llm_config("tiny").num_hidden_layers + 2
