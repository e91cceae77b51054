"""The released Long-VITA layout (``VITA-MLLM/Long-VITA-*_HF``), in and out of lvita's plain state dict.

Owns the key mapping, as pure functions over state dicts, and the writer of ``lvita convert to-hf
--format longvita``. The layout is the official ``LongVITAForCausalLM`` (repository
``VITA-MLLM/Long-VITA``, ``long_vita/models/long_vita_qwen2_intern/``):

- ``model.vision_model.*``: OpenGVLab's InternViT (``embeddings.class_embedding``,
  ``embeddings.patch_embedding``, ``embeddings.position_embedding``, per layer ``attn.qkv`` (q, k, v
  fused by rows), ``attn.proj``, ``ls1``/``ls2``, ``norm1``/``norm2``, ``mlp.fc1``/``mlp.fc2``);
  lvita's are transformers' names (split q/k/v, ``lambda_1``, ``layernorm_before``, ...).
- ``model.vision_projection.{pre_proj_layernorm,mlp.0,mlp.2}``: lvita's
  ``embed.vision.multi_modal_projector.*`` under ``model.format: longvita`` (same tails).
- ``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``, ``lm_head``: the Qwen2 decoder.
- config.json: Qwen2's fields at the top level, ``model_type: long_vita``, the InternViT config
  nested under ``visual`` (OpenGVLab's names).

    released = to_released_state(plain)            # same tensors, renamed; q/k/v concatenated
    plain = from_released_state(released)          # the inverse (q/k/v split back)
    write_released_dir(plain, spec, "runs/s4/tokenizer", "export/long-vita")

Reading a released directory for a rank is :mod:`lvita.ckpt.hf_read`'s (``released_key_to_plain``
is the shared rule; it reads a third of a fused qkv by rows without loading the rest).

The export also carries lvita's own modelling code for ``long_vita`` (``lvita/ckpt/remote_code/``:
``configuration_long_vita.py``, ``modeling_long_vita.py`` and the InternViT pair, self-contained,
torch + transformers only) named by ``auto_map`` in config.json, so it loads as the released
``*_HF`` directories do: ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``
(transformers 4.49 and 5.x), ``generate(inputs=ids, images=..., image_indices=...)``.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from lvita.model.formats import LONGVITA

REMOTE_CODE = Path(__file__).resolve().parent / "remote_code"  # package data, copied into every export
# config.json's auto_map, as the official classes register themselves (LongVITAConfig.register_for_auto_class...)
AUTO_MAP = {"AutoConfig": "configuration_long_vita.LongVITAConfig", "AutoModel": "modeling_long_vita.LongVITAModel",
            "AutoModelForCausalLM": "modeling_long_vita.LongVITAForCausalLM"}
VISUAL_AUTO_MAP = {"AutoConfig": "configuration_intern_vit.InternVisionConfig",
                   "AutoModel": "modeling_intern_vit.InternVisionModel"}
VISION, PROJECTOR = "embed.vision.vision_tower.", "embed.vision.multi_modal_projector."
# OpenGVLab InternViT tail -> transformers tail (lvita's), as transformers' InternVL conversion does it
_VIT_RULES = [(r"\.layers\.", ".layer."), (r"class_embedding", "cls_token"),
              (r"position_embedding$", "position_embeddings"),
              (r"patch_embedding\.", "patch_embeddings.projection."), (r"\.ls(\d)$", r".lambda_\1"),
              (r"\.attn\.proj\.", ".attention.projection_layer."), (r"\.attn\.", ".attention."),
              (r"\.norm1\.", ".layernorm_before."), (r"\.norm2\.", ".layernorm_after.")]
# ... and back
_VIT_BACK = [(r"\.layer\.", ".layers."), (r"cls_token", "class_embedding"),
             (r"position_embeddings$", "position_embedding"),
             (r"patch_embeddings\.projection\.", "patch_embedding."), (r"\.lambda_(\d)$", r".ls\1"),
             (r"\.attention\.projection_layer\.", ".attn.proj."), (r"\.attention\.", ".attn."),
             (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2.")]
_FIXED = [("model.embed_tokens.weight", "embed.embed_tokens.weight"), ("model.norm.weight", "head.norm.weight"),
          ("lm_head.weight", "head.lm_head.weight")]
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_PLAIN_LAYER = re.compile(r"layers\.(\d+)\.layer\.(.+)")
_QKV = (".q_proj.", ".k_proj.", ".v_proj.")


def released_key_to_plain(key: str) -> str | None:
    """A released key -> lvita's plain key; a fused ``attn.qkv`` maps to the key with ``.qkv.``
    (split by the caller into q_proj/k_proj/v_proj, a third of the rows each); None: not a model key."""
    if key.startswith("model.vision_model."):
        tail = key[len("model.vision_model."):]
        for pat, rep in _VIT_RULES:
            tail = re.sub(pat, rep, tail)
        return VISION + tail if tail.split(".")[0] in ("embeddings", "encoder") else None
    if key.startswith("model.vision_projection."):
        return PROJECTOR + key[len("model.vision_projection."):]
    for src, dst in _FIXED:
        if key == src:
            return dst
    m = _LAYER.fullmatch(key)
    return f"layers.{m.group(1)}.layer.{m.group(2)}" if m else None


def plain_key_to_released(key: str) -> str | None:
    """The inverse of :func:`released_key_to_plain` (q/k/v map to ``attn.qkv``); None: not mappable."""
    if key.startswith(VISION):
        tail = key[len(VISION):]
        for q in _QKV:
            tail = tail.replace(".attention" + q, ".attention.qkv.")
        for pat, rep in _VIT_BACK:
            tail = re.sub(pat, rep, tail)
        return "model.vision_model." + tail
    if key.startswith(PROJECTOR):
        return "model.vision_projection." + key[len(PROJECTOR):]
    for dst, src in _FIXED:
        if key == src:
            return dst
    m = _PLAIN_LAYER.fullmatch(key)
    return f"model.layers.{m.group(1)}.{m.group(2)}" if m else None


def to_released_state(plain: dict) -> dict:
    """Plain state dict -> released ``LongVITAForCausalLM`` state dict (q, k, v concatenated by rows
    into ``attn.qkv``; every other tensor the same object). ValueError names unknown keys."""
    out, unknown, fused = {}, [], {}
    for k, v in plain.items():
        if k.endswith("inv_freq"):
            continue
        new = plain_key_to_released(k)
        if new is None or (k.startswith(PROJECTOR) and not k[len(PROJECTOR):].startswith(("pre_proj_layernorm.", "mlp."))):
            unknown.append(k)
        elif ".attn.qkv." in new:
            fused.setdefault(new, {})[next(i for i, q in enumerate(_QKV) if q in k)] = v
        else:
            out[new] = v
    if unknown:
        raise ValueError(f"to_released_state: keys with no place in the released layout: {sorted(unknown)[:4]} "
                         f"(an InternVL-format model's projector? export it with --format internvl)")
    for k, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(f"to_released_state: {k} needs q, k and v; got {sorted(parts)}")
        out[k] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out


def from_released_state(released: dict) -> dict:
    """Released state dict -> plain state dict (``attn.qkv`` split into thirds by rows)."""
    out, unknown = {}, []
    for k, v in released.items():
        if k.endswith("inv_freq"):
            continue
        new = released_key_to_plain(k)
        if new is None:
            unknown.append(k)
        elif ".attention.qkv." in new:
            for part, name in zip(v.chunk(3, dim=0), ("q_proj", "k_proj", "v_proj")):
                out[new.replace(".qkv.", f".{name}.")] = part
        else:
            out[new] = v
    if unknown:
        raise ValueError(f"from_released_state: keys lvita does not know: {sorted(unknown)[:4]}")
    return out


def released_config(spec, specials: dict | None = None, dtype: str = "bfloat16") -> dict:
    """config.json as released (``config_14B.json``'s fields, ``auto_map`` naming the bundled code) for
    the model described by ``spec``; ``dtype``: the weights' (``torch_dtype``, at both levels).
    ``max_window_layers``: the spec's (Qwen2.5-14B's 70 in ``longvita-14b``, a directory's own), else
    the layer count; it only matters with sliding windows, which Long-VITA leaves off."""
    from lvita.model.presets import llm_config, spec_of, vision_config

    spec = spec_of(spec)
    lc, vc = llm_config(spec), vision_config(spec)
    specials = specials or {}
    visual = {"architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.0, "dropout": 0.0,
              "hidden_act": vc.hidden_act, "hidden_size": vc.hidden_size, "image_size": vc.image_size[0],
              "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": vc.intermediate_size,
              "layer_norm_eps": vc.layer_norm_eps, "model_type": "intern_vit_6b", "norm_type": vc.norm_type,
              "num_attention_heads": vc.num_attention_heads, "num_channels": 3,
              "num_hidden_layers": vc.num_hidden_layers, "patch_size": vc.patch_size[0],
              "qk_normalization": bool(vc.use_qk_norm), "qkv_bias": bool(vc.attention_bias), "torch_dtype": dtype,
              "use_flash_attn": True, "auto_map": dict(VISUAL_AUTO_MAP)}
    return {"visual": visual, "architectures": ["LongVITAForCausalLM"], "auto_map": dict(AUTO_MAP),
            "attention_dropout": 0.0,
            "bos_token_id": specials.get("endoftext"), "eos_token_id": specials.get("im_end"), "hidden_act": "silu",
            "hidden_size": lc.hidden_size, "initializer_range": 0.02, "intermediate_size": lc.intermediate_size,
            "max_position_embeddings": lc.max_position_embeddings,
            "max_window_layers": spec.llm.get("max_window_layers", lc.num_hidden_layers),
            "model_type": "long_vita", "num_attention_heads": lc.num_attention_heads,
            "num_hidden_layers": lc.num_hidden_layers, "num_key_value_heads": lc.num_key_value_heads,
            "rms_norm_eps": lc.rms_norm_eps, "rope_theta": float(lc.rope_parameters["rope_theta"]),
            "sliding_window": lc.max_position_embeddings, "tie_word_embeddings": False, "torch_dtype": dtype,
            "use_cache": True, "use_sliding_window": False, "vocab_size": lc.vocab_size}


def remote_code_files() -> list[Path]:
    """The modelling files an export carries (``lvita/ckpt/remote_code/*.py``, installed as package data)."""
    files = sorted(REMOTE_CODE.glob("*.py"))
    names = {f.name for f in files}
    need = {m.split(".")[0] + ".py" for m in [*AUTO_MAP.values(), *VISUAL_AUTO_MAP.values()]}
    if not need <= names:
        from lvita.ckpt.checkpoint import CheckpointError

        raise CheckpointError(f"lvita's modelling code for the export is incomplete: {sorted(need - names)} missing "
                              f"from {REMOTE_CODE} (a broken install? reinstall lvita)")
    return files


def generation_config(specials: dict) -> dict:
    """generation_config.json as released (its sampling defaults), with this tokenizer's ids."""
    end, eot = specials["im_end"], specials["endoftext"]
    return {"bos_token_id": eot, "pad_token_id": eot, "do_sample": True, "eos_token_id": [end, eot],
            "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}


def _save_shards(state: dict, out: Path, max_shard_bytes: int) -> None:
    """safetensors shards of at most ``max_shard_bytes`` (one file: model.safetensors) + the index."""
    from safetensors.torch import save_file

    shards, size = [[]], 0
    for k in sorted(state):
        n = state[k].numel() * state[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    if len(shards) == 1:
        save_file({k: state[k].contiguous() for k in shards[0]}, str(out / "model.safetensors"), {"format": "pt"})
        return
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k].contiguous() for k in keys}, str(out / name), {"format": "pt"})
        weight_map.update({k: name for k in keys})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def write_released_dir(plain: dict, spec, tokenizer_dir: str | Path, out_dir: str | Path,
                       max_shard_bytes: int = 5 << 30) -> Path:
    """Write ``out_dir`` in the released layout: config.json, safetensors, the tokenizer with the 17
    official added tokens, generation_config.json and the modelling code config.json's ``auto_map`` names. Refuses a non-empty ``out_dir`` (PathError)
    and a state dict that does not fit ``spec`` or is not in the longvita format (CheckpointError)."""
    from lvita.ckpt.checkpoint import CheckpointError, staged_dir
    from lvita.ckpt.hf import _ROTARY, _mismatch
    from lvita.data.tokenizer import load_tokenizer, special_token_ids
    from lvita.model.presets import spec_of
    from lvita.errors import PathError

    spec = spec_of(spec)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PathError(f"write_released_dir: {out} exists and is not an empty directory; choose a new out_dir")
    if spec.format is not LONGVITA:
        raise CheckpointError(f"--format {LONGVITA} writes the released architecture, but the checkpoint's model.format "
                              f"is '{spec.format}' (another projector); export it with --format {spec.format}")
    problems = _mismatch(spec, {k: v.shape for k, v in plain.items() if not _ROTARY.search(k)})
    if problems:
        raise CheckpointError(f"write_released_dir: the state dict does not fit {spec.name} ({spec.format}): "
                              + "; ".join(problems))
    tok = with_official_tokens(load_tokenizer(tokenizer_dir, LONGVITA))
    specials = special_token_ids(tok, LONGVITA)
    vocab = spec.llm["vocab_size"]
    if len(tok) > vocab:
        raise CheckpointError(f"the tokenizer has {len(tok)} tokens with the 17 Long-VITA tokens; the model's "
                              f"embedding has {vocab} rows")
    released = to_released_state(plain)
    with staged_dir(out) as tmp:
        _save_shards(released, tmp, max_shard_bytes)
        cfg = released_config(spec, specials, str(next(iter(released.values())).dtype).replace("torch.", ""))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for code in remote_code_files():
            shutil.copyfile(code, tmp / code.name)
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(specials), indent=2) + "\n")
        tok.save_pretrained(str(tmp))
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
    return out


def _portable_tokenizer_config(path: Path) -> None:
    """tokenizer_config.json readable by the transformers the official code runs on (4.x) as well as by
    5.x: the special-token list under its 4.x name ``additional_special_tokens`` (4.49 fails on a list
    under ``extra_special_tokens``), the generic fast class under its 4.x name, no 5.x-only keys.
    Checked once by hand: transformers 4.49 and 5.x load the result with the same ids."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = list(dict.fromkeys(cfg.get("additional_special_tokens", []) + extra))
    elif extra:
        cfg["extra_special_tokens"] = extra
    for key in ("backend", "is_local", "local_files_only"):
        cfg.pop(key, None)
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def official_tokens() -> list[str]:
    """The 17 tokens ``long_vita/tokenizer.py`` adds, in its order (lvita.data.tokenizer's list when present)."""
    from lvita.data import tokenizer as t

    return list(getattr(t, "LONGVITA_ADDED_TOKENS", None) or getattr(t, "OFFICIAL_ADDED_TOKENS", None) or [
        "<img>", "</img>", "<IMG_CONTEXT>", "<vid>", "</vid>", "<VID_CONTEXT>", "<patch>", "</patch>",
        "<PATCH_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<image>", "<video>"])


def with_official_tokens(tok):
    """The tokenizer with whichever of the 17 official tokens it lacks added (special, in order)."""
    missing = [t for t in official_tokens() if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return tok
