"""Hugging Face weights in and out: lvita's plain state dict <-> transformers' InternVL layout.

Owns the key mapping between :class:`lvita.model.longvita.LongVita`'s ``state_dict()`` (the
"plain" dict) and ``InternVLForConditionalGeneration``'s, as pure functions (litgpt style), plus
a directory writer and reader:

- ``to_hf_state(plain)`` / ``from_hf_state(hf)``: renames only, no copies. ``embed.vision.*`` <->
  ``model.{vision_tower,multi_modal_projector}.*``, ``embed.embed_tokens`` <->
  ``model.language_model.embed_tokens``, ``layers.N.layer.*`` <-> ``model.language_model.layers.N.*``,
  ``head.norm`` <-> ``model.language_model.norm``, ``head.lm_head`` <-> ``lm_head``. Rotary
  ``inv_freq`` buffers are non-persistent on both sides and are dropped if present (rebuilt from
  the config). Unknown or missing keys raise ValueError naming them.
- ``hf_config(preset, image_token_id)``: the InternVLConfig computing what lvita computes (CLS
  dropped, pixel shuffle 0.5, LayerNorm/Linear/GELU/Linear projector, untied embeddings).
- ``write_hf_dir(plain, preset, tokenizer_dir, out_dir, image_token_id)``: a transformers-native
  directory (config, safetensors, tokenizer, processor) for ``AutoModelForImageTextToText`` and
  ``AutoProcessor``; written to a sibling temp dir and renamed, so ``out_dir`` is never half-written.
- ``read_hf([dir], preset)`` (an InternVL HF dir) or ``read_hf([vit_dir, qwen2_dir], preset)``
  -> ``(plain state, missing keys)``; only projector keys can be missing (separate dirs hold none).

    from lvita.ckpt.hf import read_hf, write_hf_dir
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

from lvita.model.presets import DOWNSAMPLE_RATIO, PRESETS, check_preset, llm_config, tile_size, \
    tokens_per_tile, vision_config
from lvita.ckpt.checkpoint import CheckpointError, staged_dir
from lvita.config.schema import DataConfig
from lvita.data.template import jinja_chat_template
from lvita.data.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, load_tokenizer, special_token_ids

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


def to_hf_state(plain: dict) -> dict:
    """Plain state dict -> ``InternVLForConditionalGeneration`` state dict (same tensors, renamed)."""
    _check_complete(plain, "to_hf_state")
    return _map(plain, lambda k: _rename(k, _PREFIXES, _PLAIN_LAYER, "model.language_model.layers.{}.{}"),
                "to_hf_state")


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

    Refuses (FileExistsError) a non-empty ``out_dir``; ValueError when ``plain`` does not fit
    ``preset`` or ``image_token_id`` is not the tokenizer's ``<IMG_CONTEXT>``.
    """
    from transformers import InternVLForConditionalGeneration

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"write_hf_dir: {out} exists and is not an empty directory; choose a new out_dir")
    tok = load_tokenizer(tokenizer_dir)
    if special_token_ids(tok)["img_context"] != image_token_id:
        raise ValueError(f"image_token_id={image_token_id} but tokenizer {tokenizer_dir} has {IMG_CONTEXT} "
                         f"= {special_token_ids(tok)['img_context']}; export with the model's own tokenizer")
    problems = _mismatch(preset, {k: v.shape for k, v in plain.items() if not _ROTARY.search(k)})
    if problems:
        raise ValueError(f"write_hf_dir: the state dict does not fit model.preset='{preset}': " + "; ".join(problems))
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
        raise ValueError(f"the tokenizer's {VIDEO_TOKEN} id {vid} does not fit the {vocab_size}-row embedding")
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


# ----------------------------------------------------------------------------- reading

_VISION_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                  "patch_size", "norm_type", "use_qk_norm", "use_mean_pooling", "attention_bias")
_TEXT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rope_theta")
_VIT6B_NAMES = {"qkv_bias": "attention_bias", "qk_normalization": "use_qk_norm"}
_QWEN2 = [("model.embed_tokens.weight", "embed.embed_tokens.weight"), ("model.norm.weight", "head.norm.weight"),
          ("lm_head.weight", "head.lm_head.weight")]
