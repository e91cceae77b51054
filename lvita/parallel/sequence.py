"""Sequence parallelism: cut each packed micro-batch into this rank's shard (the attention that
joins the shards is :func:`lvita.parallel.hybrid.sequence_attention`'s choice).

A sequence group of ``sp = ulysses x ring`` ranks trains on the same micro-batches. The split is
the one yunchang's hybrid attention expects (``zigzag_extract_local``): the sequence is cut into
``2 x ring`` chunks, ring rank r takes chunks r and 2*ring-1-r (zigzag: equal causal work per
ring rank), and that ring part is split contiguously over the ``ulysses`` ranks. With ring 1
this is the plain contiguous split Ulysses uses. Within a sequence group, rank
``sequence_rank = ring_rank * ulysses + ulysses_rank`` (Ulysses groups are runs of consecutive
ranks; see lvita.parallel.topology).

Position ids and the pre-shifted labels follow the same split. Only the image tiles whose
placeholder tokens fall in the shard are kept (each tile once); ``feature_index`` maps every
placeholder of the shard to its row in the features of those tiles, so a tile that straddles a
shard boundary is encoded on both sides and each side uses its own part. The loss scale is
multiplied by ``sp`` because DeepSpeed averages gradients over all its data-axis ranks, sequence
ranks included. The data stream decodes only the shard's tiles (``shard_tiles``), so
``shard_micro_batch`` accepts either all the tiles of a sequence or just the shard's.
"""
from __future__ import annotations

import torch

from lvita.model.longvita import context_ids, is_context


def shard_spans(seq_len: int, sequence_rank: int, ulysses: int, ring: int) -> list[tuple[int, int]]:
    """Token ranges [a, b) of the full sequence held by ``sequence_rank``, in shard order."""
    sp = ulysses * ring
    unit = sp if ring == 1 else 2 * sp
    if seq_len % unit:
        raise ValueError(f"sequence length {seq_len} is not divisible by {unit} "
                         f"(ulysses {ulysses} x ring {ring}{' x 2 zigzag chunks' if ring > 1 else ''}): "
                         f"set data.seq_len to a multiple of {unit}")
    ring_rank, ulysses_rank = divmod(sequence_rank, ulysses)
    if ring == 1:
        part = [(0, seq_len)]
    else:
        c = seq_len // (2 * ring)
        part = [(ring_rank * c, (ring_rank + 1) * c), ((2 * ring - 1 - ring_rank) * c, (2 * ring - ring_rank) * c)]
    m = seq_len // sp  # this rank's share of its ring part
    lo, hi = ulysses_rank * m, (ulysses_rank + 1) * m
    spans, start = [], 0
    for a, b in part:
        s, e = max(lo, start), min(hi, start + b - a)
        if s < e:
            spans.append((a + s - start, a + e - start))
        start += b - a
    return spans


def shard_owner(seq_len: int, position: int, ulysses: int, ring: int) -> int:
    """Sequence rank whose shard (:func:`shard_spans`) holds ``position``; no index lists."""
    for r in range(ulysses * ring):
        if any(a <= position < b for a, b in shard_spans(seq_len, r, ulysses, ring)):
            return r
    raise ValueError(f"position {position} is outside a sequence of {seq_len} tokens")


def shard_indices(seq_len: int, sequence_rank: int, ulysses: int, ring: int) -> torch.Tensor:
    """(S/sp,) token indices of this rank's shard."""
    return torch.cat([torch.arange(a, b) for a, b in shard_spans(seq_len, sequence_rank, ulysses, ring)])


def shard_tiles(ids: torch.Tensor, sequence_rank: int, ulysses: int, ring: int, image_token_id,
                tokens_per_tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (S,) of one packed sequence -> (idx (S/sp,) token indices of the shard, tiles (n,) sorted
    numbers of the tiles whose placeholders fall in the shard, feature_index (k,) the row of each
    shard placeholder in the flattened features of those tiles). Pure index arithmetic: the data
    stream uses it to decode only these tiles."""
    idx = shard_indices(ids.shape[0], sequence_rank, ulysses, ring)
    is_img = is_context(ids, context_ids(image_token_id))  # one placeholder id, or the format's several
    feature = (torch.cumsum(is_img, 0) - 1)[idx][is_img[idx]]  # global feature number of each placeholder
    tiles = torch.unique(feature // tokens_per_tile)  # sorted
    feature_index = torch.searchsorted(tiles, feature // tokens_per_tile) * tokens_per_tile + feature % tokens_per_tile
    return idx, tiles, feature_index


def shard_micro_batch(micro: tuple, sequence_rank: int, ulysses: int, ring: int, image_token_id,
                      tokens_per_tile: int) -> tuple:
    """((ids (1,S), pos (1,S), pix (N,3,T,T)), (targets (1,S), scale)) -> this rank's
    ((ids (1,S/sp), pos, pix (n,3,T,T), feature_index (k,)), (targets (1,S/sp), scale*sp)).

    ``pix`` holds all N tiles of the sequence, already only the shard's n tiles (what a data stream
    that decodes only its shard's tiles gives; when n == N the two are the same), or none at all (a
    pipeline stage above 0 consumes no pixels; it passes through empty)."""
    (ids, pos, pix), (targets, scale) = micro
    B, S = ids.shape
    if B != 1:
        raise ValueError("sequence parallelism packs one sequence per micro-batch: set train.micro_batch=1")
    idx, tiles, feature_index = shard_tiles(ids[0], sequence_rank, ulysses, ring, image_token_id, tokens_per_tile)
    total = int(is_context(ids[0], context_ids(image_token_id)).sum()) // tokens_per_tile
    if pix.shape[0] == total:
        pix = pix[tiles].contiguous()
    elif pix.shape[0] not in (0, tiles.numel()):
        raise ValueError(f"the micro-batch has {pix.shape[0]} tiles; its sequence needs {total}, this shard "
                         f"{tiles.numel()}")
    return ((ids[:, idx], pos[:, idx], pix, feature_index), (targets[:, idx], scale * ulysses * ring))
