"""Model presets: the shapes of Long-VITA and of small stand-ins, as transformers configs.

Owns the numbers only; nothing is allocated here. :class:`ModelSpec` is the model's description
(shapes + ``model.format``), built once per run by :func:`spec_of` from ``model.preset`` (a name
below, or a model directory whose config.json gives the shapes: the released Long-VITA layout or
InternVL's) and passed down. ``vision_config(spec)`` and ``llm_config(spec)`` return transformers
``InternVLVisionConfig`` / ``Qwen2Config`` objects (a preset name is accepted too and means that
preset in its own format), so the big presets can be built on the meta device
(``torch.device("meta")``) to check a layout without memory.

Formats: ``longvita`` is the released architecture (ResamplerProjector: LayerNorm(4 x vision) ->
Linear(4 x vision -> vision, no bias) -> GELU -> Linear(vision -> LLM, no bias); vision features at
every ``<IMG_CONTEXT>``/``<PATCH_CONTEXT>``/``<VID_CONTEXT>``), ``internvl`` InternVL's projector
(LayerNorm -> Linear(4 x vision -> LLM) -> GELU -> Linear(LLM -> LLM), with biases).

- ``tiny``: the real architecture (InternViT blocks, pixel shuffle, GQA Qwen2 layers) at a few
  million parameters, 112 px tiles (16 tokens per tile); runs on CPU in tests and the demo.
- ``longvita-1.5b``: InternViT-300M-448px + Qwen2.5-1.5B shapes, for single-GPU benchmarks.
- ``longvita-14b``: InternViT-300M-448px + Qwen2.5-14B-Instruct shapes (the paper's model).

Trade-off: embeddings are untied in every preset (Qwen2.5-1.5B ties them); untied weights keep
the pipeline simple (no TiedLayerSpec) and a tied checkpoint converts by copying.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import InternVLVisionConfig, Qwen2Config

from lvita.model.formats import INTERNVL, LONGVITA, ModelFormat, format_of_model_type, model_format
from lvita.errors import ConfigError

INTERNVIT_300M = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    image_size=[448, 448], patch_size=[14, 14], attention_bias=True, use_qk_norm=False,
    norm_type="layer_norm", layer_norm_eps=1e-6, layer_scale_init_value=0.1, use_mean_pooling=True,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        vision=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            image_size=[112, 112], patch_size=[14, 14], attention_bias=True, use_qk_norm=False,
            norm_type="layer_norm", layer_norm_eps=1e-6, layer_scale_init_value=0.1,
            use_mean_pooling=True,
        ),
        llm=dict(
            hidden_size=160, intermediate_size=432, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1 << 20,
            rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
        ),
    ),
    "longvita-1.5b": dict(
        vision=INTERNVIT_300M,
        llm=dict(
            hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
            num_key_value_heads=2, vocab_size=151936, max_position_embeddings=1 << 20,
            rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
        ),
    ),
    "longvita-14b": dict(
        vision=INTERNVIT_300M,
        llm=dict(
            hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
            num_key_value_heads=8, vocab_size=152064, rms_norm_eps=1e-6,
            rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
            # as the official config_14B.json (Long-VITA@3389e76): 1,310,720 positions (1.25 x 2^20);
            # max_window_layers 70 is Qwen2.5-14B's value, kept there (no sliding window is used)
            max_position_embeddings=1_310_720, max_window_layers=70,
        ),
    ),
}

DOWNSAMPLE_RATIO = 0.5  # pixel shuffle: 2x2 patches -> one token with 4x the channels


@dataclass(frozen=True)
class ModelSpec:
    """The model's description, built once per run (:func:`spec_of`) and passed down: a name (a preset
    or the directory its shapes came from), the format and the two transformers configs' keyword
    arguments (kept as JSON so the value is hashable and cheap to compare)."""
    name: str
    format: ModelFormat
    vision_json: str
    llm_json: str

    @property
    def vision(self) -> dict:
        return json.loads(self.vision_json)

    @property
    def llm(self) -> dict:
        return json.loads(self.llm_json)

    @classmethod
    def make(cls, name: str, fmt: "str | ModelFormat", vision: dict, llm: dict) -> "ModelSpec":
        try:
            fmt = model_format(fmt)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return cls(name, fmt, json.dumps(vision, sort_keys=True), json.dumps(llm, sort_keys=True))

    def __str__(self) -> str:
        return self.name


def _vision_from_internvit(raw: dict) -> dict:
    """OpenGVLab InternViT config fields (the released layout's nested ``visual``) -> InternVLVisionConfig
    keyword arguments; OpenGVLab's model has no final LayerNorm (transformers: use_mean_pooling)."""
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return dict(hidden_size=raw["hidden_size"], num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=raw["num_attention_heads"], intermediate_size=raw["intermediate_size"],
                image_size=pair(raw.get("image_size", 448)), patch_size=pair(raw.get("patch_size", 14)),
                attention_bias=bool(raw.get("qkv_bias", True)), use_qk_norm=bool(raw.get("qk_normalization", False)),
                norm_type=raw.get("norm_type", "layer_norm"), layer_norm_eps=raw.get("layer_norm_eps", 1e-6),
                layer_scale_init_value=0.1, use_mean_pooling=True)


_LLM_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "max_position_embeddings", "rms_norm_eps", "max_window_layers")
# llm keys that decide no tensor's shape or value: a checkpoint fits a spec that differs only in them
NOT_SHAPES = ("max_position_embeddings", "max_window_layers")