_QWEN2_LAYER, _VISION_KINDS = re.compile(r"model\.layers\.(\d+)\.(.+)"), ("internvl_vision", "intern_vit_6b")
# OpenGVLab InternViT -> transformers, as transformers' convert_internvl_weights_to_hf.py does it.
_VIT6B_RULES = [(r"^vision_model\.", ""), (r"\.layers\.", ".layer."), (r"class_embedding", "cls_token"),
                (r"position_embedding$", "position_embeddings"),
                (r"patch_embedding\.", "patch_embeddings.projection."), (r"\.ls(\d)$", r".lambda_\1"),
                (r"\.attn\.proj\.", ".attention.projection_layer."), (r"\.attn\.", ".attention."),
                (r"\.norm1\.", ".layernorm_before."), (r"\.norm2\.", ".layernorm_after.")]


def _fields(cfg: dict, names) -> dict:
    cfg = dict(cfg, rope_theta=(cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta")))
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return {n: pair(cfg.get(n)) if n in ("image_size", "patch_size") else cfg.get(n) for n in names}


def _parse_config(kind: str, raw: dict, d: Path) -> tuple[dict, bool]:
    """-> ({"vision"|"text": shape-deciding fields}, lm_head tied), with transformers' defaults."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    if kind == "internvl":
        cfg = InternVLConfig.from_dict(raw)
        if cfg.text_config.model_type != "qwen2":
            raise CheckpointError(f"read_hf: {d} has a {cfg.text_config.model_type} language model; lvita's is Qwen2")
        return {"vision": _fields(cfg.vision_config.to_dict(), _VISION_FIELDS),
                "text": _fields(cfg.text_config.to_dict(), _TEXT_FIELDS)}, bool(cfg.tie_word_embeddings)
    if kind == "qwen2":
        cfg = Qwen2Config.from_dict(raw)
        return {"text": _fields(cfg.to_dict(), _TEXT_FIELDS)}, bool(cfg.tie_word_embeddings)
    if kind == "internvl_vision":
        return {"vision": _fields(InternVLVisionConfig.from_dict(raw).to_dict(), _VISION_FIELDS)}, False
    # intern_vit_6b: OpenGVLab's names; it has no final LayerNorm (HF: use_mean_pooling=True).
    return {"vision": _fields({**{_VIT6B_NAMES.get(k, k): v for k, v in raw.items()}, "use_mean_pooling": True},
                              _VISION_FIELDS)}, False


def _config_problems(found: dict[str, dict], preset: str) -> list[str]:
    want = {"vision": _fields(vision_config(preset).to_dict(), _VISION_FIELDS),
            "text": _fields(llm_config(preset).to_dict(), _TEXT_FIELDS)}
    return [f"{part} {k}={v}, the preset has {want[part][k]}"
            for part, vals in found.items() for k, v in vals.items() if v != want[part][k]]


def _read_config(d: Path) -> dict:
    if not d.is_dir():
        raise FileNotFoundError(f"read_hf: {d} is not a directory")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"read_hf: {d} has no config.json; point at a Hugging Face model directory")
    return json.loads((d / "config.json").read_text())


def _headers(d: Path) -> dict[str, tuple[Path, tuple]]:
    """HF key -> (file, shape), from the safetensors headers only; checks shards and truncation."""
    from safetensors import safe_open

    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
        if lost := [f.name for f in files if not f.is_file()]:
            raise FileNotFoundError(f"read_hf: {index} names shard(s) missing from {d}: {_few(lost)}")
    elif not (files := sorted(d.glob("*.safetensors"))):
        raise FileNotFoundError(f"read_hf: no *.safetensors weights in {d} (pytorch_model.bin is not read; "
                                f"re-save with save_pretrained(safe_serialization=True))")
    out = {}
    for f in files:
        try:
            with safe_open(f, "pt") as h:
                out.update({k: (f, tuple(h.get_slice(k).get_shape())) for k in h.keys()})
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"read_hf: {f} is truncated or not a safetensors file ({e})") from None
    return out


def _plan(kind: str, heads: dict, d: Path) -> dict[str, tuple[Path, str, int | None, tuple]]:
    """plain key -> (file, HF key, third of a fused qkv or None, plain shape)."""
    plan, unknown = {}, []
    vprefix = "embed.vision.vision_tower."
    for k, (f, shape) in heads.items():
        if _ROTARY.search(k):
            continue
        if kind == "internvl":
            new = _hf_key_to_plain(k)
        elif kind == "qwen2":
            new = _rename(k, _QWEN2, _QWEN2_LAYER, "layers.{}.layer.{}")
        elif kind == "internvl_vision":
            tail = re.sub(r"^(model\.vision_tower\.|vision_tower\.|internvl_vision\.)", "", k)
            new = vprefix + tail if tail.split(".")[0] in ("embeddings", "encoder", "layernorm") else None
        else:  # intern_vit_6b
            tail = k
            for pat, rep in _VIT6B_RULES:
                tail = re.sub(pat, rep, tail)
            new = vprefix + tail if tail.split(".")[0] in ("embeddings", "encoder") else None
            if new and ".attention.qkv." in new:
                third = (shape[0] // 3, *shape[1:])
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    plan[new.replace(".qkv.", f".{name}.")] = (f, k, i, third)
                continue
        (unknown.append(k) if new is None else plan.__setitem__(new, (f, k, None, shape)))
    if unknown:
        raise CheckpointError(f"read_hf: {d} ({kind}) has keys lvita does not know: {_few(unknown)}")
    return plan


def read_hf(paths: list[str | Path], preset: str, keep=None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read HF weights into a plain state dict for ``preset``: ``(state, missing_keys)``.

    ``keep(plain_key) -> bool`` (optional) selects the tensors to read, e.g. a pipeline rank's
    blocks: keys and shapes are still checked for the whole model from the safetensors headers,
    but only the kept tensors' bytes are read (each shard is memory-mapped; shards holding none of
    them are not read at all).

    ``paths``: one InternVL directory (model_type "internvl"), or an InternViT directory
    (model_type "internvl_vision" or "intern_vit_6b") and a Qwen2 directory, in either order.
    ``missing_keys`` is empty for one directory and the projector's keys for two: fill them from a
    fresh ``LongVita(preset, ...)``; any other gap is an error. A tied or absent ``lm_head`` is
    copied from the token embeddings. Raises FileNotFoundError (no directory, config.json, weights
    or shard) or CheckpointError (corrupt file, keys or shapes not fitting ``preset``).
    """
    check_preset(preset)
    dirs = [Path(p) for p in paths]
    cfgs = [_read_config(d) for d in dirs]
    kinds = [c.get("model_type") for c in cfgs]
    if kinds != ["internvl"] and sorted(kinds) not in (sorted([v, "qwen2"]) for v in _VISION_KINDS):
        raise CheckpointError(f"read_hf: expected one InternVL directory or an InternViT + a Qwen2 directory; "
                              f"got model_type {kinds} in {', '.join(map(str, dirs))}")
    found, tied, plan = {}, False, {}
    for kind, cfg, d in zip(kinds, cfgs, dirs):
        fields, tie = _parse_config(kind, cfg, d)
        found, tied = {**found, **fields}, tied or tie
        plan.update(_plan(kind, _headers(d), d))
    if ("head.lm_head.weight" not in plan or tied) and "embed.embed_tokens.weight" in plan:
        plan["head.lm_head.weight"] = plan["embed.embed_tokens.weight"]  # loaded twice: two tensors
    allow = (lambda k: k.startswith(PROJECTOR)) if len(dirs) == 2 else (lambda k: False)
    problems = _config_problems(found, preset) + _mismatch(preset, {k: p[3] for k, p in plan.items()}, allow)
    if problems:
        fits = [n for n in PRESETS if not _config_problems(found, n)]
        hint = (f"choose model.preset='{fits[0]}'" if fits else
                "no preset in lvita/model/presets.py matches it")
        raise CheckpointError(f"read_hf: {', '.join(map(str, dirs))} does not fit model.preset='{preset}' "
                              f"({hint}): " + "; ".join(problems))
    missing = sorted(k for k in _expected_shapes(preset) if k not in plan)
    return _load({k: p for k, p in plan.items() if keep is None or keep(k)}), missing


def _load(plan: dict) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted({p[0] for p in plan.values()}):
        try:
            with safe_open(f, "pt") as h:
                for key, (file, hf_key, third, _) in plan.items():
                    if file == f:
                        if third is None:
                            out[key] = h.get_tensor(hf_key)
                        else:  # one third of a fused qkv: read only its rows
                            n = h.get_slice(hf_key).get_shape()[0] // 3
                            out[key] = h.get_slice(hf_key)[third * n:(third + 1) * n]
        except Exception as e:  # a file that changed or broke after its header was read
            raise CheckpointError(f"read_hf: cannot read {f} ({e})") from None
    return out
