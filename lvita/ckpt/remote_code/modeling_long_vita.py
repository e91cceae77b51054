"""The released Long-VITA model (``LongVITAForCausalLM``), written by lvita for its exports.

Owns the model classes that config.json's ``auto_map`` names, under the class names, parameter
names and call signature of the released checkpoints (github.com/VITA-MLLM/Long-VITA,
``long_vita/models/long_vita_qwen2_intern``), so the official inference script and VLMEvalKit's
``long_vita_hf.py`` load an lvita export as they load a released ``*_HF`` directory:

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, torch_dtype=torch.bfloat16)
    out_ids = model.generate(inputs=input_ids, images=pixel_values, image_indices=image_indices)

- ``images``: (tiles, 3, 448, 448) normalised pixels, every tile of every image and video frame in
  the order their context tokens appear; ``image_indices``: (2, tiles, tokens per tile), row 0 the
  batch row and row 1 the sequence position of each tile's ``<IMG_CONTEXT>`` / ``<PATCH_CONTEXT>``
  / ``<VID_CONTEXT>`` tokens. Each tile goes through InternViT (:mod:`modeling_intern_vit`), the
  CLS token is dropped, the patch grid is pixel-shuffled (scale 0.5: 2 x 2 patches -> one token of
  4 x the width), then ``ResamplerProjector`` (LayerNorm -> Linear -> GELU -> Linear, no biases)
  maps it to the LLM's width and the result replaces those tokens' embeddings.
- The language model is transformers' own Qwen2 (``LongVITAModel`` subclasses ``Qwen2Model``,
  ``LongVITAForCausalLM`` subclasses ``Qwen2ForCausalLM``): its attention implementations
  (``attn_implementation="flash_attention_2"``, ``"sdpa"``, ``"eager"``), KV cache, ``generate``
  and loss all apply. Images are merged only while no tokens are cached (the prefill, or every step
  without a cache); decoding steps with a cache ignore them.

Self-contained: imports torch and transformers only. The same code runs with transformers 4.49
(the official pin; cache argument ``past_key_values``) and 5.x (``cache``): both names are accepted
and passed on under the one the installed Qwen2 takes. Trade-off against the official class: a
training step without images does not run a dummy image through the vision tower (the official
code does so that every data-parallel rank has vision gradients under DeepSpeed); fine-tune with
lvita, which handles that, and export.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

from .configuration_intern_vit import InternVisionConfig
from .configuration_long_vita import LongVITAConfig
from .modeling_intern_vit import InternVisionModel

DOWNSAMPLE_RATIO = 0.5  # pixel shuffle: 2 x 2 patches -> one token
# the installed Qwen2's name for the KV cache argument: past_key_values (4.x) or cache (5.x)
CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


def pixel_shuffle(x: torch.Tensor, scale: float = DOWNSAMPLE_RATIO) -> torch.Tensor:
    """(n, w, h, c) -> (n, w * scale, h * scale, c / scale^2): each 2 x 2 block of patches becomes
    one position holding the four patches' channels (InternVL's ``pixel_shuffle`` with the final
    transpose of its ``ps_version`` v2)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3)


class ResamplerProjector(nn.Module):
    """Vision features (tiles, patches, vision width) -> (tiles, patches / 4, LLM width)."""

    def __init__(self, config: LongVITAConfig, vision_config: InternVisionConfig):
        super().__init__()
        wide = vision_config.hidden_size * int(1 / DOWNSAMPLE_RATIO) ** 2
        self.pre_proj_layernorm = nn.LayerNorm(wide)
        self.mlp = nn.Sequential(nn.Linear(wide, vision_config.hidden_size, bias=False), nn.GELU(),
                                 nn.Linear(vision_config.hidden_size, config.hidden_size, bias=False))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            raise ValueError(f"ResamplerProjector: {x.shape[1]} patches do not form a square grid")
        x = pixel_shuffle(x.reshape(x.shape[0], side, side, -1))
        return self.mlp(self.pre_proj_layernorm(x.reshape(x.shape[0], -1, x.shape[-1])))


