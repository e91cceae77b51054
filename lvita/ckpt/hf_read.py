"""Reading Hugging Face weights for ``model.init_from`` and ``lvita convert from-hf``: a directory
in the released Long-VITA layout (``model_type: long_vita``), an InternVL directory, or an
InternViT directory (transformers' or OpenGVLab's original format) plus a Qwen2 directory, into
lvita's plain state dict.

Every key and shape is checked against the model description (preset + format) from the
safetensors headers and config.json first; a one-directory checkpoint must be in the model's
format (the projectors differ). Then only the tensors a caller keeps are read
(``read_hf(keep=...)``: a pipeline rank reads only its blocks; safetensors are memory-mapped and
indexed by name; a fused qkv is read by the rows of the third asked for). The key mappings and the
writing sides are :mod:`lvita.ckpt.hf`'s (InternVL) and :mod:`lvita.ckpt.released`'s (released).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lvita.ckpt.checkpoint import CheckpointError
from lvita.ckpt.hf import (PROJECTOR, _ROTARY, _expected_shapes, _few, _hf_key_to_plain, _mismatch,
                           _rename)
from lvita.ckpt.released import released_key_to_plain
from lvita.model.formats import INTERNVL, LONGVITA, format_of_model_type
from lvita.model.presets import PRESETS, spec_of, llm_config, vision_config

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

    if kind == INTERNVL.hf_model_type:
        cfg = InternVLConfig.from_dict(raw)
        if cfg.text_config.model_type != "qwen2":
            raise CheckpointError(f"read_hf: {d} has a {cfg.text_config.model_type} language model; lvita's is Qwen2")
        return {"vision": _fields(cfg.vision_config.to_dict(), _VISION_FIELDS),
                "text": _fields(cfg.text_config.to_dict(), _TEXT_FIELDS)}, bool(cfg.tie_word_embeddings)
    if kind == LONGVITA.hf_model_type:  # the released layout: Qwen2 at the top level, OpenGVLab's InternViT under visual
        if not isinstance(raw.get("visual"), dict):
            raise CheckpointError(f"read_hf: {d}/config.json has model_type long_vita but no nested 'visual' config")
        vision, _ = _parse_config("intern_vit_6b", raw["visual"], d)
        cfg = Qwen2Config.from_dict({k: v for k, v in raw.items() if k not in ("visual", "model_type")})
        return {**vision, "text": _fields(cfg.to_dict(), _TEXT_FIELDS)}, bool(raw.get("tie_word_embeddings", False))
    if kind == "qwen2":
        cfg = Qwen2Config.from_dict(raw)
        return {"text": _fields(cfg.to_dict(), _TEXT_FIELDS)}, bool(cfg.tie_word_embeddings)
    if kind == "internvl_vision":
        return {"vision": _fields(InternVLVisionConfig.from_dict(raw).to_dict(), _VISION_FIELDS)}, False
    # intern_vit_6b: OpenGVLab's names; it has no final LayerNorm (HF: use_mean_pooling=True).
    return {"vision": _fields({**{_VIT6B_NAMES.get(k, k): v for k, v in raw.items()}, "use_mean_pooling": True},
                              _VISION_FIELDS)}, False


def _config_problems(found: dict[str, dict], preset) -> list[str]:
    want = {"vision": _fields(vision_config(preset).to_dict(), _VISION_FIELDS),
            "text": _fields(llm_config(preset).to_dict(), _TEXT_FIELDS)}
    return [f"{part} {k}={v}, the preset has {want[part][k]}"
            for part, vals in found.items() for k, v in vals.items() if v != want[part][k]]


def _read_config(d: Path) -> dict:
    if not d.is_dir():
        raise CheckpointError(f"read_hf: {d} is not a directory")
    if not (d / "config.json").is_file():
        raise CheckpointError(f"read_hf: {d} has no config.json; point at a Hugging Face model directory")
    return json.loads((d / "config.json").read_text())


def _headers(d: Path) -> dict[str, tuple[Path, tuple]]:
    """HF key -> (file, shape), from the safetensors headers only; checks shards and truncation."""
    from safetensors import safe_open

    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
        if lost := [f.name for f in files if not f.is_file()]:
            raise CheckpointError(f"read_hf: {index} names shard(s) missing from {d}: {_few(lost)}")
    elif not (files := sorted(d.glob("*.safetensors"))):
        raise CheckpointError(f"read_hf: no *.safetensors weights in {d} (pytorch_model.bin is not read; "
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
        if kind == INTERNVL.hf_model_type:
            new = _hf_key_to_plain(k)
        elif kind == LONGVITA.hf_model_type:
            new = released_key_to_plain(k)
            if new and ".attention.qkv." in new:
                third = (shape[0] // 3, *shape[1:])
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    plan[new.replace(".qkv.", f".{name}.")] = (f, k, i, third)
                continue
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




def read_hf(paths: list[str | Path], preset, keep=None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read HF weights into a plain state dict for ``preset``: ``(state, missing_keys)``.

    ``keep(plain_key) -> bool`` (optional) selects the tensors to read, e.g. a pipeline rank's
    blocks: keys and shapes are still checked for the whole model from the safetensors headers,
    but only the kept tensors' bytes are read (each shard is memory-mapped; shards holding none of
    them are not read at all).

    ``preset``: the model's description (:class:`lvita.model.presets.ModelSpec`) or a preset name.
    ``paths``: one directory in the released Long-VITA layout (model_type "long_vita", needs
    model.format longvita), one InternVL directory (model_type internvl, model.format internvl), or
    an InternViT directory
    (model_type "internvl_vision" or "intern_vit_6b") and a Qwen2 directory, in either order.
    ``missing_keys`` is empty for one directory and the projector's keys for two: fill them from a
    fresh ``LongVita(preset, ...)``; any other gap is an error. A tied or absent ``lm_head`` is
    copied from the token embeddings. Raises CheckpointError: no directory, config.json, weights
    or shard, a corrupt file, keys or shapes not fitting ``preset``.
    """
    preset = spec_of(preset)
    dirs = [Path(p) for p in paths]
    cfgs = [_read_config(d) for d in dirs]
    kinds = [c.get("model_type") for c in cfgs]
    one_dir = format_of_model_type(kinds[0]) if len(kinds) == 1 else None  # the model.format its projector is
    if one_dir is None and \
            sorted(kinds) not in (sorted([v, "qwen2"]) for v in _VISION_KINDS):
        raise CheckpointError(f"read_hf: expected one directory in the released Long-VITA layout (model_type "
                              f"long_vita) or InternVL's (internvl), or an InternViT + a Qwen2 directory; "
                              f"got model_type {kinds} in {', '.join(map(str, dirs))}")
    found, tied, plan = {}, False, {}
    for kind, cfg, d in zip(kinds, cfgs, dirs):
        fields, tie = _parse_config(kind, cfg, d)
        found, tied = {**found, **fields}, tied or tie
        plan.update(_plan(kind, _headers(d), d))
    if ("head.lm_head.weight" not in plan or tied) and "embed.embed_tokens.weight" in plan:
        plan["head.lm_head.weight"] = plan["embed.embed_tokens.weight"]  # loaded twice: two tensors
    allow = (lambda k: k.startswith(PROJECTOR)) if len(dirs) == 2 else (lambda k: False)
    shapes_fit = not _config_problems(found, preset)
    if shapes_fit and one_dir is not None and one_dir is not preset.format:
        raise CheckpointError(f"read_hf: {dirs[0]} is in the {one_dir} format (model_type "
                              f"{kinds[0]}) but model.format is '{preset.format}': the projectors differ. Set "
                              f"model.format={one_dir} (or leave it null with model.preset={dirs[0]})")
    problems = _config_problems(found, preset) + _mismatch(preset, {k: p[3] for k, p in plan.items()}, allow)
    if problems:
        fits = [n for n in PRESETS if not _config_problems(found, n)]
        hint = (f"choose model.preset='{fits[0]}'" if fits else
                f"no preset in lvita/model/presets.py matches it; set model.preset={dirs[0]} to take its shapes")
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
