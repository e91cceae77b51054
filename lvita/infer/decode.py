"""Greedy decoding with a KV cache on one device: the steps every decoder shares.

    cache = KVCache.empty(model, 1, capacity)
    logits = prefill(model, input_ids, pixel_values, cache)        # (1, vocab): after the prompt
    gen = generate(model, ids, pixel_values, specials, max_new_tokens=64)   # gen.tokens, gen.stop

Owns the reusable single-device pieces (a context-parallel decoder, :mod:`lvita.infer.cp_generate`,
passes its own ``attend``): :func:`layer_step` runs one ``DecoderLayer``'s submodules
(input_layernorm -> q/k/v -> rotary -> cache -> causal GQA attention -> o_proj -> residual ->
post_attention_layernorm -> mlp -> residual), :func:`run_layers` all of them, :func:`prefill` /
:func:`decode_step` add the embedding and the LM head (last position only), :func:`greedy` is the
loop every decoder shares. :class:`KVCache`: per layer keys/values (B, capacity, Hkv, D) after
rotary, positions ``[0, length)`` filled.

Trade-offs: greedy only, batch 1 in :func:`generate` (the steps take any B); the cache is allocated
once for prompt + max_new_tokens (no regrowth); SDPA with an explicit mask only for a chunk appended
to a non-empty cache; sliding-window layers are refused (no preset has them). Imports only the model
and :mod:`lvita.infer.prompt` (for ContextError): loading, prompts and the command line are
:mod:`lvita.infer.generate`'s.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from lvita.errors import UserError
from lvita.infer.prompt import ContextError


@dataclass
class KVCache:
    """Per layer: keys and values (B, capacity, Hkv, D) after rotary; positions [0, length) filled."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, model, batch: int, capacity: int) -> "KVCache":
        attn = model.layers[0].layer.self_attn
        w = attn.k_proj.weight  # (Hkv * D, hidden): the cache takes its dtype and device
        shape, n = (batch, capacity, w.shape[0] // attn.head_dim, attn.head_dim), len(model.layers)
        return cls([w.new_zeros(shape) for _ in range(n)], [w.new_zeros(shape) for _ in range(n)])

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, S, Hkv, D) at [length, length + S) -> all keys, values (B, length + S, Hkv, D).
        ``length`` itself advances once per step, in :func:`run_layers`."""
        end = self.length + k.shape[1]
        if end > self.keys[layer_idx].shape[1]:
            raise ValueError(f"KV cache full: {end} positions > capacity {self.keys[layer_idx].shape[1]}")
        self.keys[layer_idx][:, self.length:end] = k
        self.values[layer_idx][:, self.length:end] = v
        return self.keys[layer_idx][:, :end], self.values[layer_idx][:, :end]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, S, Hq, D): the last S of T positions; k, v (B, T, Hkv, D) -> (B, S, Hq, D).
    Query i sits at position T - S + i and sees keys 0..T-S+i; GQA by repeating KV heads."""
    S, T, rep = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S|T, D)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = None if S in (1, T) else torch.ones(S, T, dtype=torch.bool, device=q.device).tril(T - S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=S == T > 1, scale=scale).transpose(1, 2)


def layer_step(layer, hidden: torch.Tensor, cos_sin, cache: KVCache | None, layer_idx: int,
               attend=causal_attention) -> torch.Tensor:
    """One lvita DecoderLayer (a Qwen2DecoderLayer at ``.layer``) on new positions: hidden (B, S, hidden)
    and cos, sin (B, S, D) -> (B, S, hidden). Keys/values go into ``cache`` (None: attend within S)."""
    blk, (B, S, _) = layer.layer, hidden.shape
    attn, x = blk.self_attn, blk.input_layernorm(hidden)
    if getattr(attn, "sliding_window", None):
        raise UserError("the model has sliding-window attention layers (use_sliding_window in its config.json); "
                        "lvita.generate does not support them")
    q = attn.q_proj(x).view(B, S, -1, attn.head_dim)  # (B, S, Hq, D)
    k = attn.k_proj(x).view(B, S, -1, attn.head_dim)  # (B, S, Hkv, D)
    v = attn.v_proj(x).view(B, S, -1, attn.head_dim)  # (B, S, Hkv, D)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin, unsqueeze_dim=2)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # (B, T, Hkv, D)
    hidden = hidden + attn.o_proj(attend(q, k, v, attn.scaling).reshape(B, S, -1))
    return hidden + blk.mlp(blk.post_attention_layernorm(hidden))


def run_layers(model, hidden: torch.Tensor, position_ids: torch.Tensor, cache: KVCache | None,
               attend=causal_attention) -> torch.Tensor:
    """All decoder layers: hidden (B, S, hidden) at position_ids (B, S) -> (B, S, hidden); the cache
    grows by S."""
    cos_sin = model.layers[0].rotary(hidden, position_ids)  # (B, S, D) each, the same for every layer
    for i, layer in enumerate(model.layers):
        hidden = layer_step(layer, hidden, cos_sin, cache, i, attend)
    if cache is not None:
        cache.length += hidden.shape[1]
    return hidden


