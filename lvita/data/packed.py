"""The packed stream: sources -> mixture -> fixed-length packed sequences -> global batches.

Owns what every training step sees. Each stage's sources are read (JSONL, one sample per line,
see README "Sample format"), mixed by their ``ratio`` with a seeded order, encoded with the
ChatML template, and packed greedily into sequences of exactly ``data.seq_length`` tokens:

- ``reset_position_ids: true``: positions restart at 0 for every sample, and the attention
  kernel keeps each sample to itself (boundaries are where the position id is 0).
- ``reset_position_ids: false``: positions run 0..L-1 over the sequence, plain causal attention.
- ``same_source: true`` packs one source per sequence; ``false`` mixes them.

A global batch is a list of ``train.global_batch`` sequences and depends only on the seed and the
config, never on the parallel layout; :func:`rank_micro_batches` cuts this rank's share.
``state_dict()`` / ``load_state_dict()`` resume exactly.

Trade-off: this first version holds one epoch of encoded samples in memory and packs
first-fit over a small window of open sequences;
it is meant for the demo and tests. Bad samples are skipped and counted per reason.

    stream = PackedStream(cfg.data, tok, specials, tile=112, tokens_per_tile=16, global_batch=8, seed=1)
    batch = stream.next_global_batch()
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lvita.config import DataConfig
from lvita.data.media import MediaError, image_tiles, video_tiles
from lvita.data.template import IGNORE, PLACEHOLDER, SampleError, count_placeholders, encode_conversation, normalise_messages


@dataclass
class Sample:
    source: str
    id: str
    input_ids: list[int]
    targets: list[int]
    tiles: torch.Tensor  # (n_tiles, 3, T, T)


@dataclass
class PackedSequence:
    input_ids: torch.Tensor  # (L,)
    position_ids: torch.Tensor  # (L,)
    targets: torch.Tensor  # (L,)
    tiles: torch.Tensor  # (n_tiles, 3, T, T) in token order
    samples: list[dict] = field(default_factory=list)  # source, id, start, end, image_tokens, labels
    pad: int = 0


def source_files(root: Path, paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        full = (root / p) if not Path(p).is_absolute() else Path(p)
        files += sorted(full.rglob("*.jsonl")) if full.is_dir() else [full]
    return files


class PackedStream:
    def __init__(self, data: DataConfig, tokenizer, specials: dict, tile: int, tokens_per_tile: int,
                 global_batch: int, seed: int, log=print, max_reported: int = 5):
        self.cfg, self.tok, self.specials = data, tokenizer, specials
        self.tile, self.tokens_per_tile = tile, tokens_per_tile
        self.global_batch, self.seed, self.log = global_batch, seed, log
        self.skipped: Counter = Counter()
        self.max_reported = max_reported
        self.samples = {s.name: self._read_source(s.name, s.paths) if s.ratio > 0 else [] for s in data.sources}
        self.epoch, self.index = 0, 0
        self._sequences: list[PackedSequence] | None = None

    # -- reading ---------------------------------------------------------------------------
    def _skip(self, reason: str, where: str, detail: str) -> None:
        self.skipped[reason] += 1
        if sum(self.skipped.values()) <= self.max_reported:
            self.log(f"[data] skipped sample at {where}: {reason}: {detail}")

    def _read_source(self, name: str, paths: list[str]) -> list[Sample]:
        out = []
        for f in source_files(Path(self.cfg.root), paths):
            with open(f) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    where = f"{f}:{lineno}"
                    try:
                        out.append(self._encode(name, json.loads(line), f.parent))
                    except json.JSONDecodeError as e:
                        self._skip("malformed_json", where, str(e))
                    except SampleError as e:
                        self._skip(e.reason, where, str(e))
                    except MediaError as e:
                        self._skip("bad_media", where, str(e))
        return out

    def _encode(self, source: str, raw: dict, base: Path) -> Sample:
        if not isinstance(raw, dict):
            raise SampleError("malformed_json", "a line must be a JSON object")
        messages = normalise_messages(raw)
        images, videos = raw.get("images") or [], raw.get("videos") or []
        n_img, n_vid = count_placeholders(messages)
        if (n_img, n_vid) != (len(images), len(videos)):
            raise SampleError("placeholder_mismatch", f"{n_img} <image> / {n_vid} <video> placeholders for "
                                                      f"{len(images)} images / {len(videos)} videos")
        # Media in placeholder order.
        text = "".join(m["content"] for m in messages)
        it_img, it_vid, groups, media_tokens = iter(images), iter(videos), [], []
        for ph in PLACEHOLDER.findall(text):
            if ph == "<image>":
                t = image_tiles(base / next(it_img), self.tile)
            else:
                t = video_tiles(base / next(it_vid), self.tile, self.cfg.max_frames, self.cfg.video_fps)
            groups.append(t)
            media_tokens.append([self.tokens_per_tile] * t.shape[0])
        tiles = torch.cat(groups) if groups else torch.zeros(0, 3, self.tile, self.tile)
        if tiles.shape[0] > self.cfg.max_images:
            raise SampleError("too_many_images", f"{tiles.shape[0]} images/frames > data.max_images="
                                                 f"{self.cfg.max_images}")
        ids, targets = encode_conversation(messages, self.tok, self.specials, self.cfg.system_prompt, media_tokens)
        L = self.cfg.seq_length
        if len(ids) > L:
            if tiles.shape[0]:
                raise SampleError("too_long_multimodal", f"{len(ids)} tokens > data.seq_length={L}")
            ids, targets = ids[:L], targets[: L - 1] + [IGNORE]
            if all(t == IGNORE for t in targets):
                raise SampleError("truncated_no_labels", f"text longer than data.seq_length={L}; after "
                                                         f"truncation no assistant token is left")
        return Sample(source, str(raw.get("id", "?")), ids, targets, tiles)

    # -- mixing and packing --------------------------------------------------------------------
    def _mixture(self, rng: random.Random) -> list[tuple[str, list[Sample]]]:
        chosen = []
        for s in self.cfg.sources:
            pool = self.samples[s.name]
            k = int(math.floor(s.ratio * len(pool)))
            if s.max_samples is not None:
                k = min(k, s.max_samples)
            picks: list[int] = []
            while len(picks) < k:
                perm = list(range(len(pool)))
                rng.shuffle(perm)
                picks += perm[: k - len(picks)]
            chosen.append((s.name, [pool[i] for i in picks]))
        return chosen

    def _pack(self, samples: list[Sample], open_bins: int = 8) -> list[PackedSequence]:
        """First-fit over a window of ``open_bins`` open sequences; when none has room and the
        window is full, the fullest is closed. Deterministic for a given sample order."""
        L, seqs = self.cfg.seq_length, []
        bins: list[tuple[int, list[Sample]]] = []  # (tokens used, samples)
        for s in samples:
            n = len(s.input_ids)
            for i, (used, members) in enumerate(bins):
                if used + n <= L:
                    bins[i] = (used + n, members + [s])
                    break
            else:
                if len(bins) == open_bins:
                    fullest = max(range(len(bins)), key=lambda i: bins[i][0])
                    seqs.append(self._build(bins.pop(fullest)[1]))
                bins.append((n, [s]))
        seqs += [self._build(members) for _, members in bins]
        return seqs

    def _build(self, samples: list[Sample]) -> PackedSequence:
        L, reset = self.cfg.seq_length, self.cfg.reset_position_ids
        ids, pos, tgt, meta = [], [], [], []
        for s in samples:
            start = len(ids)
            ids += s.input_ids
            tgt += s.targets
            pos += list(range(len(s.input_ids))) if reset else list(range(start, start + len(s.input_ids)))
            meta.append(dict(source=s.source, id=s.id, start=start, end=len(ids),
                             image_tokens=s.tiles.shape[0] * self.tokens_per_tile,
                             labels=sum(t != IGNORE for t in s.targets)))
        pad = L - len(ids)
        ids += [self.specials["endoftext"]] * pad
        tgt += [IGNORE] * pad
        pos += list(range(pad)) if reset else list(range(L - pad, L))
        tiles = [s.tiles for s in samples]
        return PackedSequence(torch.tensor(ids), torch.tensor(pos), torch.tensor(tgt), torch.cat(tiles), meta, pad)

    def _epoch_sequences(self, epoch: int) -> list[PackedSequence]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        mixture = self._mixture(rng)
        if self.cfg.same_source:
            seqs = [seq for _, samples in mixture for seq in self._pack(samples)]
        else:
            everything = [s for _, samples in mixture for s in samples]
            rng.shuffle(everything)
            seqs = self._pack(everything)
        rng.shuffle(seqs)
        if len(seqs) < self.global_batch:
            raise ValueError(f"one pass over the data gives {len(seqs)} packed sequences, fewer than "
                             f"train.global_batch={self.global_batch}; add data or raise source ratios")
        return seqs

    # -- iteration and resume ------------------------------------------------------------------
    def next_global_batch(self) -> list[PackedSequence]:
        if self._sequences is None:
            self._sequences = self._epoch_sequences(self.epoch)
        if self.index + self.global_batch > len(self._sequences):
            self.epoch, self.index = self.epoch + 1, 0
            self._sequences = self._epoch_sequences(self.epoch)
        batch = self._sequences[self.index: self.index + self.global_batch]
        self.index += self.global_batch
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._sequences = None


def collate(seqs: list[PackedSequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> input_ids (B, L), position_ids (B, L), pixel_values (N, 3, T, T), targets (B, L)."""
    return (torch.stack([s.input_ids for s in seqs]), torch.stack([s.position_ids for s in seqs]),
            torch.cat([s.tiles for s in seqs]), torch.stack([s.targets for s in seqs]))


def rank_micro_batches(batch: list[PackedSequence], dp_rank: int, dp: int, micro: int) -> list[tuple]:
    """This data-parallel rank's micro-batches, as DeepSpeed pipeline tuples
    ``((input_ids, position_ids, pixel_values), (targets, loss_scale))``.

    Micro-batch m of rank r holds rows ``[(m*dp + r)*micro, ... + micro)`` of the global batch;
    loss_scale = micro-batches x ranks / labelled tokens of the whole global batch.
    """
    gas = len(batch) // (micro * dp)
    labelled = sum(int((s.targets != IGNORE).sum()) for s in batch)
    scale = torch.tensor(gas * dp / max(labelled, 1), dtype=torch.float32)
    out = []
    for m in range(gas):
        start = (m * dp + dp_rank) * micro
        ids, pos, pix, tgt = collate(batch[start: start + micro])
        out.append(((ids, pos, pix), (tgt, scale)))
    return out
