"""``lvita convert`` and ``model.init_from`` end to end: a pipeline-2 checkpoint exported to HF gives
the same logits in transformers as in lvita; HF directories (InternVL, or InternViT + Qwen2) start a
stage with exactly their weights; and ``lvita ckpt to-universal`` converts by hand."""
from __future__ import annotations

import pytest
import torch

from lvita.data.input_format import InputFormat
from lvita.ckpt.checkpoint import tokenizer_fingerprint
from lvita.cli import main as cli
from lvita.model.longvita import LongVita
from lvita.model.presets import llm_config, tokens_per_tile, vision_config
from lvita.data.tokenizer import load_tokenizer, special_token_ids
from lvita.infer.decode import generate
from lvita.ckpt.weights import init_from
from tests.conftest import stage_dict, write_stage
from tests.distributed import run_world
from tests.test_hf import _lvita_logits, _save
from tests.test_training import _layer_states, _train


SYSTEM = 'You are lvita\'s "test" model.\nAnswer briefly.'


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir, dataset_dir):
    """Three steps at pipeline 2 x data 1, ZeRO-1, saved at steps 2 and 3 (bf16 ZeRO-1 would do as well;
    fp32 keeps logits comparable at 1e-5). Step 3's loss is the reference for resuming step 2 elsewhere."""
    root = tmp_path_factory.mktemp("convert")
    cfg = stage_dict(tokenizer_dir, dataset_dir, root / "run", iterations=3, save_every=2)
    cfg["data"]["system_prompt"] = SYSTEM  # not the default: exports and generate must carry the stage's own
    stage = write_stage(root / "s.json", cfg)
    losses = run_world(_train, 2, str(stage), ["parallel.pipeline=2"])[0]
    return root, stage, losses


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

    root, *_ = trained
    _, ids, fp = tok
    assert cli(["convert", "to-hf", str(root / "run"), str(tmp_path / "hf")]) == 0
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    model = LongVita("tiny", ids["img_context"], seed=123).eval()
    assert "global_step3" in init_from(model, str(root / "run"), "tiny", fp)
    input_ids, pixels = _inputs(ids)
    with torch.no_grad():
        got = hf(input_ids=input_ids, pixel_values=pixels).logits
    # noise: the same fp32 arithmetic in another module (transformers' SDPA vs lvita's attention), logits
    # of size ~1 agree to ~1e-6; bug: a weight left out of the export leaves it random (a lost layer or
    # head: >= 1e-2), a RoPE position off by one moves the last logits 2.2e-3
    torch.testing.assert_close(got, _lvita_logits(model, input_ids, pixels), rtol=1e-5, atol=1e-5)
    assert cli(["convert", "to-hf", str(root / "run"), str(tmp_path / "hf")]) == 2  # never overwrites


def test_from_hf_and_init_from_hf_start_a_pipeline_stage_with_those_weights(trained, tok, tmp_path):
    root, stage, _ = trained
    _, ids, fp = tok
    saved = _layer_states(root / "run" / "checkpoints" / "global_step3")
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


def test_ckpt_to_universal_by_hand(trained, tmp_path):
    """Step 2 (pipeline 2 x data 1) converted by hand, resumed at pipeline 1 x data 2: the copy is used
    as it is (not converted again) and step 3 gives the uninterrupted run's loss."""
    import shutil

    root, stage, ref = trained
    tag = root / "run" / "checkpoints" / "global_step2"
    assert cli(["ckpt", "to-universal", str(tag)]) == 0
    universal = root / "run" / "checkpoints" / "universal" / "global_step2"
    assert (universal / "lvita_manifest.json").is_file() and list((universal / "zero").glob("*/fp32.pt"))
    assert len(list(universal.glob("layer_*-model_states.pt"))) == llm_config("tiny").num_hidden_layers + 2
    out = tmp_path / "dp2"
    shutil.copytree(tag, out / "checkpoints" / "global_step2")
    shutil.copytree(universal, out / "checkpoints" / "universal" / "global_step2")
    made = {p: p.stat().st_mtime_ns for p in (out / "checkpoints" / "universal").rglob("*")}
    losses = run_world(_train, 2, str(stage), ["parallel.pipeline=1", f"output_dir={out}"])[0]
    # noise: fp32 losses summed in another layout's order (~1e-7); bug: Adam moments or the LR position
    # lost in the conversion moves the next loss by ~4e-3 (tests/measure_noise.py bf16)
    assert losses == pytest.approx(ref[2:], rel=1e-5)
    # reused: not one file of the hand-made copy rewritten, nothing added
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints" / "universal").rglob("*")} == made


