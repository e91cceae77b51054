"""The packer: planned samples -> sequences of exactly ``data.seq_length`` tokens.

Works on plans (token ids, targets and the media each sample needs, with tile counts known from
file headers), never on pixels, so its buffer is cheap and every rank can pack the whole global
batch identically while decoding only the pixels of its own rows.

Filling: a bounded buffer of ``data.pack_buffer`` pending samples. When it is full, one sequence
is cut: the oldest pending sample first (so no sample, and no rare source, waits for long), then the
subset of the other pending samples that fills the remaining room best (exact subset sum over
token counts), taken only from the oldest sample's source when ``same_source`` is true, from its data
file when it is ``"file"`` (the official Long-VITA loader without ``--cross-dataset-joint``). What is
left waits for the next sequence. The rest of the sequence
is padding (``<|endoftext|>``, no labels).

Position ids: ``reset_position_ids`` restarts them at 0 for every sample (attention then keeps
samples apart: ``cu_seqlens`` are where the ids restart); otherwise they run 0..L-1.

    packer = Packer(seq_length=4096, buffer=128, same_source=True)
    samples = packer.add(plan)        # [] or the samples of one finished sequence
    seq = build_sequence(samples, 4096, reset=True, pad_id=tok_pad, tokens_per_tile=256)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lvita.data.template import IGNORE


@dataclass
class SamplePlan:
    source: str
    id: str
    where: str  # file:line
    cursor: tuple  # where the mixture can read the record again
    input_ids: list[int]
    targets: list[int]
    # lvita.data.planned.PlannedImage | PlannedVideo per placeholder; ref: a path or
    # lvita.data.plan.Embedded (bytes inside the record, read again when decoding)
    media: list
    tokens: int = 0  # length before truncation to data.seq_length (lvita data check's distribution)

    @property
    def n_tiles(self) -> int:
        return sum(m.tiles for m in self.media)


@dataclass
class PackedSequence:
    input_ids: torch.Tensor  # (L,)
    position_ids: torch.Tensor  # (L,)
    targets: torch.Tensor  # (L,)
    tiles: torch.Tensor | None  # (n_tiles, 3, T, T) float, in token order; None until decoded
    samples: list[dict] = field(default_factory=list)  # source, id, start, end, image_tokens, labels
    pad: int = 0
    plans: list[SamplePlan] = field(default_factory=list)  # what to decode for ``tiles``

    @property
    def cu_seqlens(self) -> list[int] | None:
        """Sample boundaries when positions restart per sample; None for one causal sequence."""
        starts = (self.position_ids == 0).nonzero().flatten().tolist()
        return None if starts == [0] else starts + [len(self.position_ids)]


class Packer:
    def __init__(self, seq_length: int, buffer: int, same_source: "bool | str"):
        self.L, self.size, self.same_source = seq_length, max(1, buffer), same_source
        self.pending: list[SamplePlan] = []  # in arrival order

    def _group(self, s: SamplePlan):
        """What samples of one sequence share: their source, their data file (same_source "file"), or nothing."""
        return (s.source, s.cursor[0]) if self.same_source == "file" else s.source if self.same_source else None

    def add(self, sample: SamplePlan) -> list[SamplePlan]:
        self.pending.append(sample)
        return self._cut() if len(self.pending) >= self.size else []

    def _cut(self) -> list[SamplePlan]:
        anchor = self.pending.pop(0)
        group = self._group(anchor)
        candidates = [i for i, s in enumerate(self.pending) if self._group(s) == group]
        picked = best_fill([len(self.pending[i].input_ids) for i in candidates], self.L - len(anchor.input_ids))
        chosen = [anchor] + [self.pending[candidates[k]] for k in sorted(picked)]
        for k in sorted(picked, reverse=True):
            del self.pending[candidates[k]]
        return chosen


def best_fill(sizes: list[int], room: int) -> list[int]:
    """Indices of the subset of ``sizes`` with the largest sum <= room (subset sum on bitsets:
    bit t of ``reach[i]`` says some subset of the first i sizes sums to t). Among equal fills it
    prefers earlier (older) entries."""
    mask = (1 << (room + 1)) - 1
    reach = [1]
    for n in sizes:
        reach.append((reach[-1] | (reach[-1] << n)) & mask)
    total, picked = reach[-1].bit_length() - 1, []
    for i in range(len(sizes), 0, -1):
        if not (reach[i - 1] >> total) & 1:  # not reachable without entry i-1: take it
            picked.append(i - 1)
            total -= sizes[i - 1]
    return picked


def build_sequence(samples: list[SamplePlan], seq_length: int, reset: bool, pad_id: int,
                   tokens_per_tile: int) -> PackedSequence:
    ids, pos, tgt, meta = [], [], [], []
    for s in samples:
        start = len(ids)
        ids += s.input_ids
        tgt += s.targets
        pos += list(range(len(s.input_ids))) if reset else list(range(start, start + len(s.input_ids)))
        meta.append(dict(source=s.source, id=s.id, start=start, end=len(ids), image_tokens=s.n_tiles * tokens_per_tile,
                         labels=sum(t != IGNORE for t in s.targets), where=s.where))
    pad = seq_length - len(ids)
    ids += [pad_id] * pad
    tgt += [IGNORE] * pad
    pos += list(range(pad)) if reset else list(range(seq_length - pad, seq_length))
    return PackedSequence(torch.tensor(ids), torch.tensor(pos), torch.tensor(tgt), None, meta, pad, list(samples))
