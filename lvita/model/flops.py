"""Model FLOPs of a training step, and model FLOPs utilisation (MFU) against the GPU's peak.

Owns the arithmetic behind ``tflops_per_gpu`` and ``mfu`` in metrics.jsonl, TensorBoard and the
progress line. Counted as the model computes, not as a 6N rule of thumb:

- decoder matmuls (q/k/v/o projections, gate/up/down) per token and layer;
- attention as actually computed: causal, per packed sample when positions restart (reset
  packing), else over the whole row: 4 x heads x head_dim x (s(s+1)/2) per sample and layer;
- the vision encoder per tile (patch embedding, InternViT layers with full attention over its
  tokens plus CLS) and the projector per tile;
- the LM head on labelled positions only (the logits-masked head computes nothing else).

Backward counts what autograd runs: a matmul costs its forward again for the input gradient when anything
before it trains, and again for the weight gradient when its weights train (attention: twice its forward when
gradients flow through it); frozen weights, LoRA's base weights included, get no weight gradient, and LoRA's
adapters are counted as :func:`sequence_flops` says. Recomputation (activation checkpointing, the chunked
head's backward, tiled MLP) is not model work and is not counted, as in Megatron's MFU.

    flops = step_flops(cfg.model.preset, cfg.model.trainable, batch, cfg.model.lora)   # batch: PackedSequences
    tflops = flops / step_time / world / 1e12; mfu = tflops / peak_tflops(cfg.train.peak_tflops)

Trade-off: norms, activations, softmax and the loss are left out (a few percent at most).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from lvita.model.attention import cu_seqlens_from_position_ids
from lvita.model.presets import llm_config, spec_of, tokens_per_tile, vision_config

# Dense bf16 peak TFLOPs by device name (first match wins); override with train.peak_tflops.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0), ("H200", 989.0),
               ("H800", 989.0), ("H20", 148.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0),
               ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("MI300X", 1307.0), ("MI325X", 1307.0)]


def peak_tflops(override: float | None = None) -> float | None:
    """The device's dense bf16 peak: ``override`` if given, else from :data:`PEAK_TFLOPS` by the
    CUDA device name; None on CPU or an unknown GPU (MFU is then not reported)."""
    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


@dataclass(frozen=True)
class Shapes:
    """The numbers a count needs, per preset."""
    hidden: int
    q: int  # query heads x head dim
    kv: int  # key/value heads x head dim
    inter: int
    layers: int
    vocab: int
    v_hidden: int
    v_inter: int
    v_layers: int
    v_tokens: int  # patches + CLS per tile
    patch_in: int  # 3 x patch x patch
    tile_tokens: int  # LLM tokens per tile after pixel shuffle
    heads: int  # query heads
    head_dim: int
    v_heads: int
    tile: int  # tile side in pixels
    proj_mid: int = 0  # the projector's middle width: the LLM's hidden (internvl), the ViT's (longvita)

    @classmethod
    @lru_cache(maxsize=None)  # once per model description, not once per training step
    def of(cls, preset) -> "Shapes":
        spec = spec_of(preset)
        lc, vc = llm_config(spec), vision_config(spec)
        d = lc.hidden_size // lc.num_attention_heads
        patches = (vc.image_size[0] // vc.patch_size[0]) * (vc.image_size[1] // vc.patch_size[1])
        return cls(lc.hidden_size, lc.num_attention_heads * d, lc.num_key_value_heads * d, lc.intermediate_size,
                   lc.num_hidden_layers, lc.vocab_size, vc.hidden_size, vc.intermediate_size,
                   vc.num_hidden_layers, patches + 1, 3 * vc.patch_size[0] * vc.patch_size[1],
                   tokens_per_tile(spec), lc.num_attention_heads, d, vc.num_attention_heads, vc.image_size[0],
                   vc.hidden_size if spec.format.vision_width_projector else lc.hidden_size)


def causal_pairs(lengths) -> int:
    """Query-key pairs causal attention computes over samples of these lengths."""
    return sum(s * (s + 1) // 2 for s in lengths)


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the causal segments of one packed row (L,), as the attention splits it."""
    return cu_seqlens_from_position_ids(position_ids.reshape(1, -1)).diff().tolist()


def linear_widths(s: Shapes) -> dict[str, tuple[int, int]]:
    """(input, output) width of each decoder projection."""
    return {"q_proj": (s.hidden, s.q), "k_proj": (s.hidden, s.kv), "v_proj": (s.hidden, s.kv),
            "o_proj": (s.q, s.hidden), "gate_proj": (s.hidden, s.inter), "up_proj": (s.hidden, s.inter),
            "down_proj": (s.inter, s.hidden)}