def last_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """hidden (B, S, hidden) -> float32 logits (B, vocab) of the last position only."""
    return model.head.lm_head(model.head(hidden[:, -1:]))[:, 0].float()


def encode_tiles_in_chunks(model, tiles: int) -> None:
    """An inference memory lever applied to ``model`` from outside: without autograd, its vision encoder runs
    over at most ``tiles`` tiles at a time, so its transient memory (InternViT's attention and MLP activations,
    tens of MB per 448-px tile) stays that of one chunk whatever the frame count; only the projected
    features of every tile are kept. Each tile is encoded alone either way, so the features are the same up to
    the matmul blocking of another batch size. ``tiles`` < 1: all at once."""
    vision = model.embed.vision
    whole = type(vision).forward.__get__(vision)

    def forward(pixel_values: torch.Tensor) -> torch.Tensor:  # (N, 3, T, T) -> (N, tokens_per_tile, hidden)
        if tiles < 1 or torch.is_grad_enabled() or pixel_values.shape[0] <= tiles:
            return whole(pixel_values)
        return torch.cat([whole(pixel_values[i:i + tiles]) for i in range(0, pixel_values.shape[0], tiles)])

    vision.forward = forward


def prefill(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """ids (B, S) and their tiles (N, 3, T, T), appended at ``cache.length`` -> next-token logits (B, vocab)."""
    hidden = model.embed(input_ids, pixel_values)
    pos = torch.arange(cache.length, cache.length + input_ids.shape[1], device=input_ids.device)
    return last_logits(model, run_layers(model, hidden, pos.expand(input_ids.shape[0], -1), cache))


def decode_step(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per row (B, 1) at position ``cache.length`` -> next-token logits (B, vocab)."""
    hidden = model.embed.embed_tokens(tokens)  # text only: a generated token has no image features
    return last_logits(model, run_layers(model, hidden, torch.full_like(tokens, cache.length), cache))


@dataclass
class Generation:
    tokens: list[int]  # generated ids, the stop token excluded
    stop: str  # "eos" (<|im_end|> or <|endoftext|>), "max_new_tokens" or "context"
    prompt_tokens: int
    logits: list[torch.Tensor] | None = None  # with keep_logits: (vocab,) float32 of every step
    prefill_s: float = 0.0  # wall time to the first token's logits


@torch.no_grad()
def generate(model, input_ids, pixel_values: torch.Tensor, specials: dict, max_new_tokens: int = 256,
             max_context: int | None = None, keep_logits: bool = False) -> Generation:
    """Greedy decoding of one prompt (ids as a list or (S,)) with a KV cache; ContextError when the
    prompt leaves no room under ``max_context`` (default: the preset's max_position_embeddings)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    device, n = model.embed.embed_tokens.weight.device, ids.shape[1]
    limit = context_limit(model, n, max_context)
    cache = KVCache.empty(model, 1, min(n + max(max_new_tokens, 1), limit))
    gen = Generation([], "", n, [] if keep_logits else None)
    t0 = time.perf_counter()
    logits = prefill(model, ids.to(device), pixel_values.to(device), cache)
    gen.prefill_s = time.perf_counter() - t0
    step = lambda nxt: decode_step(model, torch.tensor([[nxt]], device=device), cache)  # noqa: E731
    return greedy(gen, logits, step, specials, max_new_tokens, limit)


def context_limit(model, prompt_tokens: int, max_context: int | None) -> int:
    """``max_context`` (default: the preset's max_position_embeddings); ContextError when a prompt of
    ``prompt_tokens`` leaves no room for one new token."""
    limit = max_context or model.layers[0].layer.self_attn.config.max_position_embeddings
    if prompt_tokens >= limit:
        raise ContextError(f"the prompt is {prompt_tokens} tokens; the context limit is {limit} tokens (--max-context)")
    return limit


def greedy(gen: Generation, logits: torch.Tensor, step, specials: dict, max_new_tokens: int, limit: int) -> Generation:
    """The greedy loop shared by every decoder: from the prompt's next-token logits (1, vocab), pick
    the argmax until a stop token, ``max_new_tokens`` or the context ``limit``; ``step(token)``
    returns the logits after it. ``gen.logits`` collects every step's logits when it is a list."""
    n = gen.prompt_tokens
    while True:
        if gen.logits is not None:
            gen.logits.append(logits[0].cpu())
        nxt = int(logits[0].argmax())
        if nxt in (specials["im_end"], specials["endoftext"]):
            gen.stop = "eos"
            return gen
        gen.tokens.append(nxt)
        if len(gen.tokens) >= max_new_tokens or n + len(gen.tokens) >= limit:
            gen.stop = "max_new_tokens" if len(gen.tokens) >= max_new_tokens else "context"
            return gen
        logits = step(nxt)
