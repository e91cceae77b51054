"""Hugging Face weights in and out: lvita's plain state dict <-> transformers' InternVL layout.

Owns the key mapping between :class:`lvita.model.longvita.LongVita`'s ``state_dict()`` (the
"plain" dict) and ``InternVLForConditionalGeneration``'s, as pure functions (litgpt style), plus
a directory writer and reader:

- ``to_hf_state(plain)`` / ``from_hf_state(hf)``: renames only, no copies (``plain_key_to_hf``: one key).
  ``embed.vision.*`` <-> ``model.{vision_tower,multi_modal_projector}.*``, ``embed.embed_tokens`` <->
  ``model.language_model.embed_tokens``, ``layers.N.layer.*`` <-> ``model.language_model.layers.N.*``,
  ``head.norm`` <-> ``model.language_model.norm``, ``head.lm_head`` <-> ``lm_head``. Rotary
  ``inv_freq`` buffers are non-persistent on both sides and are dropped if present (rebuilt from
  the config). Unknown or missing keys raise ValueError naming them.
- ``hf_config(preset, image_token_id)``: the InternVLConfig computing what lvita computes (CLS
  dropped, pixel shuffle 0.5, LayerNorm/Linear/GELU/Linear projector, untied embeddings).
- ``write_hf_dir(plain, preset, tokenizer_dir, out_dir, image_token_id)``: a transformers-native
  directory (config, safetensors, tokenizer, processor) for ``AutoModelForImageTextToText`` and
  ``AutoProcessor``; written to a sibling temp dir and renamed, so ``out_dir`` is never half-written.
- ``lvita.ckpt.hf_read.read_hf([dir], preset)`` (an InternVL HF dir) or ``read_hf([vit_dir, qwen2_dir], preset)``
  -> ``(plain state, missing keys)``; only projector keys can be missing (separate dirs hold none).

    from lvita.ckpt.hf import write_hf_dir; from lvita.ckpt.hf_read import read_hf
    write_hf_dir(model.state_dict(), "tiny", "demo_out/tokenizer", "export/tiny-hf", image_token_id=5)
    state, missing = read_hf(["export/tiny-hf"], "tiny")               # missing == []
    state, missing = read_hf([vit_dir, qwen2_dir], preset)              # missing: projector keys
    full = LongVita(preset, image_token_id).state_dict(); full.update(state)

Trade-offs: processor files are written as JSON (transformers 5.24 cannot build
``InternVLProcessor`` without torchvision, which lvita does not need; ``AutoProcessor`` needs it
to load them, the model and tokenizer do not). The tokenizer gains ``<video>``, the placeholder
InternVL's processor expands into frames (``Frame1: <img>...</img>``, a prefix lvita's video
template lacks); its embedding row is never used. ``chat_template.jinja`` is lvita's ChatML with the
stage's default system prompt.
Weights are read as safetensors only. OpenGVLab's original InternViT format (``intern_vit_6b``)
is mapped as transformers' conversion script does (fused qkv split in three).
"""
from __future__ import annotations

import json
import re
import shutil
from functools import lru_cache
from pathlib import Path

import torch

from lvita.model.formats import INTERNVL
from lvita.model.presets import DOWNSAMPLE_RATIO, llm_config, tile_size, \
    tokens_per_tile, vision_config
from lvita.ckpt.checkpoint import CheckpointError, staged_dir
from lvita.config.schema import DataConfig
from lvita.data.template import jinja_chat_template
from lvita.data.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, load_tokenizer, special_token_ids
from lvita.errors import PathError

VIDEO_TOKEN = "<video>"
NAMED_TOKENS = {"start_image_token": IMG_START, "end_image_token": IMG_END,
                "context_image_token": IMG_CONTEXT, "video_token": VIDEO_TOKEN}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # as lvita.data.media
PROJECTOR = "embed.vision.multi_modal_projector."

