"""Configuration of the released Long-VITA model (``model_type: long_vita``), written by lvita.

Owns ``LongVITAConfig``: Qwen2's configuration (the language model's fields at the top level of
config.json) plus ``visual``, the InternViT vision tower's settings kept as the nested dict the
released checkpoints carry (:mod:`configuration_intern_vit` reads it). ``lvita convert to-hf
--format longvita`` copies this file, with ``modeling_long_vita.py`` and the InternViT files, into
the exported directory, and names the classes in config.json's ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it, as the official
tools load the released ``*_HF`` directories.

Self-contained: imports transformers only (never lvita). Works with transformers 4.49 (the official
pin) and 5.x (class attributes only: 5.x configs are dataclasses; no ``__init__`` of our own).
"""
from transformers import Qwen2Config


class LongVITAConfig(Qwen2Config):
    """Qwen2Config under the model type ``long_vita``; ``config.visual`` is the InternViT dict."""

    model_type = "long_vita"
