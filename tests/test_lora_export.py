"""LoRA checkpoints out to what people use (issue 33 point 3): ``lvita convert to-hf`` merged, PEFT adapter
files (``--adapter-only``) on their base (``--base-only``, or the HF directory the run started from), and
``lvita generate`` reading the checkpoint directly, in both export layouts.

The reference is lvita's own *unmerged* model: LongVita + ``add_adapters`` with the checkpoint's PEFT-named
state loaded (``read_block(merge=False)``), so ``base(x) + alpha/rank * B(A(x))`` as training computed it.
The run is real: two steps of a tiny LoRA stage (adapters on every LLM linear, rank 4, alpha 8, LLM rate
2e-2 so that lora_B, which starts at zero, moves well away from it; vision and projector trained whole at
1e-3) from an HF directory of the same format (``model.init_from``).

Tolerance: 1e-5 on fp32 logits of magnitude ~1 (as tests/test_convert.py and tests/test_remote_code.py):
the noise floor is the same float32 maths in other modules (transformers' or the remote code's attention,
W + s B A merged once vs s B(A x) added per call), measured at most 1.0e-6 (PEFT on the export: 0 for
InternVL, 4.8e-7 for the remote code). The bug signals, measured and asserted (> 1e-2) beside their checks:
adapters lost (the base model's logits) move them by 1.2-1.6, the trained vision + projector left out of
``modules_to_save`` (the start's instead) by 0.66-0.78.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lvita.cli import main as cli
from lvita.config.schema import LoraConfig
from lvita.ckpt.checkpoint import locate
from lvita.ckpt.weights import load_block, local_blocks, read_block
from lvita.data.input_format import InputFormat
from lvita.infer.prompt import build_prompt
from lvita.model.longvita import LongVita
from lvita.model.lora import add_adapters, base_state
from lvita.model.presets import spec_of, tokens_per_tile
from tests.conftest import stage_dict, write_stage
from tests.distributed import run_world
from tests.test_hf import _lvita_logits
from tests.test_training import _train

ATOL = 1e-5
FORMATS = ("internvl", "longvita")


@pytest.fixture(scope="module", params=FORMATS)
def lora_run(request, tmp_path_factory, tokenizer_dir, dataset_dir):
    """(format, run dir, tag dir, HF start dir, input format): a two-step LoRA run from an HF directory."""
    from lvita.ckpt.hf import write_hf_dir
    from lvita.ckpt.released import write_released_dir

    fmt = request.param
    root = tmp_path_factory.mktemp(f"lora_{fmt}")
    spec = spec_of("tiny", fmt)
    ifmt = InputFormat.load(spec, str(tokenizer_dir))
    start = LongVita(spec, ifmt.context_ids, seed=11).state_dict()
    init = root / f"start_{fmt}"
    if fmt == "longvita":
        write_released_dir(start, spec, tokenizer_dir, init)
    else:
        write_hf_dir(start, "tiny", tokenizer_dir, init, ifmt.specials["img_context"])
    cfg = stage_dict(tokenizer_dir, dataset_dir, root / "run", iterations=2, global_batch=2)
    cfg["model"].update(format=fmt, init_from=str(init), trainable=["vision", "projector"],
                        lora={"rank": 4, "alpha": 8})
    cfg["train"]["lr"] = {"vision": 1e-3, "projector": 1e-3, "llm": 2e-2}
    run_world(_train, 1, str(write_stage(root / "s.json", cfg)), [])
    return fmt, root / "run", locate(root / "run", "test").tag_dir, init, ifmt


def _lvita_model(tag_dir, ifmt, adapters: bool):
    """lvita's model of the checkpoint: with its adapters unmerged (PEFT's layers), or its base alone."""
    manifest = json.loads((tag_dir / "lvita_manifest.json").read_text())
    model = LongVita(ifmt.spec, ifmt.context_ids, seed=0)
    if adapters:
        add_adapters(local_blocks(model), LoraConfig(**manifest["lora"]), seed=0)
    for b, block in local_blocks(model).items():
        state = read_block(tag_dir, b, merge=False)
        load_block(block, state if adapters else base_state(state), f"block {b}")
    return model.eval()


def _inputs(ifmt, tmp_path):
    """A chat turn with one wide image (thumbnail + 2 tiles): ids, pixels, the context positions per tile."""
    image = tmp_path / "wide.png"
    Image.new("RGB", (200, 90), "blue").save(image)
    p = build_prompt([{"role": "user", "content": "<image>\nWhat is in the picture?"}], ifmt, [image])
    ids = torch.tensor([p.input_ids])
    positions = torch.tensor([i for i, t in enumerate(p.input_ids) if t in ifmt.context_ids])
    return ids, p.pixel_values, positions.view(p.pixel_values.shape[0], tokens_per_tile(ifmt.spec))


def _load_hf(path, fmt):
    if fmt == "longvita":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(path).eval()


def _hf_logits(model, fmt, ids, pixels, positions):
    with torch.no_grad():
        if fmt == "longvita":  # as the official inference script calls it
            indices = torch.stack([torch.zeros_like(positions), positions])
            return model(input_ids=ids, images=pixels, image_indices=indices, use_cache=False).logits
        return model(input_ids=ids, pixel_values=pixels).logits


def test_merged_export_gives_the_unmerged_lora_models_logits(lora_run, tmp_path):
    fmt, run, tag, _, ifmt = lora_run
    out = tmp_path / f"merged_{fmt}"
    assert cli(["convert", "to-hf", str(run), str(out)]) == 0
    ids, pixels, positions = _inputs(ifmt, tmp_path)
    want = _lvita_logits(_lvita_model(tag, ifmt, adapters=True), ids, pixels)
    got = _hf_logits(_load_hf(out, fmt), fmt, ids, pixels, positions)
    torch.testing.assert_close(got, want, rtol=ATOL, atol=ATOL)  # noise ~1e-6 (module docstring)
    base = _lvita_logits(_lvita_model(tag, ifmt, adapters=False), ids, pixels)
    assert (want - base).abs().max() > 1e3 * ATOL  # the adapters matter: measured 1.2-1.6


def test_adapter_files_apply_with_peft_to_the_base_and_to_the_start(lora_run, tmp_path):
    """``--adapter-only`` on ``--base-only`` (and on the HF directory the run started from, the projector and
    vision tower then coming from ``modules_to_save``) gives the unmerged model's logits; PEFT's own loader
    and writer give the same files back."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    fmt, run, tag, start, ifmt = lora_run
    adapter, base = tmp_path / f"adapter_{fmt}", tmp_path / f"base_{fmt}"
    assert cli(["convert", "to-hf", str(run), str(adapter), "--adapter-only"]) == 0
    assert cli(["convert", "to-hf", str(run), str(base), "--base-only"]) == 0
    assert cli(["convert", "to-hf", str(run), str(adapter), "--adapter-only"]) == 2  # never overwrites
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    saved = {"internvl": ["model.multi_modal_projector", "model.vision_tower"],
             "longvita": ["model.vision_model", "model.vision_projection"]}[fmt]
    assert (config["r"], config["lora_alpha"], sorted(config["modules_to_save"])) == (4, 8, saved)
    ids, pixels, positions = _inputs(ifmt, tmp_path)
    want = _lvita_logits(_lvita_model(tag, ifmt, adapters=True), ids, pixels)
    for base_dir in (base, start):
        model = PeftModel.from_pretrained(_load_hf(base_dir, fmt), str(adapter)).eval()
        got = _hf_logits(model, fmt, ids, pixels, positions)
        torch.testing.assert_close(got, want, rtol=ATOL, atol=ATOL)  # noise ~1e-6 (module docstring)
        if base_dir == base:  # PEFT adapted exactly the linears named, and its save_pretrained writes back the same
            adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}
            assert adapted == set(config["target_modules"]) and len(adapted) == 7 * 4  # every LLM linear of 4 layers
            model.save_pretrained(tmp_path / "again")
            unloaded = _hf_logits(model.merge_and_unload(), fmt, ids, pixels, positions)  # PEFT's own merge
            torch.testing.assert_close(unloaded, want, rtol=ATOL, atol=ATOL)
    # the start's vision + projector differ from the trained ones: modules_to_save is what the check above saw
    before = _hf_logits(_load_hf(start, fmt), fmt, ids, pixels, positions)
    after = _hf_logits(_load_hf(base, fmt), fmt, ids, pixels, positions)
    assert (after - before).abs().max() > 1e3 * ATOL  # measured 0.66-0.78
    ours, theirs = load_file(adapter / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(k.endswith(".lora_B.weight") and ours[k].abs().max() > 1e-2 for k in ours)  # trained, not zero
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    # the base's path; longvita's remote-code module; PEFT shortens a long target list to suffixes that match the
    # same linears (checked above)
    for key in ("base_model_name_or_path", "auto_mapping", "target_modules"):
        again.pop(key), config.pop(key)
    assert {k: sorted(v) if isinstance(v, list) else v for k, v in again.items()} == \
        {k: sorted(v) if isinstance(v, list) else v for k, v in config.items()}


def test_generate_reads_a_lora_checkpoint_merged(lora_run, tmp_path, capsys):
    """``lvita generate --model RUN`` (the merge in lvita.ckpt.weights.read_block) answers as the unmerged model.
    The tiny InternVL run answers <|im_end|> at once (no tokens), so there its first step's logits carry the
    check; the Long-VITA one decodes 8 tokens."""
    from lvita.infer import generate as lvgen
    from lvita.infer.decode import generate

    fmt, run, tag, _, ifmt = lora_run
    question = "What is 3 + 4?"
    system = lvgen.model_system_prompt(run, ifmt.tok)
    p = build_prompt([{"role": "user", "content": question}], ifmt, system_prompt=system)
    unmerged = generate(_lvita_model(tag, ifmt, adapters=True), p.input_ids, p.pixel_values, ifmt.specials,
                        max_new_tokens=8, keep_logits=True)
    capsys.readouterr()
    assert lvgen.main(["--model", str(run), "--prompt", question, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == ifmt.tok.decode(unmerged.tokens).strip() + "\n"
    merged = generate(lvgen.load_model(run)[0], p.input_ids, p.pixel_values, ifmt.specials, max_new_tokens=8,
                      keep_logits=True)
    assert merged.tokens == unmerged.tokens
    torch.testing.assert_close(merged.logits[0], unmerged.logits[0], rtol=ATOL, atol=ATOL)  # noise ~1e-6
    base = generate(_lvita_model(tag, ifmt, adapters=False), p.input_ids, p.pixel_values, ifmt.specials, 1,
                    keep_logits=True)
    assert (base.logits[0] - unmerged.logits[0]).abs().max() > 1e3 * ATOL  # a reader without the merge fails


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lvita convert: error: "), err
    return err[0]


def test_adapter_and_base_exports_refuse_what_they_cannot_write(tokenizer_dir, tmp_path, capsys):
    """One error line each: a checkpoint without adapters, both flags, a trained llm, a fused q/k/v target."""
    from lvita.ckpt.adapter_export import adapter_tensors, saved_module_tensors, trained_modules
    from lvita.ckpt.checkpoint import CheckpointError
    from lvita.ckpt.hf import write_hf_dir
    from lvita.model.formats import INTERNVL, LONGVITA

    ifmt = InputFormat.load(spec_of("tiny"), str(tokenizer_dir))
    write_hf_dir(LongVita("tiny", ifmt.context_ids, seed=1).state_dict(), "tiny", tokenizer_dir, tmp_path / "hf",
                 ifmt.specials["img_context"])
    assert cli(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "plain")]) == 0  # no model.lora
    for flag in ("--adapter-only", "--base-only"):
        line = _error(capsys, ["convert", "to-hf", str(tmp_path / "plain"), str(tmp_path / "out"), flag])
        assert f"{flag}: " in line and "holds no LoRA adapters" in line and f"without {flag}" in line
    line = _error(capsys, ["convert", "to-hf", str(tmp_path / "plain"), str(tmp_path / "out"), "--adapter-only",
                           "--base-only"])
    assert "choose one" in line
    assert not (tmp_path / "out").exists()
    from lvita.ckpt.checkpoint import Found

    zero3 = tmp_path / "zero3"  # whatever the engine's files, the manifest says what trained in full
    with pytest.raises(CheckpointError, match="cannot read the run's model.trainable"):
        trained_modules(Found(zero3, {"lora": {"rank": 4}}))
    assert trained_modules(Found(zero3, {"lora": {"rank": 4}, "trainable": ["projector"]})) == ["projector"]
    with pytest.raises(CheckpointError, match="trained the whole llm"):
        saved_module_tensors({}, ["projector", "llm"], INTERNVL)
    q = "embed.vision.vision_tower.encoder.layer.0.attention.q_proj."
    fused = {q + "lora_A.default.weight": torch.zeros(4, 8), q + "lora_B.default.weight": torch.zeros(8, 4)}
    with pytest.raises(CheckpointError, match="fuses q/k/v into attn.qkv"):
        adapter_tensors(fused, LONGVITA)
    tensors, modules = adapter_tensors(fused, INTERNVL)  # InternVL keeps q_proj a module of its own
    assert modules == ["model.vision_tower.encoder.layer.0.attention.q_proj"]
    assert sorted(tensors) == [f"base_model.model.{modules[0]}.lora_{x}.weight" for x in "AB"]


def test_eval_scores_a_lora_checkpoint_as_its_merged_export(lora_run, tmp_path):
    """``lvita eval --model RUN`` on a LoRA checkpoint predicts what the merged export predicts, item by item, and
    not what the base without the adapters predicts (checked on the released format, whose tiny run decodes text;
    the InternVL one answers <|im_end|> at once)."""
    from lvita import eval as lveval
    from lvita.ckpt.convert import to_hf

    fmt, run, tag, _, _ = lora_run
    if fmt != "longvita":
        pytest.skip("the tiny InternVL run answers nothing: no predictions to tell apart")
    items = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                           {"role": "assistant", "content": str(a + b)}]} for a, b in ((3, 4), (12, 30), (7, 8))]
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in items))
    merged, base = tmp_path / "merged", tmp_path / "base"
    to_hf(str(run), str(merged), log=lambda *a: None)
    to_hf(str(run), str(base), log=lambda *a: None, base_only=True)
    preds = {}
    for name, model in (("run", run), ("merged", merged), ("base", base)):
        assert lveval.main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / name)]) == 0
        preds[name] = [json.loads(x)["prediction"] for x in (tmp_path / name / "predictions.jsonl").open()]
    assert preds["run"] == preds["merged"], preds
    assert preds["run"] != preds["base"], preds  # an eval that dropped the adapters would fail the line above
