"""Hugging Face export/import: logits match transformers, separate ViT + Qwen2 dirs, clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from lvita.ckpt.hf import from_hf_state, to_hf_state, write_hf_dir
from lvita.ckpt.hf_read import CheckpointError, read_hf
from lvita.model.longvita import LongVita
from lvita.model.presets import PRESETS, llm_config, tokens_per_tile, vision_config
from lvita.data.tokenizer import load_tokenizer, special_token_ids
from lvita.errors import PathError


@pytest.fixture(scope="module")
def ids(tokenizer_dir):
    return special_token_ids(load_tokenizer(tokenizer_dir))


@pytest.fixture(scope="module")
def model(ids):
    return LongVita("tiny", ids["img_context"], seed=7).eval()


@pytest.fixture(scope="module")
def hf_dir(model, ids, tokenizer_dir, tmp_path_factory):
    return write_hf_dir(model.state_dict(), "tiny", tokenizer_dir, tmp_path_factory.mktemp("hf") / "out",
                        ids["img_context"])


def _legacy_key(key: str) -> str:
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model."):]
    return key[len("model."):]


def _lvita_logits(model, input_ids, pixel_values):
    with torch.no_grad():
        hidden = model.embed(input_ids, pixel_values)
        pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
        for layer in model.layers:
            hidden = layer(hidden, pos)
        return model.head.lm_head(model.head(hidden))


def test_round_trip_logits_and_weights(model, ids, hf_dir):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    hf, info = AutoModelForImageTextToText.from_pretrained(hf_dir, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert hf.config.text_config._attn_implementation in ("sdpa", "eager")
    n = tokens_per_tile("tiny")
    torch.manual_seed(0)
    input_ids = torch.randint(10, 1000, (1, 48))
    input_ids[0, 4], input_ids[0, 5 + n] = ids["img_start"], ids["img_end"]
    input_ids[0, 5:5 + n] = ids["img_context"]
    pixel_values = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        got = hf.eval()(input_ids=input_ids, pixel_values=pixel_values).logits
    # noise: the same fp32 arithmetic in transformers' modules, ~1e-6 (logits ~1); bug: a tensor not
    # mapped stays random (>= 1e-2), a RoPE position off by one 2.2e-3, image tokens not replaced ~1e-1
    torch.testing.assert_close(got, _lvita_logits(model, input_ids, pixel_values), rtol=1e-5, atol=1e-5)

    state, missing = read_hf([hf_dir], "tiny")
    plain = model.state_dict()
    assert missing == [] and state.keys() == plain.keys()
    assert all(torch.equal(state[k], plain[k]) for k in plain)
    hf_state = to_hf_state(plain)
    assert from_hf_state(hf_state).keys() == plain.keys()
    legacy = {_legacy_key(k): v for k, v in hf_state.items()}  # transformers < 4.52 layout
    assert "language_model.model.norm.weight" in legacy and "vision_tower.embeddings.cls_token" in legacy
    assert all(from_hf_state(legacy)[k] is plain[k] for k in plain)

    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert (tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id) == (
        ids["img_start"], ids["img_end"], ids["img_context"])
    assert tok.video_token == "<video>" and tok.video_token_id < llm_config("tiny").vocab_size


def _processor(hf_dir):
    """The exported processor. transformers' InternVLProcessor builds a video processor that needs
    torchvision; where torchvision is missing (the CPU test machines: the PyPI torchvision wheel does
    not load against the CPU torch build) the same files are read part by part: processor_config.json
    (image processor + image_seq_length), chat_template.jinja and the tokenizer, with the PIL image
    backend that AutoImageProcessor picks without torchvision."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, InternVLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(hf_dir)
    class ImagesOnly(InternVLProcessor):  # the base class looks the video processor class up: torchvision
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    cfg = json.loads((hf_dir / "processor_config.json").read_text())
    return ImagesOnly(image_processor=AutoImageProcessor.from_pretrained(hf_dir, backend="pil"),
                             tokenizer=AutoTokenizer.from_pretrained(hf_dir), video_processor=None,
                             image_seq_length=cfg["image_seq_length"],
                             chat_template=(hf_dir / "chat_template.jinja").read_text())