def _llm_from_qwen2(raw: dict) -> dict:
    """Qwen2 config fields (top level of the released layout, an InternVL ``text_config``, a Qwen2
    directory) -> the Qwen2Config keyword arguments lvita builds its decoder from."""
    theta = (raw.get("rope_parameters") or {}).get("rope_theta", raw.get("rope_theta", 1e6))
    out = {k: raw[k] for k in _LLM_KEYS if k in raw}
    out.setdefault("num_key_value_heads", out.get("num_attention_heads"))
    return dict(out, rope_parameters={"rope_theta": float(theta), "rope_type": "default"})


def spec_of_config(raw: dict, name: str, fmt: "str | ModelFormat | None" = None) -> ModelSpec:
    """A config.json's dict (released layout ``long_vita``, ``internvl``) -> ModelSpec; ConfigError (a ValueError) otherwise."""
    kind = format_of_model_type(raw.get("model_type") if isinstance(raw, dict) else None)
    if kind is LONGVITA:
        if not isinstance(raw.get("visual"), dict):
            raise ConfigError(f"{name}: config.json has model_type long_vita but no nested 'visual' (InternViT) config")
        return ModelSpec.make(name, fmt or LONGVITA, _vision_from_internvit(raw["visual"]), _llm_from_qwen2(raw))
    if kind is INTERNVL:
        from transformers import InternVLConfig

        cfg = InternVLConfig.from_dict(raw)
        v = {k: getattr(cfg.vision_config, k) for k in PRESETS["tiny"]["vision"]}
        v["image_size"], v["patch_size"] = list(v["image_size"]), list(v["patch_size"])
        return ModelSpec.make(name, fmt or INTERNVL, v, _llm_from_qwen2(cfg.text_config.to_dict()))
    raise ConfigError(f"{name}: config.json has model_type {raw.get('model_type') if isinstance(raw, dict) else None!r}; a model directory for model.preset must be "
                     f"in the released Long-VITA layout (long_vita) or InternVL's (internvl)")


