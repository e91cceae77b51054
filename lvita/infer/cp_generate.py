"""Context-parallel generation: the prompt sharded over the sequence ranks, the KV cache kept sharded.

    deepspeed --num_gpus 4 --module lvita.generate --model DIR --prompt "..." --image a.png --sp 4
    deepspeed --num_gpus 4 --module lvita.eval --model DIR --data mmbench.jsonl --sp 4 [--ring 2]

Owns greedy decoding when one prompt is spread over ``sp = ulysses x ring`` ranks (the paper's
context parallelism for million-token prompts, Table 3):

- prefill: the prompt (padded at the end to a multiple of the shard unit; causal attention makes
  the padding invisible to real tokens) is cut exactly as in training (``shard_micro_batch``:
  contiguous shards for Ulysses, zigzag for ring), each rank encodes only the image tiles whose
  tokens fall in its shard, and attention is the training sequence-parallel attention. Each rank
  keeps the keys/values of its own real prompt tokens: the cache starts sharded.
- decode (``mode="cache"``, beyond the paper): the new token is replicated; per layer each rank
  attends over its cache shard and the partial results merge exactly
  (:mod:`lvita.infer.sharded_kv`, in the cache's dtype, grouped query heads); the new key/value
  is written by one rank, round robin, into its preallocated cache shard.
- ``mode="recompute"``: the paper's official implementation, kept for comparison: no cache, every
  new token re-runs the sharded prefill over a fixed-length sequence (prompt + max_new_tokens).

Both give the tokens of single-process greedy decoding (``lvita.infer.decode.generate``), which the
tests check at sp = 2. The LM head runs on the last position only, on the rank that holds it.
Trade-off: the per-layer decode step all-gathers a (1, Hq, D + 1) partial per rank (latency
bound), instead of moving any of the cache.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from lvita.errors import UserError
from lvita.infer.decode import Generation, context_limit, greedy, last_logits, layer_step
from lvita.infer.sharded_kv import ShardedKVCache, sharded_decode_attention
from lvita.parallel.hybrid import sequence_attention
from lvita.parallel.sequence import shard_indices, shard_micro_batch, shard_owner


class ContextParallel:
    """What the decoding needs of the topology: the sequence group and this rank's place in it."""

    def __init__(self, topology, tokens_per_tile: int, image_token_id: int):
        self.topo, self.tpt, self.image_token_id = topology, tokens_per_tile, image_token_id
        self.group, self.rank, self.sp = topology.sequence_group, topology.sequence_rank, topology.sequence
        self.attention = sequence_attention(topology)
        self.unit = self.sp if topology.ring == 1 else 2 * self.sp

    def padded(self, n: int) -> int:
        return -(-n // self.unit) * self.unit

    def owner_of(self, seq_len: int, position: int) -> int:
        """Global rank holding ``position`` of a ``seq_len`` sequence."""
        return dist.get_global_rank(self.group, shard_owner(seq_len, position, self.topo.ulysses, self.topo.ring))


def _sharded_prefill(model, cp: ContextParallel, ids: torch.Tensor, pixel_values: torch.Tensor, real: int,
                     cache: ShardedKVCache | None) -> torch.Tensor:
    """ids (1, S) padded, the first ``real`` tokens real -> fp32 logits (1, vocab) after token real-1,
    the same on every rank. With ``cache``, each rank stores its real tokens' keys/values."""
    S = ids.shape[1]
    pos = torch.arange(S, device=ids.device).unsqueeze(0)
    dummy = (torch.zeros_like(ids), 1.0)
    (ids_l, pos_l, pix_l, feature_index), _ = shard_micro_batch(((ids, pos, pixel_values), dummy), cp.rank,
                                                                cp.topo.ulysses, cp.topo.ring, cp.image_token_id, cp.tpt)
    local = shard_indices(S, cp.rank, cp.topo.ulysses, cp.topo.ring).to(ids.device)  # (S/sp,)
    keep = local < real

    def attend(i):
        def fn(q, k, v, scale):  # q (1, S/sp, Hq, D), k/v (1, S/sp, Hkv, D): this rank's shard
            if cache is not None:
                cache.append(i, k[:, keep], v[:, keep])
            return cp.attention(q, k, v, scale=scale, position_ids=pos_l)
        return fn

    hidden = model.embed(ids_l, pix_l, feature_index)
    cos_sin = model.layers[0].rotary(hidden, pos_l)
    for i, layer in enumerate(model.layers):
        hidden = layer_step(layer, hidden, cos_sin, None, i, attend(i))
    owner = cp.owner_of(S, real - 1)
    logits = torch.empty(1, model.head.lm_head.out_features, dtype=torch.float32, device=ids.device)
    if dist.get_rank() == owner:
        logits = last_logits(model, hidden[:, (local == real - 1).nonzero()[0, 0]].unsqueeze(1))
    dist.broadcast(logits, src=owner, group=cp.group)
    return logits


def _decode_step(model, cp: ContextParallel, token: int, position: int, index: int,
                 cache: ShardedKVCache) -> torch.Tensor:
    """Generated token number ``index`` at ``position`` -> fp32 logits (1, vocab), every rank."""
    device = model.embed.embed_tokens.weight.device
    hidden = model.embed.embed_tokens(torch.tensor([[token]], device=device))  # (1, 1, hidden)
    cos_sin = model.layers[0].rotary(hidden, torch.tensor([[position]], device=device))
    mine = cache.owns(index)

    def attend(i):
        def fn(q, k, v, scale):  # q (1, 1, Hq, D); k/v (1, 1, Hkv, D) the new token's
            if mine:
                cache.append(i, k, v)
            return sharded_decode_attention(q, cache.keys(i), cache.values(i), cp.group, scale)
        return fn

    for i, layer in enumerate(model.layers):
        hidden = layer_step(layer, hidden, cos_sin, None, i, attend(i))
    return last_logits(model, hidden)


@torch.no_grad()
def cp_generate(model, input_ids, pixel_values: torch.Tensor, specials: dict, max_new_tokens: int = 256,
                max_context: int | None = None, keep_logits: bool = False, *, cp: ContextParallel,
                mode: str = "cache") -> Generation:
    """:func:`lvita.generate.generate` over the sequence group: the same arguments and result."""
    if mode not in ("cache", "recompute"):
        raise ValueError(f"mode {mode!r}: cache or recompute")
    device = model.embed.embed_tokens.weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(device)
    pixel_values = pixel_values.to(device)
    n = ids.shape[1]
    limit = context_limit(model, n, max_context)
    gen = Generation([], "", n, [] if keep_logits else None)
    pad = specials["endoftext"]

    def padded(seq: torch.Tensor, length: int) -> torch.Tensor:
        return torch.cat([seq, seq.new_full((1, length - seq.shape[1]), pad)], dim=1)

    cache = ShardedKVCache(len(model.layers), cp.rank, cp.sp, max_new_tokens) if mode == "cache" else None
    fixed = cp.padded(min(n + max_new_tokens, limit))  # recompute mode: one length for every step
    t0 = time.perf_counter()
    logits = _sharded_prefill(model, cp, padded(ids, cp.padded(n) if cache else fixed), pixel_values, n, cache)
    gen.prefill_s = time.perf_counter() - t0
    seq = ids

    def step(nxt: int) -> torch.Tensor:
        nonlocal seq
        if cache is not None:
            return _decode_step(model, cp, nxt, n + len(gen.tokens) - 1, len(gen.tokens) - 1, cache)
        seq = torch.cat([seq, seq.new_tensor([[nxt]])], dim=1)
        return _sharded_prefill(model, cp, padded(seq, fixed), pixel_values, seq.shape[1], None)

    return greedy(gen, logits, step, specials, max_new_tokens, limit)


# -- command line (lvita.generate / lvita.eval with --sp) ---------------------------------------------

def join(args) -> tuple[int, str]:
    """For ``--sp N`` (N > 1): join the launcher's process group (world must be N) and pick this
    rank's device. -> (global rank, device)."""
    import os

    from lvita.parallel.topology import init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.sp < 1 or args.ring < 1 or args.sp % args.ring:
        raise UserError(f"--sp {args.sp} must be a positive multiple of --ring {args.ring}")
    if world != args.sp:
        raise UserError(f"--sp {args.sp} needs {args.sp} processes, the launcher started {world}: "
                        f"deepspeed --num_gpus {args.sp} --module lvita.generate ... --sp {args.sp}")
    init_distributed()
    device = args.device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), device


def generator(args, fmt):
    """A function with :func:`lvita.generate.generate`'s signature decoding over all ranks; ``fmt``: the
    model's input format (its tokens per tile and context ids shard the tiles)."""
    from functools import partial

    from lvita.parallel.topology import build_topology

    topo = build_topology(1, ulysses=args.sp // args.ring, ring=args.ring)
    cp = ContextParallel(topo, fmt.tpt, fmt.context_ids)
    return partial(cp_generate, cp=cp, mode=args.mode)
