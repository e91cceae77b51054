"""Long-VITA on one device: vision encoder + pixel-shuffle projector + Qwen2 decoder + LM head.

Owns the model's blocks, each usable alone so the pipeline can wrap them one by one:

- :class:`VisionEncoder`: transformers ``InternVLVisionModel`` (CLS token dropped) -> pixel
  shuffle (0.5) -> the format's projector: :class:`ResamplerProjector` (``longvita``, the released
  one) or :class:`Projector` (``internvl``, InternVL's).
- :class:`MultimodalEmbedding`: token embeddings with image features spliced in at the context
  placeholders (``<IMG_CONTEXT>``; under ``longvita`` also ``<PATCH_CONTEXT>`` and ``<VID_CONTEXT>``),
  in order (a count mismatch is an error).
- :class:`DecoderLayer`: one transformers ``Qwen2DecoderLayer`` with its own rotary embedding;
  attention goes through :mod:`lvita.model.attention` so parallelism can replace it.
- :class:`LMHead`: final RMSNorm + LM head; the loss runs the head only on labelled positions,
  ``logits_chunk`` at a time (:mod:`lvita.model.lm_head`), so its memory never grows with
  sequence x vocabulary.

The first argument of every block is the model's description (:class:`lvita.model.presets.ModelSpec`,
shapes + format) or a preset name (that preset in its own format).

Run: ``LongVita("tiny", image_token_id=5)(input_ids, position_ids, pixel_values, labels)`` returns
(sum of token cross-entropies, number of labelled tokens). Labels are already aligned with the
position that predicts them (``labels[t]`` is the target for ``input_ids[t]``); -100 is ignored.

Parameter names are the model's: a plain state dict has ``embed.*``, ``layers.<i>.*``, ``head.*``;
block ``k`` of the pipeline is ``embed`` (k = 0), ``layers.<k-1>`` or ``head`` (k = layers + 1)
(:func:`block_of`, :func:`plain_key`; checkpoints store one file per block).

Trade-off: blocks are seeded one by one (``seed + block index``) so that a pipelined copy that
builds only some blocks on each rank gets the same initial weights as this plain model.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import InternVLVisionModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from lvita.model import attention
from lvita.model.formats import INTERNVL, LONGVITA
from lvita.model.lm_head import DEFAULT_LOGITS_CHUNK, IGNORE_INDEX, chunked_cross_entropy_sum, full_cross_entropy_sum
from lvita.model.presets import DOWNSAMPLE_RATIO, ModelSpec, llm_config, spec_of, vision_config

_ROPE, _BOUNDARIES = attention.TensorCache(), attention.TensorCache()


def _init_linear_and_embedding(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)


def pixel_shuffle(x: torch.Tensor, scale: float = DOWNSAMPLE_RATIO) -> torch.Tensor:
    """(N, W, H, C) -> (N, W*scale, H*scale, C/scale^2), InternVL's layout."""
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


class Projector(nn.Module):
    """InternVL's projector (``model.format: internvl``): LayerNorm -> Linear -> GELU -> Linear, with biases."""

    def __init__(self, vision_hidden: int, llm_hidden: int):
        super().__init__()
        d = vision_hidden * int(1 / DOWNSAMPLE_RATIO) ** 2
        self.layer_norm = nn.LayerNorm(d)
        self.linear_1 = nn.Linear(d, llm_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class ResamplerProjector(nn.Module):
    """The released Long-VITA projector (``model.format: longvita``; official ``resampler_projector.py``):
    ``pre_proj_layernorm`` LayerNorm(4 x vision) -> ``mlp.0`` Linear(4 x vision -> vision, no bias) ->
    GELU -> ``mlp.2`` Linear(vision -> LLM hidden, no bias); input already pixel-shuffled."""

    def __init__(self, vision_hidden: int, llm_hidden: int):
        super().__init__()
        d = vision_hidden * int(1 / DOWNSAMPLE_RATIO) ** 2
        self.pre_proj_layernorm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, vision_hidden, bias=False), nn.GELU(),
                                 nn.Linear(vision_hidden, llm_hidden, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pre_proj_layernorm(x))


