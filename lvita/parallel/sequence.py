"""Sequence parallelism, data side: cut each packed micro-batch into this rank's contiguous shard.

A sequence group of ``sp`` ranks trains on the same micro-batches; rank r keeps tokens
``[r*S/sp, (r+1)*S/sp)`` of every row, with its position ids and (pre-shifted) labels, and only
the image tiles whose tokens fall in that shard. A tile that straddles the boundary is encoded on
both sides; ``feature_offset`` tells the embedding how many of its first tile's feature tokens
lie before the shard. The loss scale is multiplied by ``sp`` because DeepSpeed averages
gradients over all its data-axis ranks, sequence ranks included.
"""
from __future__ import annotations

import torch


def shard_micro_batch(micro: tuple, sp_rank: int, sp: int, image_token_id: int, tokens_per_tile: int) -> tuple:
    """((ids (B,S), pos, pix (N,3,T,T)), (targets, scale)) -> this rank's
    ((ids (B,S/sp), pos (B,S/sp), pix (n,3,T,T), feature_offset ()), (targets (B,S/sp), scale*sp))."""
    (ids, pos, pix), (targets, scale) = micro
    B, S = ids.shape
    if B != 1:
        raise ValueError("sequence parallelism packs one sequence per micro-batch: set train.micro_batch=1")
    if S % sp:
        raise ValueError(f"sequence length {S} is not divisible by the sequence degree {sp}")
    n = S // sp
    a, b = sp_rank * n, (sp_rank + 1) * n
    is_img = ids[0] == image_token_id
    first = int(is_img[:a].sum())  # feature tokens of this sequence before the shard
    count = int(is_img[a:b].sum())
    t0, t1 = first // tokens_per_tile, -(-(first + count) // tokens_per_tile)
    tiles = pix[t0:t1] if count else pix[:0]
    offset = torch.tensor(first - t0 * tokens_per_tile if count else 0)
    return ((ids[:, a:b].contiguous(), pos[:, a:b].contiguous(), tiles.contiguous(), offset),
            (targets[:, a:b].contiguous(), scale * sp))