def _cached_tokens(cache) -> int:
    """Tokens already in a KV cache (a Cache object, a legacy tuple of tuples, or None)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:
        return int(cache[0][0].shape[-2]) if len(cache) else 0
    except (TypeError, IndexError, AttributeError):
        return 0


def _pop_cache(past_key_values, kwargs: dict):
    """The cache under either name (5.x passes ``cache``, 4.x ``past_key_values``)."""
    cache = kwargs.pop("cache", None)
    return past_key_values if past_key_values is not None else cache


class LongVITAModel(Qwen2Model):
    """Qwen2Model + ``vision_model`` (InternViT) + ``vision_projection`` (ResamplerProjector)."""

    config_class = LongVITAConfig
    _no_split_modules = ["Qwen2DecoderLayer", "InternVisionEncoderLayer"]

    def __init__(self, config: LongVITAConfig):
        super().__init__(config)
        visual_config = InternVisionConfig(**dict(getattr(config, "visual", None) or {}))
        self.vision_model = InternVisionModel(visual_config)
        self.vision_projection = ResamplerProjector(config, visual_config)
        self.post_init()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, H, W) -> (tiles, tokens per tile, hidden): InternViT, CLS dropped, projector."""
        hidden = self.vision_model(images).last_hidden_state[:, 1:]
        return self.vision_projection(hidden)

    def merge_images(self, input_ids=None, inputs_embeds=None, images=None, image_indices=None, cache=None):
        """Token embeddings with the tiles' features written at ``image_indices`` (only while the cache is empty)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("LongVITA: pass input_ids or inputs_embeds")
            inputs_embeds = self.embed_tokens(input_ids)
        if images is None or _cached_tokens(cache) > 0:
            return inputs_embeds
        if image_indices is None:
            raise ValueError("LongVITA: images need image_indices (2, tiles, tokens): the batch row and position "
                             "of each context token")
        feats = self.image_features(images).to(inputs_embeds.dtype)
        rows, positions = image_indices.to(inputs_embeds.device).unbind(0)
        if rows.numel() != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"LongVITA: image_indices place {rows.numel()} tokens but {feats.shape[0]} tiles give "
                             f"{feats.shape[0] * feats.shape[1]}")
        inputs_embeds = inputs_embeds.clone()
        inputs_embeds[rows.reshape(-1), positions.reshape(-1)] = feats.reshape(-1, feats.shape[-1])
        return inputs_embeds

    def forward(self, input_ids=None, attention_mask=None, images=None, image_indices=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs):
        cache = _pop_cache(past_key_values, kwargs)
        inputs_embeds = self.merge_images(input_ids, inputs_embeds, images, image_indices, cache)
        kwargs[CACHE_ARG] = cache
        return super().forward(input_ids=None, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)


class LongVITAForCausalLM(Qwen2ForCausalLM):
    """LongVITAModel + ``lm_head`` (untied); ``forward``/``generate`` take ``images`` and ``image_indices``."""

    config_class = LongVITAConfig

    def __init__(self, config: LongVITAConfig):
        # Qwen2ForCausalLM.__init__ would build a plain Qwen2Model first (14B of memory, then dropped)
        Qwen2PreTrainedModel.__init__(self, config)
        self.model = LongVITAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, images=None, image_indices=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None, cache=None,
                logits_to_keep=0, **kwargs):
        cache = past_key_values if past_key_values is not None else cache
        logits_to_keep = kwargs.pop("num_logits_to_keep", None) or logits_to_keep  # the official (4.4x) name
        inputs_embeds = self.model.merge_images(input_ids, inputs_embeds, images, image_indices, cache)
        kwargs[CACHE_ARG] = cache
        return super().forward(input_ids=None, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **kwargs)