PROJECTORS = {INTERNVL: Projector, LONGVITA: ResamplerProjector}


def context_ids(ids: "int | tuple[int, ...] | list[int]") -> tuple[int, ...]:
    """One placeholder id or several (longvita: <IMG_CONTEXT>, <PATCH_CONTEXT>, <VID_CONTEXT>) -> a tuple."""
    return (int(ids),) if isinstance(ids, int) else tuple(int(i) for i in ids)


def is_context(input_ids: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """Where vision features go: positions holding any of the context ids."""
    if len(ids) == 1:
        return input_ids == ids[0]
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))


PIXEL_MEAN, PIXEL_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # InternViT's (ImageNet)


def normalise_pixels(tiles: torch.Tensor) -> torch.Tensor:
    """(n, 3, T, T) uint8 -> float32 ``(x / 255 - mean) / std`` on the tiles' device. Training sends
    tiles as uint8 (4x less host memory and host-to-device traffic) and they are normalised here."""
    mean = torch.tensor(PIXEL_MEAN, device=tiles.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=tiles.device).view(3, 1, 1)
    return (tiles.float() / 255.0 - mean) / std


class VisionEncoder(nn.Module):
    def __init__(self, preset: "str | ModelSpec", checkpoint: bool = False):
        """``checkpoint``: recompute each InternViT layer (transformers' activation checkpointing) and
        the projector in backward, so only layer inputs are kept per tile. The projector is the
        spec's format's (:data:`PROJECTORS`); its parameters live under ``multi_modal_projector``."""
        super().__init__()
        spec = spec_of(preset)
        vcfg, lcfg = vision_config(spec), llm_config(spec)
        self.vision_tower = InternVLVisionModel(vcfg)
        if checkpoint:
            self.vision_tower.activation_checkpointing_enable({"use_reentrant": False})
        self.checkpoint = checkpoint  # the projector too: its input is 4x wider than the LLM's hidden
        self.multi_modal_projector = PROJECTORS[spec.format](vcfg.hidden_size, lcfg.hidden_size)
        _init_linear_and_embedding(self.multi_modal_projector, lcfg.initializer_range)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N tiles, 3, H, W) uint8 (normalised here) or normalised float -> (N, tokens_per_tile, llm_hidden)."""
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalise_pixels(pixel_values)
        dtype = self.vision_tower.embeddings.patch_embeddings.projection.weight.dtype
        feats = self.vision_tower(pixel_values=pixel_values.to(dtype)).last_hidden_state[:, 1:]
        n, p, c = feats.shape
        side = int(p**0.5)
        feats = pixel_shuffle(feats.reshape(n, side, side, c)).reshape(n, -1, 4 * c)
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.multi_modal_projector, feats, use_reentrant=False)
        return self.multi_modal_projector(feats)


class MultimodalEmbedding(nn.Module):
    def __init__(self, preset: "str | ModelSpec", image_token_id: "int | tuple[int, ...]", checkpoint: bool = False):
        """``image_token_id``: the placeholder id(s) whose positions take vision features, in order
        (internvl: <IMG_CONTEXT>; longvita: <IMG_CONTEXT>, <PATCH_CONTEXT>, <VID_CONTEXT>)."""
        super().__init__()
        lcfg = llm_config(preset)
        self.image_token_id = context_ids(image_token_id)
        self.vision = VisionEncoder(preset, checkpoint)
        self.embed_tokens = nn.Embedding(lcfg.vocab_size, lcfg.hidden_size)
        _init_linear_and_embedding(self.embed_tokens, lcfg.initializer_range)
        self.tile = vision_config(preset).image_size[0]

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                feature_index: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S), pixel_values (N tiles, 3, H, W) -> hidden (B, S, hidden).

        ``feature_index`` (k,) is for a shard of a longer sequence: placeholder i takes row
        ``feature_index[i]`` of the tiles' flattened feature tokens (tiles cut by the shard are
        only partly used). None: the tiles fill the placeholders exactly, in order.
        """
        hidden = self.embed_tokens(input_ids)
        is_image = is_context(input_ids, self.image_token_id)
        n_slots = int(is_image.sum())
        if pixel_values.shape[0] == 0:
            if n_slots:
                raise ValueError(f"{n_slots} image context tokens but no image tiles in the batch")
            if any(p.requires_grad for p in self.vision.parameters()) and torch.is_grad_enabled():
                # Text-only batch with a trainable vision path: touch it so every rank has grads.
                dummy = torch.zeros(1, 3, self.tile, self.tile, device=hidden.device)
                hidden = hidden + 0.0 * self.vision(dummy).sum()
            return hidden
        feats = self.vision(pixel_values)
        feats = feats.reshape(-1, hidden.shape[-1])
        if feature_index is None:
            fits = feats.shape[0] == n_slots
        else:
            fits = feature_index.numel() == n_slots and int(feature_index.max()) < feats.shape[0]
        if not fits:
            raise ValueError(
                f"image features do not fit the placeholders: {pixel_values.shape[0]} tiles give "
                f"{feats.shape[0]} feature tokens but the sequence has {n_slots} image context tokens"
                + (f" and {feature_index.numel()} feature indices" if feature_index is not None else "")
            )
        if feature_index is not None:
            feats = feats[feature_index]
        return hidden.masked_scatter(is_image.unsqueeze(-1), feats.to(hidden.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, preset: "str | ModelSpec", layer_idx: int, checkpoint: bool = False):
        super().__init__()
        cfg = llm_config(preset)
        self.layer = Qwen2DecoderLayer(cfg, layer_idx)
        _init_linear_and_embedding(self.layer, cfg.initializer_range)
        self.rotary = Qwen2RotaryEmbedding(cfg)
        self.rope_key = (cfg.rope_parameters["rope_theta"], self.layer.self_attn.head_dim)
        self.checkpoint = checkpoint
        # fn(run, hidden, position_ids) replacing torch's checkpoint, set from outside (memory levers:
        # DeepSpeed's checkpointing with activation offload to host memory); None: torch's
        self.checkpoint_fn = None

    def _run(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # Same for every layer of a forward pass: computed by the first layer, reused by the rest.
        cos_sin = _ROPE.get(position_ids, lambda: self.rotary(hidden, position_ids),
                            (hidden.dtype, hidden.device, self.rope_key))
        cu_seqlens = _BOUNDARIES.get(position_ids, lambda: attention.cu_seqlens_from_position_ids(position_ids))
        return self.layer(hidden, position_embeddings=cos_sin, position_ids=position_ids,
                          cu_seqlens=cu_seqlens)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """hidden (B, S, hidden), position_ids (B, S) -> (B, S, hidden)."""
        if self.checkpoint and torch.is_grad_enabled():
            if self.checkpoint_fn is not None:
                return self.checkpoint_fn(self._run, hidden, position_ids)
            return torch.utils.checkpoint.checkpoint(self._run, hidden, position_ids, use_reentrant=False)
        return self._run(hidden, position_ids)


class LMHead(nn.Module):
    """Final RMSNorm + LM head. ``logits_chunk`` (``model.logits_chunk``): labelled tokens per
    chunk of the loss's logits (:mod:`lvita.model.lm_head`); 0 computes logits for every position."""

    def __init__(self, preset: "str | ModelSpec", logits_chunk: int = DEFAULT_LOGITS_CHUNK):
        super().__init__()
        cfg = llm_config(preset)
        self.norm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        _init_linear_and_embedding(self.lm_head, cfg.initializer_range)
        if logits_chunk < 0:
            raise ValueError(f"logits_chunk={logits_chunk}: labelled tokens per chunk, or 0 for the full head")
        self.logits_chunk = logits_chunk

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None):
        """-> normed hidden; with ``labels``, :meth:`loss_sum` of it (the loss inside the module's own
        forward, so an engine that gathers a module's weights around its forward, ZeRO-3, has the head's)."""
        if labels is None:
            return self.norm(hidden)
        return self.loss_sum(self.norm(hidden), labels)

    def loss_sum(self, normed: torch.Tensor, labels: torch.Tensor,
                 weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy summed over labelled positions; the head runs on those positions only,
        ``logits_chunk`` of them at a time (forward and backward).

        normed (B, S, hidden), labels (B, S) -> (loss sum (fp32 scalar), labelled count). ``weight``: the
        head's weight as the caller holds it (a view of ``lm_head.weight``; default the weight itself).
        """
        weight = self.lm_head.weight if weight is None else weight
        keep = labels != IGNORE_INDEX
        if self.logits_chunk == 0:
            return full_cross_entropy_sum(normed, weight, labels), keep.sum()
        loss = chunked_cross_entropy_sum(normed[keep], weight, labels[keep], self.logits_chunk)
        return loss, keep.sum()


def build_blocks(preset: "str | ModelSpec", image_token_id: "int | tuple[int, ...]", seed: int,
                 checkpoint: bool = False, logits_chunk: int = DEFAULT_LOGITS_CHUNK) -> list[nn.Module]:
    """All blocks in order, block i built right after ``torch.manual_seed(seed + i)``."""
    preset = spec_of(preset)
    n_layers = llm_config(preset).num_hidden_layers
    makers = [lambda: MultimodalEmbedding(preset, image_token_id, checkpoint)]
    makers += [lambda i=i: DecoderLayer(preset, i, checkpoint) for i in range(n_layers)]
    makers += [lambda: LMHead(preset, logits_chunk)]
    blocks = []
    for i, make in enumerate(makers):
        torch.manual_seed(seed + i)
        blocks.append(make())
    return blocks


class LongVita(nn.Module):
    """The plain model: ``blocks[0]`` embeds, ``blocks[1:-1]`` decode, ``blocks[-1]`` is the head."""

    def __init__(self, preset: "str | ModelSpec", image_token_id: "int | tuple[int, ...]", seed: int = 0,
                 checkpoint: bool = False,
                 blocks: list[nn.Module] | None = None, logits_chunk: int = DEFAULT_LOGITS_CHUNK):
        super().__init__()
        blocks = blocks or build_blocks(preset, image_token_id, seed, checkpoint, logits_chunk)
        self.embed, self.head = blocks[0], blocks[-1]
        self.layers = nn.ModuleList(blocks[1:-1])

    def forward(self, input_ids, position_ids, pixel_values, labels):
        """-> (sum of cross-entropy over labelled tokens, number of labelled tokens)."""
        hidden = self.embed(input_ids, pixel_values)
        for layer in self.layers:
            hidden = layer(hidden, position_ids)
        return self.head.loss_sum(self.head(hidden), labels)


def module_of(param_name: str) -> str:
    """Which trainable group a parameter of the plain model or the pipeline belongs to."""
    if "vision_tower" in param_name:
        return "vision"
    if "multi_modal_projector" in param_name:
        return "projector"
    return "llm"


# -- parameter names: plain keys <-> pipeline blocks ----------------------------------------------

def block_of(plain_key: str, n_layers: int) -> tuple[int, str]:
    """'layers.3.layer.mlp.up_proj.weight' -> (4, 'layer.mlp.up_proj.weight'); embed -> 0; head -> n+1."""
    head, rest = plain_key.split(".", 1)
    if head == "embed":
        return 0, rest
    if head == "head":
        return n_layers + 1, rest
    i, rest = rest.split(".", 1)
    return int(i) + 1, rest


def by_block(state: dict[str, torch.Tensor], n_layers: int) -> dict[int, dict[str, torch.Tensor]]:
    """A plain state dict -> {block index: that block's state dict}."""
    blocks: dict[int, dict] = {}
    for key, value in state.items():
        b, rest = block_of(key, n_layers)
        blocks.setdefault(b, {})[rest] = value
    return blocks


def plain_key(block: int, key: str, n_layers: int) -> str:
    if block == 0:
        return f"embed.{key}"
    if block == n_layers + 1:
        return f"head.{key}"
    return f"layers.{block - 1}.{key}"
