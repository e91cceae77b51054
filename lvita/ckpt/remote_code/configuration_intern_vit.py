"""Configuration of the InternViT vision tower (``model_type: intern_vit_6b``), written by lvita.

Owns ``InternVisionConfig``: OpenGVLab's InternViT settings under their names (``hidden_size``,
``image_size``, ``patch_size``, ``qkv_bias``, ``qk_normalization``, ``norm_type``, ``ls`` layer
scales, ...), as they appear in a released Long-VITA config.json under ``visual``; the nested
``visual.auto_map`` names this class. Defaults are InternViT-300M-448px's.

Self-contained: imports transformers only. Defaults are class attributes (not an ``__init__``), so the
same class works with transformers 4.49 and 5.x (whose configs are dataclasses).
"""
from transformers import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    """InternViT settings; any field missing from ``visual`` takes InternViT-300M-448px's value."""

    model_type = "intern_vit_6b"
    num_channels = 3
    patch_size = 14
    image_size = 448
    qkv_bias = True
    hidden_size = 1024
    num_attention_heads = 16
    intermediate_size = 4096
    qk_normalization = False
    num_hidden_layers = 24
    use_flash_attn = True
    hidden_act = "gelu"
    norm_type = "layer_norm"
    layer_norm_eps = 1e-6
    dropout = 0.0
    drop_path_rate = 0.0
    attention_dropout = 0.0
    initializer_range = 0.02
    initializer_factor = 1.0