# (plain prefix, HF prefix); the layer rule is a regex below. Keys keep their tails.
_PREFIXES = [("embed.vision.vision_tower.", "model.vision_tower."), (PROJECTOR, "model.multi_modal_projector."),
             ("embed.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
             ("head.norm.weight", "model.language_model.norm.weight"), ("head.lm_head.weight", "lm_head.weight")]
_PLAIN_LAYER = re.compile(r"layers\.(\d+)\.layer\.(.+)")
_HF_LAYER = re.compile(r"model\.language_model\.layers\.(\d+)\.(.+)")
_ROTARY = re.compile(r"(^|\.)(rotary|rotary_emb)\.(inv_freq|original_inv_freq)$")
# Older llava-style layout (language_model.model.*, vision_tower.*, ...) -> the current one.
_LEGACY = [("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
           ("language_model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
           ("multi_modal_projector.", "model.multi_modal_projector.")]
_REQUIRED = ["embed.embed_tokens.weight", "head.norm.weight", "head.lm_head.weight",
             "embed.vision.vision_tower.embeddings.cls_token", PROJECTOR + "linear_1.weight"]


def _few(keys, n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _rename(key: str, rules, layer_from: re.Pattern, layer_to: str) -> str | None:
    for src, dst in rules:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):]
    m = layer_from.fullmatch(key)
    return layer_to.format(m.group(1), m.group(2)) if m else None


def _check_complete(plain: dict, what: str) -> None:
    """Structural completeness: fixed keys present, decoder layers 0..N-1 each with the same tails."""
    missing = [k for k in _REQUIRED if k not in plain]
    layers: dict[int, set] = {}
    for k in plain:
        if m := _PLAIN_LAYER.fullmatch(k):
            layers.setdefault(int(m.group(1)), set()).add(m.group(2))
    full = set().union(*layers.values()) if layers else set()
    missing += [f"layers.{i}.layer.*" for i in range(max(layers, default=-1) + 1) if i not in layers]
    missing += [f"layers.{i}.layer.{t}" for i in layers for t in sorted(full - layers[i])]
    if missing or not layers:
        raise ValueError(f"{what}: missing keys {_few(missing or ['layers.0.layer.*'])}")


def _map(state: dict, rename, what: str) -> dict:
    out, unknown = {}, []
    for k, v in state.items():
        if not _ROTARY.search(k):  # non-persistent buffers; rebuilt from the config
            new = rename(k)
            (unknown.append(k) if new is None else out.__setitem__(new, v))
    if unknown:
        raise ValueError(f"{what}: unknown keys {_few(unknown)}")
    return out


def plain_key_to_hf(key: str) -> str | None:
    """One plain key -> its ``InternVLForConditionalGeneration`` key (None: no place there); the rule of
    :func:`to_hf_state`, also what names an adapted linear in an adapter export (lvita.ckpt.adapter_export)."""
    return _rename(key, _PREFIXES, _PLAIN_LAYER, "model.language_model.layers.{}.{}")


def to_hf_state(plain: dict) -> dict:
    """Plain state dict -> ``InternVLForConditionalGeneration`` state dict (same tensors, renamed)."""
    _check_complete(plain, "to_hf_state")
    return _map(plain, plain_key_to_hf, "to_hf_state")


def _hf_key_to_plain(key: str) -> str | None:
    for old, new in _LEGACY:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    return _rename(key, [(h, p) for p, h in _PREFIXES], _HF_LAYER, "layers.{}.layer.{}")


def from_hf_state(hf: dict) -> dict:
    """``InternVLForConditionalGeneration`` state dict (also the older llava layout) -> plain state dict."""
    out = _map(hf, _hf_key_to_plain, "from_hf_state")
    _check_complete(out, "from_hf_state")
    return out


def hf_config(preset: str, image_token_id: int, attn_implementation: str = "sdpa"):
    """InternVLConfig of ``preset``: same vision/text configs, text attention a standard kernel."""
    from transformers import InternVLConfig

    cfg = InternVLConfig(vision_config=vision_config(preset).to_dict(), text_config=llm_config(preset).to_dict(),
                         image_token_id=image_token_id, image_seq_length=tokens_per_tile(preset),
                         downsample_ratio=DOWNSAMPLE_RATIO, projector_hidden_act="gelu",
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)
    cfg.text_config.tie_word_embeddings = False
    cfg.architectures = ["InternVLForConditionalGeneration"]
    cfg._attn_implementation = attn_implementation
    return cfg


@lru_cache(maxsize=4)
def _expected_shapes(preset: str) -> dict[str, tuple]:
    from lvita.model.longvita import LongVita

    with torch.device("meta"):
        model = LongVita(preset, image_token_id=0)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _mismatch(preset: str, shapes: dict[str, tuple], allow_missing=lambda k: False) -> list[str]:
    """Problems of ``shapes`` (plain key -> shape) against ``preset``; empty when it fits."""
    want = _expected_shapes(preset)
    bad = [f"{k} has shape {tuple(shapes[k])}, the preset expects {want[k]}"
           for k in sorted(want) if k in shapes and tuple(shapes[k]) != want[k]]
    missing = [k for k in want if k not in shapes and not allow_missing(k)]
    extra = [k for k in shapes if k not in want]
    return (bad[:3] + ([f"{len(bad) - 3} more shape mismatches"] if len(bad) > 3 else [])
            + ([f"missing keys {_few(missing)}"] if missing else [])
            + ([f"unexpected keys {_few(extra)}"] if extra else []))


def write_hf_dir(plain: dict, preset: str, tokenizer_dir: str | Path, out_dir: str | Path,
                 image_token_id: int, max_shard_size: str | int = "5GB",
                 system_prompt: str | None = DataConfig.system_prompt) -> Path:
    """Write a transformers-native InternVL directory; returns ``out_dir``. Its chat template adds
    ``system_prompt`` (the stage's ``data.system_prompt``) to conversations without a system turn,
    as training did.

    Refuses (PathError) a non-empty ``out_dir``; CheckpointError when ``plain`` does not fit
    ``preset`` or ``image_token_id`` is not the tokenizer's ``<IMG_CONTEXT>``.
    """
    from transformers import InternVLForConditionalGeneration

    from lvita.model.presets import spec_of

    preset = spec_of(preset)
    if preset.format is not INTERNVL:
        raise CheckpointError(f"write_hf_dir: InternVLForConditionalGeneration has InternVL's projector, but the model is "
                              f"in model.format='{preset.format}'; export it with --format {preset.format}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PathError(f"write_hf_dir: {out} exists and is not an empty directory; choose a new out_dir")
    tok = load_tokenizer(tokenizer_dir)
    if special_token_ids(tok)["img_context"] != image_token_id:
        raise CheckpointError(f"image_token_id={image_token_id} but tokenizer {tokenizer_dir} has {IMG_CONTEXT} "
                              f"= {special_token_ids(tok)['img_context']}; export with the model's own tokenizer")
    problems = _mismatch(preset, {k: v.shape for k, v in plain.items() if not _ROTARY.search(k)})
    if problems:
        raise CheckpointError(f"write_hf_dir: the state dict does not fit model.preset='{preset}': " + "; ".join(problems))
    with staged_dir(out) as tmp:
        cfg = hf_config(preset, image_token_id)
        cfg.text_config.eos_token_id, cfg.text_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
        with torch.device("meta"):
            model = InternVLForConditionalGeneration(cfg)
        model.load_state_dict(to_hf_state(plain), strict=True, assign=True)
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        template = jinja_chat_template(system_prompt)
        _write_tokenizer(tok, tmp, cfg.text_config.vocab_size, template)
        _write_processor(tmp, preset, template)
    return out


def _write_tokenizer(tok, out: Path, vocab_size: int, template: str) -> None:
    from transformers import AutoTokenizer

    if VIDEO_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"extra_special_tokens": [VIDEO_TOKEN]}, replace_extra_special_tokens=False)
    if (vid := tok.convert_tokens_to_ids(VIDEO_TOKEN)) >= vocab_size:
        raise CheckpointError(f"the tokenizer's {VIDEO_TOKEN} id {vid} does not fit the {vocab_size}-row embedding")
    stage = out / ".tokenizer"
    tok.chat_template = template  # replaces the source tokenizer's (Qwen2.5's names another system prompt)
    tok.save_pretrained(stage)
    # *_token kwargs become named ("model specific") special tokens, saved in tokenizer_config.json.
    AutoTokenizer.from_pretrained(stage, **NAMED_TOKENS).save_pretrained(out)
    shutil.rmtree(stage)


def _write_processor(out: Path, preset: str, template: str) -> None:
    size = {"height": tile_size(preset), "width": tile_size(preset)}
    common = dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True, resample=3,
                  rescale_factor=1 / 255, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, size=size)
    proc = {"processor_class": "InternVLProcessor", "image_seq_length": tokens_per_tile(preset),
            "image_processor": dict(common, image_processor_type="GotOcr2ImageProcessor",
                                    crop_to_patches=True, min_patches=1, max_patches=12),
            "video_processor": dict(common, video_processor_type="InternVLVideoProcessor",
                                    do_sample_frames=False, initial_shift=True, return_metadata=False)}
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(template)