def llm_adapted(lora) -> frozenset:
    """The decoder projections ``model.lora.llm`` adapts (leaf names), by lvita.model.lora's target rule."""
    if lora is None:
        return frozenset()
    from lvita.model.lora import LLM_LINEARS, adapts

    return frozenset(n for n, path in LLM_LINEARS.items() if adapts(path, "llm", lora))


def sequence_flops(s: Shapes, trainable, tokens: int, pairs: int, tiles: int, labelled: int,
                   lora=None) -> dict[str, float]:
    """Forward + backward FLOPs of one packed sequence by part: ``tokens`` in the row, ``pairs`` its
    causal attention pairs (:func:`causal_pairs`), ``tiles`` image tiles, ``labelled`` positions.

    Under ``lora`` (``model.lora``) frozen base weights get no weight gradient, but input gradients flow
    through every frozen layer from the first adapter on (and through the head). LoRA on the LLM: each
    adapted linear adds ``lora_A`` (in -> rank) and ``lora_B`` (rank -> out): forward, both weight
    gradients and both input gradients, 3x its forward (``decoder`` holds them); in the first layer, when
    nothing before it trains, neither the base q/k/v nor their adapters pass a gradient to the layer's
    input, and that is left out as autograd leaves it out (counted as if some q/k/v projection is adapted).
    LoRA on the vision tower or projector: gradients flow through that module (input gradients of its every
    matmul counted, which errs high) but its adapters' own matmuls are not (rank wide: a few percent of
    the module's at rank 16)."""
    from lvita.model.lora import adapted_groups

    groups = adapted_groups(lora)
    a, r = llm_adapted(lora), int(lora.rank) if lora is not None else 0
    tv, tp, tl = "vision" in trainable, "projector" in trainable, "llm" in trainable
    fv = tv or "vision" in groups  # gradients flow through the tower
    fp = fv or tp or "projector" in groups
    # (forward, input gradient, weight gradient) -> multiplier of the forward count
    mult = lambda dx, dw: 1 + int(dx) + int(dw)  # noqa: E731
    vit_layer = 2 * s.v_tokens * (4 * s.v_hidden * s.v_hidden + 2 * s.v_hidden * s.v_inter)
    vit_attn = 4 * s.v_tokens * s.v_tokens * s.v_hidden
    vision = tiles * (2 * (s.v_tokens - 1) * s.patch_in * s.v_hidden * mult(False, tv)
                      + s.v_layers * (vit_layer * mult(fv, tv) + vit_attn * mult(2 * fv, False)))
    proj_in = 4 * s.v_hidden  # pixel shuffle: 4 patches per token; a LayerNorm (projector weights) comes first
    projector = tiles * 2 * s.tile_tokens * (proj_in + s.hidden) * s.proj_mid * mult(fp, tp)
    upstream = fp or tl  # something before the decoder trains: gradients flow into its first layer
    flows = upstream or bool(a)  # gradients flow through the decoder (from the first adapter on)
    layer = 2 * tokens * (2 * s.hidden * s.q + 2 * s.hidden * s.kv + 3 * s.hidden * s.inter)
    decoder = s.layers * (layer * mult(flows, tl) + 4 * s.q * pairs * mult(2 * flows, False))
    width = linear_widths(s)
    decoder += s.layers * sum(3 * 2 * tokens * r * (width[n][0] + width[n][1]) for n in a)
    if flows and not upstream:  # first layer: no gradient to its input through q/k/v and their adapters
        qkv = ("q_proj", "k_proj", "v_proj")
        decoder -= sum(2 * tokens * width[n][0] * width[n][1] for n in qkv)
        decoder -= sum(2 * tokens * r * width[n][0] for n in qkv if n in a)
    head = 2 * labelled * s.hidden * s.vocab * mult(flows, tl)
    return {"vision": vision, "projector": projector, "decoder": decoder, "head": head}


def step_flops(preset, trainable, batch, lora=None) -> float:
    """Model FLOPs of one optimizer step over ``batch`` (the global batch's PackedSequences); ``lora``:
    ``model.lora`` (:func:`sequence_flops`)."""
    s, total = Shapes.of(preset), 0.0
    for seq in batch:
        tiles = sum(m["image_tokens"] for m in seq.samples) // s.tile_tokens
        parts = sequence_flops(s, trainable, seq.input_ids.numel(), causal_pairs(segment_lengths(seq.position_ids)),
                               tiles, int((seq.targets != -100).sum()), lora)
        total += sum(parts.values())
    return total