def _same_greedy(hf, lv_model, input_ids: list[int], ids: dict, pixel_values, n: int = 8) -> list[int]:
    """transformers' own greedy generate and lvita's decode the same tokens (cut where lvita stops, at
    <|im_end|> / <|endoftext|>) from the same logits (1e-4) at every step; returns lvita's first logits."""
    kw = {"pixel_values": pixel_values} if pixel_values.shape[0] else {}
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([input_ids]), max_new_tokens=n, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, **kw)
    new = out.sequences[0, len(input_ids):].tolist()
    stop = next((i for i, t in enumerate(new) if t in (ids["im_end"], ids["endoftext"])), len(new))
    gen = generate(lv_model, input_ids, pixel_values, ids, max_new_tokens=n, keep_logits=True)
    assert gen.tokens == new[:stop]
    for a, b in zip(gen.logits, out.logits):  # noise: fp32 cache vs transformers' cache, ~1e-6 (logits ~1);
        # bug: a decode step at the wrong position 2.2e-3, a cached token lost 4.4e-2 (test_generate)
        torch.testing.assert_close(a, b[0], rtol=1e-4, atol=1e-4)
    return gen.logits[0]


def test_exported_chat_template_answers_as_lvita_generate(trained, tmp_path, capsys):
    """The HF export's chat template builds the prompt training built (the stage's system prompt
    included), so plain transformers greedy-decodes the tokens `lvita generate` decodes."""
    import json

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from lvita.infer import generate as lvgen
    from lvita.infer.prompt import build_prompt

    root, *_ = trained
    run = root / "run"
    assert json.loads((run / "checkpoints" / "global_step3" / "lvita_manifest.json").read_text())["system_prompt"] == SYSTEM
    assert cli(["convert", "to-hf", str(run), str(tmp_path / "hf")]) == 0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    model, fmt = lvgen.load_model(run)
    tok, ids, preset = fmt.tok, fmt.specials, fmt.spec
    assert lvgen.model_system_prompt(run, tok) == lvgen.model_system_prompt(tmp_path / "hf", hf_tok) == SYSTEM
    image = tmp_path / "wide.png"
    Image.new("RGB", (200, 90), "blue").save(image)  # 2 tiles + thumbnail

    question = "What is 3 + 4?"
    hf_ids = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    lv = build_prompt([{"role": "user", "content": question}], InputFormat.of(preset, tok), system_prompt=SYSTEM)
    assert hf_ids == lv.input_ids
    first = _same_greedy(hf, model, hf_ids, ids, lv.pixel_values)
    capsys.readouterr()
    assert lvgen.main(["--model", str(run), "--prompt", question, "--max-new-tokens", "8"]) == 0
    got = generate(model, lv.input_ids, lv.pixel_values, ids, max_new_tokens=8).tokens
    assert capsys.readouterr().out == tok.decode(got).strip() + "\n"  # the CLI defaults to the stage's prompt
    without = build_prompt([{"role": "user", "content": question}], InputFormat.of(preset, tok), system_prompt=None)
    other = generate(model, without.input_ids, without.pixel_values, ids, 1, keep_logits=True).logits[0]
    assert (other - first).abs().max() > 1e-3  # the old export (no system turn) would have failed above

    # an image: the template's <IMG_CONTEXT> expanded as InternVLProcessor does (start + context x 256 x tiles + end)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    text = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    lv = build_prompt([{"role": "user", "content": "<image>\nWhat is in the picture?"}], InputFormat.of(preset, tok), [image],
                      system_prompt=SYSTEM)
    n_tiles = lv.pixel_values.shape[0]
    assert n_tiles == 3
    text = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * tokens_per_tile(preset) * n_tiles + "</img>", 1)
    hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert hf_ids == lv.input_ids
    _same_greedy(hf, model, hf_ids, ids, lv.pixel_values)

    # an explicit system turn replaces the default on both sides
    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": question}]
    assert hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False) == \
        build_prompt(chat, InputFormat.of(preset, tok), system_prompt=SYSTEM).input_ids
    # and the export converted back remembers it
    assert cli(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back"), "--preset", "tiny"]) == 0
    assert lvgen.model_system_prompt(tmp_path / "back", tok) == SYSTEM