def _read_config(directory: str) -> dict:
    path = Path(str(directory)) / "config.json"
    if not path.is_file():
        raise ConfigError(f"unknown model.preset '{directory}'; choose one of {', '.join(PRESETS)} or a model directory "
                         f"with a config.json (the released Long-VITA layout or InternVL's, or an InternViT and a "
                         f"Qwen2 directory as a list)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.preset {directory}: cannot read {path} ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"model.preset {directory}: {path} is not a JSON object")
    return raw


def _spec_of_pair(dirs, fmt: "str | ModelFormat | None") -> ModelSpec:
    """[InternViT directory, Qwen2 directory] (either order) -> ModelSpec; the projector is new, so
    either format fits (default: longvita, the released architecture)."""
    raws = {str(d): _read_config(d) for d in dirs}
    kinds = {d: r.get("model_type") for d, r in raws.items()}
    vit = [d for d, k in kinds.items() if k in ("intern_vit_6b", "internvl_vision")]
    llm = [d for d, k in kinds.items() if k == "qwen2"]
    if len(dirs) != 2 or len(vit) != 1 or len(llm) != 1:
        raise ConfigError(f"model.preset {list(map(str, dirs))}: a list names an InternViT directory (model_type "
                         f"intern_vit_6b or internvl_vision) and a Qwen2 directory (qwen2); got model_type "
                         f"{list(kinds.values())}")
    raw = raws[vit[0]]
    if kinds[vit[0]] == "intern_vit_6b":
        vision = _vision_from_internvit(raw)
    else:
        cfg = InternVLVisionConfig.from_dict(raw)
        vision = {k: getattr(cfg, k) for k in PRESETS["tiny"]["vision"]}
        vision["image_size"], vision["patch_size"] = list(vision["image_size"]), list(vision["patch_size"])
    return ModelSpec.make(f"{vit[0]} + {llm[0]}", fmt or LONGVITA, vision, _llm_from_qwen2(raws[llm[0]]))


def spec_of(preset: "str | list[str] | ModelSpec", fmt: "str | ModelFormat | None" = None) -> ModelSpec:
    """The model's description from ``model.preset`` (a name in PRESETS, a model directory whose
    config.json gives the shapes, or [InternViT directory, Qwen2 directory]) and ``model.format``
    (None: the preset's own, :func:`default_format`)."""
    if isinstance(preset, ModelSpec):
        if fmt is None or model_format(fmt) is preset.format:
            return preset
        return ModelSpec.make(preset.name, fmt, preset.vision, preset.llm)
    if isinstance(preset, (list, tuple)):
        return spec_of(preset[0], fmt) if len(preset) == 1 else _spec_of_pair(preset, fmt)
    if preset in PRESETS:
        return _named_spec(preset, fmt or PRESET_FORMATS.get(preset, INTERNVL))
    return spec_of_config(_read_config(preset), str(preset), fmt)


def _named_spec(name: str, fmt: "str | ModelFormat") -> ModelSpec:
    return ModelSpec.make(name, fmt, PRESETS[name]["vision"], PRESETS[name]["llm"])


def check_preset(preset: "str | ModelSpec") -> dict:
    spec = spec_of(preset)
    return {"vision": spec.vision, "llm": spec.llm}


def vision_config(preset: "str | ModelSpec") -> InternVLVisionConfig:
    return InternVLVisionConfig(**check_preset(preset)["vision"])


def llm_config(preset: "str | ModelSpec") -> Qwen2Config:
    cfg = Qwen2Config(**check_preset(preset)["llm"], tie_word_embeddings=False, attention_dropout=0.0)
    cfg._attn_implementation = "lvita"  # see lvita.model.attention
    return cfg


def tokens_per_tile(preset: "str | ModelSpec") -> int:
    """Image tokens one tile becomes after pixel shuffle (256 for 448 px tiles, patch 14)."""
    v = check_preset(preset)["vision"]
    side = v["image_size"][0] // v["patch_size"][0]
    return int(side * DOWNSAMPLE_RATIO) ** 2


def tile_size(preset: "str | ModelSpec") -> int:
    return check_preset(preset)["vision"]["image_size"][0]

# model.format of each named preset: the Long-VITA shapes use the released architecture; the tiny
# stand-in keeps InternVL's (today's demo and the transformers-native export tests)
PRESET_FORMATS = {"tiny": INTERNVL, "longvita-1.5b": LONGVITA, "longvita-14b": LONGVITA}


def default_format(preset) -> ModelFormat | None:
    """model.format when the stage leaves it null: a named preset's own; a directory's from its
    config.json (``model_type`` long_vita -> longvita, internvl -> internvl, an InternViT + Qwen2 pair or
    anything else with a config -> longvita, the released architecture). None when it cannot tell."""
    if isinstance(preset, (list, tuple)):  # InternViT + Qwen2: the projector is new
        return LONGVITA if len(preset) != 1 else default_format(preset[0])
    if preset in PRESETS:
        return PRESET_FORMATS.get(preset, INTERNVL)
    path = Path(preset) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return INTERNVL if format_of_model_type(model_type) is INTERNVL else LONGVITA

