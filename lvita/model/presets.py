"""Model presets: the shapes of Long-VITA and of small stand-ins, as transformers configs.

Owns the numbers only; nothing is allocated here. ``vision_config(name)`` and ``llm_config(name)``
return transformers ``InternVLVisionConfig`` / ``Qwen2Config`` objects, so the big presets can be
built on the meta device (``torch.device("meta")``) to check a layout without memory.

- ``tiny``: the real architecture (InternViT blocks, pixel shuffle, GQA Qwen2 layers) at a few
  million parameters, 112 px tiles (16 tokens per tile); runs on CPU in tests and the demo.
- ``longvita-1.5b``: InternViT-300M-448px + Qwen2.5-1.5B shapes, for single-GPU benchmarks.
- ``longvita-14b``: InternViT-300M-448px + Qwen2.5-14B-Instruct shapes (the paper's model).

Trade-off: embeddings are untied in every preset (Qwen2.5-1.5B ties them); untied weights keep
the pipeline simple (no TiedLayerSpec) and a tied checkpoint converts by copying.
"""
from __future__ import annotations

from transformers import InternVLVisionConfig, Qwen2Config

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
            num_key_value_heads=8, vocab_size=152064, max_position_embeddings=1 << 20,
            rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
        ),
    ),
}

DOWNSAMPLE_RATIO = 0.5  # pixel shuffle: 2x2 patches -> one token with 4x the channels


def check_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown model.preset '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def vision_config(name: str) -> InternVLVisionConfig:
    return InternVLVisionConfig(**check_preset(name)["vision"])


def llm_config(name: str) -> Qwen2Config:
    cfg = Qwen2Config(**check_preset(name)["llm"], tie_word_embeddings=False, attention_dropout=0.0)
    cfg._attn_implementation = "lvita"  # see lvita.model.attention
    return cfg


def tokens_per_tile(name: str) -> int:
    """Image tokens one tile becomes after pixel shuffle (256 for 448 px tiles, patch 14)."""
    v = check_preset(name)["vision"]
    side = v["image_size"][0] // v["patch_size"][0]
    return int(side * DOWNSAMPLE_RATIO) ** 2


def tile_size(name: str) -> int:
    return check_preset(name)["vision"]["image_size"][0]


# model.format of each named preset: the Long-VITA shapes use the released architecture; the tiny
# stand-in keeps InternVL's (today's demo and the transformers-native export tests)
PRESET_FORMATS = {"tiny": "internvl", "longvita-1.5b": "longvita", "longvita-14b": "longvita"}


def default_format(preset: str) -> str | None:
    """model.format when the stage leaves it null: a named preset's own; a directory's from its
    config.json (``model_type`` long_vita -> longvita, internvl -> internvl, an InternViT + Qwen2 pair or
    anything else with a config -> longvita, the released architecture). None when it cannot tell."""
    if preset in PRESET_FORMATS:
        return PRESET_FORMATS[preset]
    import json
    from pathlib import Path
    path = Path(preset) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return "internvl" if model_type == "internvl" else "longvita"