def test_processor_loads(hf_dir, ids):
    from PIL import Image

    proc = _processor(hf_dir)
    assert proc.image_seq_length == tokens_per_tile("tiny") and proc.image_token_id == ids["img_context"]
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    enc = proc(text=text, images=[Image.new("RGB", (112, 112))], return_tensors="pt")
    assert enc["pixel_values"].shape == (1, 3, 112, 112)
    assert int((enc["input_ids"] == ids["img_context"]).sum()) == tokens_per_tile("tiny")


def _photo(width: int, height: int, seed: int):
    """A photo-like RGB image: smooth colour gradients, hard-edged shapes, sensor noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 17.0 + y / 29.0)], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.ellipse([x0, y0, x0 + width // 4, y0 + height // 4], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


@pytest.mark.parametrize("width,height", [(640, 480), (500, 300), (333, 333), (90, 400), (1200, 200), (700, 1000)])
def test_exported_processor_gives_the_training_tiles(hf_dir, tmp_path, width, height):
    """transformers' InternVL image processor loaded from the export cuts an image into the grid lvita
    trains on (tile count, order, thumbnail) with the same normalised pixels, bit for bit."""
    from lvita.data.media import image_tiles, normalise, tile_count

    path = tmp_path / "photo.png"
    _photo(width, height, seed=width).save(path)
    want = normalise(image_tiles(path, 112))  # what the packer feeds the model
    assert want.shape[0] == tile_count(width, height, 1, 12, 112)
    from PIL import Image

    with Image.open(path) as img:
        got = _processor(hf_dir).image_processor(images=[img], return_tensors="pt")
    assert got["num_patches"].tolist() == [want.shape[0]]
    assert got["pixel_values"].shape == want.shape and torch.equal(got["pixel_values"], want)


def _save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


def test_separate_vit_and_qwen2_dirs(tmp_path):
    from transformers import InternVLVisionModel, Qwen2ForCausalLM

    torch.manual_seed(1)
    vit = InternVLVisionModel(vision_config("tiny"))
    cfg = llm_config("tiny")
    cfg._attn_implementation, cfg.tie_word_embeddings = "sdpa", True
    qwen = Qwen2ForCausalLM(cfg)
    state, missing = read_hf([_save(qwen, tmp_path / "qwen"), _save(vit, tmp_path / "vit")], "tiny")
    want = {f"embed.vision.vision_tower.{k}": v for k, v in vit.state_dict().items()}
    emb = qwen.model.embed_tokens.weight
    want.update({"embed.embed_tokens.weight": emb, "head.lm_head.weight": emb})
    want["head.norm.weight"] = qwen.model.norm.weight
    want.update({f"layers.{i}.layer.{k}": v for i, layer in enumerate(qwen.model.layers)
                 for k, v in layer.state_dict().items()})
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)
    assert missing == sorted(k for k in LongVita("tiny", 5).state_dict() if ".multi_modal_projector." in k)
    assert len(missing) == 6


# transformers InternVLVisionModel -> OpenGVLab InternViT names (transformers' converter, reversed).
TO_ORIGINAL = [("encoder.layer.", "encoder.layers."), ("cls_token", "class_embedding"),
               ("position_embeddings", "position_embedding"), ("patch_embeddings.projection", "patch_embedding"),
               ("lambda_", "ls"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
               ("attention.projection_layer", "attn.proj"), ("attention.", "attn.")]


def test_original_internvit_format(tmp_path, monkeypatch):
    """OpenGVLab's InternViT layout (fused qkv, ls1, norm1, ...), as transformers' converter reads it."""
    from transformers import InternVLVisionModel, Qwen2ForCausalLM

    vcfg = dict(PRESETS["tiny"]["vision"], use_mean_pooling=False)  # a final LayerNorm the original lacks
    monkeypatch.setitem(PRESETS, "tiny-final-norm", dict(PRESETS["tiny"], vision=vcfg))
    torch.manual_seed(2)
    vit = InternVLVisionModel(vision_config("tiny"))
    sd, orig = vit.state_dict(), {}
    for k, v in sd.items():
        if ".attention.q_proj." in k:
            qkv = [sd[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            k, v = k.replace("q_proj", "qkv"), torch.cat(qkv)
        elif ".attention.k_proj." in k or ".attention.v_proj." in k:
            continue
        for a, b in TO_ORIGINAL:
            k = k.replace(a, b)
        orig[k] = v.contiguous()
    from safetensors.torch import save_file

    (tmp_path / "vit").mkdir()
    save_file(orig, tmp_path / "vit" / "model.safetensors")
    (tmp_path / "vit" / "config.json").write_text(json.dumps(dict(
        model_type="intern_vit_6b", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        image_size=112, patch_size=14, qkv_bias=True, qk_normalization=False, norm_type="layer_norm")))
    cfg = llm_config("tiny")
    cfg._attn_implementation = "sdpa"
    qwen_dir = _save(Qwen2ForCausalLM(cfg), tmp_path / "qwen")
    state, _ = read_hf([tmp_path / "vit", qwen_dir], "tiny")
    for k, v in sd.items():
        assert torch.equal(state[f"embed.vision.vision_tower.{k}"], v), k
    with pytest.raises(CheckpointError, match=r"use_mean_pooling=True, the preset has False.*"
                                              r"missing keys embed.vision.vision_tower.layernorm"):
        read_hf([tmp_path / "vit", qwen_dir], "tiny-final-norm")


def test_missing_shard(model, ids, tokenizer_dir, tmp_path):
    out = write_hf_dir(model.state_dict(), "tiny", tokenizer_dir, tmp_path / "sharded", ids["img_context"],
                       max_shard_size="300KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert read_hf([out], "tiny")[0].keys() == model.state_dict().keys()
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"names shard\(s\) missing from .*sharded: {shards[1].name}"):
        read_hf([out], "tiny")


def test_truncated_file(hf_dir, tmp_path):
    bad = shutil.copytree(hf_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"bad/model.safetensors is truncated or not a safetensors file"):
        read_hf([bad], "tiny")


def test_preset_mismatch(hf_dir):
    want = (r"does not fit model.preset='longvita-1.5b' \(choose model.preset='tiny'\)"
            r".*text hidden_size=160, the preset has 1536"
            r".*embed.embed_tokens.weight has shape \(2048, 160\), the preset expects \(151936, 1536\)")
    with pytest.raises(CheckpointError, match=want):
        read_hf([hf_dir], "longvita-1.5b")
    from lvita.model.presets import spec_of

    # the right shapes in the other format: the projectors differ, so it is refused by name
    with pytest.raises(CheckpointError, match=r"is in the internvl format \(model_type internvl\) but model.format "
                                              r"is 'longvita': the projectors differ. Set model.format=internvl"):
        read_hf([hf_dir], spec_of("tiny", "longvita"))


def test_missing_files_and_dirs(hf_dir, tmp_path):
    with pytest.raises(CheckpointError, match="nowhere is not a directory"):
        read_hf([tmp_path / "nowhere"], "tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty has no config.json"):
        read_hf([tmp_path / "empty"], "tiny")
    shutil.copy(hf_dir / "config.json", tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weights in .*empty"):
        read_hf([tmp_path / "empty"], "tiny")
    with pytest.raises(CheckpointError, match=r"expected one directory in the released Long-VITA layout \(model_type long_vita\) or InternVL.s \(internvl\), or an InternViT \+ a Qwen2"):
        read_hf([hf_dir, hf_dir], "tiny")


def test_write_refuses_non_empty_dir_and_leaves_nothing_on_error(model, ids, tokenizer_dir, tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(PathError, match="taken exists and is not an empty directory"):
        write_hf_dir(model.state_dict(), "tiny", tokenizer_dir, tmp_path / "taken", ids["img_context"])
    assert (tmp_path / "taken" / "x").read_text() == "keep"
    plain = dict(model.state_dict())
    plain.pop("head.norm.weight")
    with pytest.raises(CheckpointError, match="does not fit model.preset='tiny': missing keys head.norm.weight"):
        write_hf_dir(plain, "tiny", tokenizer_dir, tmp_path / "new", ids["img_context"])
    with pytest.raises(ValueError, match=r"to_hf_state: missing keys head.norm.weight"):
        to_hf_state(plain)
    with pytest.raises(ValueError, match=r"to_hf_state: unknown keys extra.weight"):
        to_hf_state({**model.state_dict(), "extra.weight": torch.zeros(1)})
    def crash(*a):
        raise RuntimeError("disk full")

    monkeypatch.setattr("lvita.ckpt.hf._write_processor", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_hf_dir(model.state_dict(), "tiny", tokenizer_dir, tmp_path / "new", ids["img_context"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
