"""The data stream: mixture -> planned samples -> packed sequences -> global batches, prefetched.

Owns what every training step sees. Every rank runs the same deterministic planning (read the
mixture, apply the ChatML template, count tiles and frames from file headers, pack), so the
sequence of global batches depends only on the seed and the config, never on the parallel
layout. Pixels are decoded only where this rank consumes them: in the rows it trains on
(``own_rows``), only on pipeline stage 0 and only the tiles of its sequence shard (``PixelShare``),
by a pool of ``data.workers`` threads (pillow and decord release the GIL while decoding and
resizing); ``data.prefetch`` global batches are prepared ahead in a background thread. Tiles stay
uint8 (the vision encoder normalises them on the device): 4x less host memory than float32.

    fmt = InputFormat.load(spec, cfg.model.tokenizer)    # lvita.data.input_format
    stream = DataStream(cfg.data, fmt, global_batch=64, seed=1234, own_rows=range(64),
                        pixels=PixelShare(sequence_rank=1, ulysses=2, image_token_id=fmt.context_ids))
    batch = stream.next_global_batch()       # list[PackedSequence]; own rows carry ``tiles`` (uint8)
    state = stream.state_dict()              # exact position after the last batch returned

Each record is planned by :mod:`lvita.data.plan` (record schemas, media forms, placeholders) in the
model format's layout (``fmt``: the run's :class:`lvita.data.input_format.InputFormat`; released
Long-VITA's tiles come thumbnail first and its context runs use three ids, so
``PixelShare.image_token_id`` is then the tuple of them: ``fmt.context_ids``).
Bad samples (malformed JSON, empty or malformed conversation, no assistant turn, placeholder /
media count mismatch, a URL or unknown media form, missing or unreadable media, too many images,
too long with media, text truncated to no labels) are skipped and counted per reason; the first few are logged with file
and line. Past ``data.max_skip_fraction`` (after 100 records) the run stops with the counts.
An image whose header reads but whose pixels do not decode is found only when its row is decoded:
its tiles are filled with the mean colour (they normalise to about 0) and its labels dropped,
counted as ``bad_media_at_decode``. Only the ranks that decode the sample see the failure, so
``next_global_batch(agree=...)`` lets the trainer share them (one all-gather) and every rank of the
job drops the same labels.
"""
from __future__ import annotations

import queue
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lvita.config.schema import DataConfig
from lvita.data.errors import DataError  # noqa: F401 - re-exported: lvita.data.stream.DataError
from lvita.data.input_format import InputFormat
from lvita.data.media import MEAN_UINT8, MediaError
from lvita.data.packer import Packer, PackedSequence, SamplePlan, build_sequence
from lvita.data.plan import Planner
from lvita.data.sources import Mixture, Record
from lvita.data.template import IGNORE, SampleError
from lvita.parallel.sequence import shard_tiles

MIN_RECORDS_FOR_THRESHOLD = 100


@dataclass(frozen=True)
class PixelShare:
    """The pixels one rank consumes. A pipeline stage > 0 consumes none (``decode=False``: its rows
    keep ids, positions and labels, with no tiles); a sequence-parallel rank only the tiles whose
    placeholders fall in its shard (zigzag for ring, contiguous for Ulysses:
    :func:`lvita.parallel.sequence.shard_tiles`)."""
    decode: bool = True
    sequence_rank: int = 0
    ulysses: int = 1
    ring: int = 1
    image_token_id: int | tuple[int, ...] = -1  # the context ids (longvita: <IMG_/PATCH_/VID_CONTEXT>)

    def tiles(self, seq: PackedSequence, tokens_per_tile: int) -> list[int] | None:
        """The tile numbers of ``seq`` to decode, sorted; None: all of them."""
        if not self.decode:
            return []
        if self.ulysses * self.ring == 1:
            return None
        return shard_tiles(seq.input_ids, self.sequence_rank, self.ulysses, self.ring, self.image_token_id,
                           tokens_per_tile)[1].tolist()


class DataStream:
    def __init__(self, data: DataConfig, fmt: InputFormat, global_batch: int, seed: int, own_rows=None, log=print,
                 max_reported: int = 5, pixels: PixelShare = PixelShare()):
        self.cfg, self.fmt, self.specials = data, fmt, fmt.specials
        self.tile, self.tpt, self.global_batch, self.log = fmt.tile, fmt.tpt, global_batch, log
        self.own_rows = set(range(global_batch) if own_rows is None else own_rows)
        self.pixels = pixels
        self.mixture = Mixture(data, seed)
        self.planner = Planner(data, fmt)
        self._local = threading.local()  # per decoding thread: its own readers (embedded media)
        self.packer = Packer(data.seq_length, data.pack_buffer, data.same_source)
        self.skipped: Counter = Counter()
        self.records = 0
        self.max_reported = max_reported
        self.first_skipped: list[str] = []  # "file:line: reason: detail", for the DataError message
        self._decode_failures: Counter = Counter()
        self._state = self._snapshot()
        self._queue: queue.Queue | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()

    # -- planning (every rank, deterministic) ----------------------------------------------------
    def _skip(self, reason: str, where: str, detail: str) -> None:
        self.skipped[reason] += 1
        if sum(self.skipped.values()) <= self.max_reported:
            self.log(f"[data] skipped sample at {where}: {reason}: {detail}")
        if len(self.first_skipped) < 3:
            self.first_skipped.append(f"{where}: {reason}: {detail}")

    def plan(self, record: Record) -> SamplePlan:
        return self.planner.plan(record)

    def _try_plan(self, record: Record) -> SamplePlan | None:
        self.records += 1
        try:
            return self.plan(record)
        except SampleError as e:
            self._skip(e.reason, record.where, str(e))
        except MediaError as e:
            self._skip("bad_media", record.where, str(e))
        frac = sum(self.skipped.values()) / self.records
        if self.records >= MIN_RECORDS_FOR_THRESHOLD and frac > self.cfg.max_skip_fraction:
            raise DataError(f"data: {sum(self.skipped.values())} of {self.records} records skipped ({frac:.1%}), "
                            f"above data.max_skip_fraction={self.cfg.max_skip_fraction}; by reason: "
                            f"{dict(self.skipped)}; first: " + "; ".join(self.first_skipped) + ". Fix the data "
                            f"(`lvita data preview` lists the bad records) or raise the threshold.")
        return None

    def next_sequence(self) -> PackedSequence:
        while True:
            plan = self._try_plan(self.mixture.next())
            if plan is not None and (done := self.packer.add(plan)):
                return build_sequence(done, self.cfg.seq_length, self.cfg.reset_position_ids,
                                      self.specials["endoftext"], self.tpt)

    def _snapshot(self) -> dict:
        return {"mixture": self.mixture.state_dict(), "records": self.records, "skipped": dict(self.skipped),
                "pending": [[s.source, list(s.cursor)] for s in self.packer.pending]}

    # -- decoding (own rows, worker threads) -----------------------------------------------------
    def _read_at(self, source: str, cursor: tuple) -> Record:
        readers = self._local.__dict__.setdefault("readers", {})
        if source not in readers:
            readers[source] = self.mixture.readers[source].reopen()
        return readers[source].read(tuple(cursor))[0]

    def _source(self, ref):
        return self.planner.media_source(ref, self._read_at)

    def decode(self, seq: PackedSequence) -> tuple[PackedSequence, list[int]]:
        """Fill ``seq.tiles`` (uint8) with the tiles this rank consumes (``self.pixels``); returns the
        indices of the samples whose media failed to decode (filled with the mean colour)."""
        want = self.pixels.tiles(seq, self.tpt)
        tiles, failed, off = [], [], 0
        for i, s in enumerate(seq.plans):
            keeps = []
            for m in s.media:  # which of each medium's tiles this rank needs
                n = m.tiles
                keeps.append(None if want is None else [t - off for t in want if off <= t < off + n])
                off += n
            try:
                tiles += [self.media_tiles(m, keep) for m, keep in zip(s.media, keeps) if keep != []]
            except MediaError as e:
                failed.append(i)
                self.log(f"[data] {s.where}: {e}; the sample's tiles are blanked and its labels dropped")
                n = sum(m.tiles if k is None else len(k) for m, k in zip(s.media, keeps))
                tiles.append(torch.tensor(MEAN_UINT8, dtype=torch.uint8).view(1, 3, 1, 1)
                             .expand(n, 3, self.tile, self.tile).clone())
        seq.tiles = torch.cat(tiles) if tiles else torch.zeros(0, 3, self.tile, self.tile, dtype=torch.uint8)
        return seq, failed

    def media_tiles(self, m, keep=None) -> torch.Tensor:
        """The uint8 tiles of one planned medium (``SamplePlan.media`` entry), in token order."""
        return self.fmt.medium_tiles(m, self._source(m.ref), self.cfg.min_tiles, keep)

    @staticmethod
    def drop_labels(rows: list[PackedSequence], failed) -> None:
        """Drop the labels of samples ``(row, sample index)`` whose media failed to decode."""
        for r, i in failed:
            meta = rows[r].samples[i]
            rows[r].targets = rows[r].targets.clone()
            rows[r].targets[meta["start"]:meta["end"]] = IGNORE

    # -- the prefetching producer ----------------------------------------------------------------
    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                rows = [self.next_sequence() for _ in range(self.global_batch)]
                state = self._snapshot()
                futures = {i: self._pool.submit(self.decode, rows[i]) for i in sorted(self.own_rows)}
                self._queue.put((rows, futures, state))
        except BaseException as e:  # noqa: BLE001 - handed to the training loop
            self._queue.put(e)

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=max(1, self.cfg.prefetch))
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.workers), thread_name_prefix="lvita-data")
        threading.Thread(target=self._produce, name="lvita-data-plan", daemon=True).start()

    def next_global_batch(self, agree=None) -> list[PackedSequence]:
        """The next global batch. ``agree(failed) -> failed``: the trainer's exchange of the
        ``(row, sample)`` pairs whose media failed to decode on some rank (each rank decodes only
        part of the pixels); without it, this rank's own failures count."""
        if self._queue is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        rows, futures, state = item
        failed = []
        for i, fut in futures.items():
            rows[i], bad = fut.result()
            failed += [(i, j) for j in bad]
        if agree is not None:
            failed = sorted({(int(r), int(j)) for r, j in agree(failed)})
        if failed:
            self.drop_labels(rows, failed)
            self._decode_failures["bad_media_at_decode"] += len(failed)
        self._state = state
        return rows

    @property
    def skipped_total(self) -> dict:
        return dict(Counter(self._state["skipped"]) + self._decode_failures)

    def state_dict(self) -> dict:
        return {**self._state, "skipped": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        if self._queue is not None:
            raise RuntimeError("load_state_dict must come before the first next_global_batch")
        self.mixture.load_state_dict(state["mixture"])
        self.records, self.skipped = int(state["records"]), Counter(state["skipped"])
        self.packer = Packer(self.cfg.seq_length, self.cfg.pack_buffer, self.cfg.same_source)
        for source, cursor in state["pending"]:  # re-read and re-plan what was waiting in the buffer
            self.packer.pending.append(self.plan(self.mixture.read_at(source, cursor)))
        self._state = self._snapshot()

    def close(self) -> None:
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def collate(seqs: list[PackedSequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> input_ids (B, L), position_ids (B, L), pixel_values (N, 3, T, T), targets (B, L)."""
    return (torch.stack([s.input_ids for s in seqs]), torch.stack([s.position_ids for s in seqs]),
            torch.cat([s.tiles for s in seqs]), torch.stack([s.targets for s in seqs]))


def own_rows(data_rank: int, dp: int, micro: int, global_batch: int) -> list[int]:
    """Rows of the global batch that data-parallel rank ``data_rank`` trains on (see below)."""
    gas = global_batch // (micro * dp)
    return [(m * dp + data_rank) * micro + j for m in range(gas) for j in range(micro)]


def rank_micro_batches(batch: list[PackedSequence], dp_rank: int, dp: int, micro: int,
                       reduction: str = "token") -> list[tuple]:
    """This data-parallel rank's micro-batches, as DeepSpeed pipeline tuples
    ``((input_ids, position_ids, pixel_values), (targets, loss_scale))``.

    Micro-batch m of rank r holds rows ``[(m*dp + r)*micro, ... + micro)`` of the global batch.
    DeepSpeed averages the returned losses over micro-batches and ranks, so the scale undoes that average:
    ``reduction`` (train.loss_reduction) "token": loss_scale () = micro-batches x ranks / labelled tokens of
    the whole global batch (every labelled token weighs the same); "sequence" (the official Megatron loss):
    loss_scale (micro,) = micro-batches x ranks / (sequences x labelled tokens of that row), each packed
    sequence's token mean weighing the same (sequences with no labelled token weigh nothing and do not count).
    Either way the loss is independent of the layout.
    """
    gas = len(batch) // (micro * dp)
    counts = [int((s.targets != IGNORE).sum()) for s in batch]
    if reduction == "sequence":
        n_seq = max(sum(c > 0 for c in counts), 1)
        scales = torch.tensor([gas * dp / (n_seq * c) if c else 0.0 for c in counts], dtype=torch.float32)
    else:
        scale = torch.tensor(gas * dp / max(sum(counts), 1), dtype=torch.float32)
    out = []
    for m in range(gas):
        start = (m * dp + dp_rank) * micro
        ids, pos, pix, tgt = collate(batch[start: start + micro])
        out.append(((ids, pos, pix), (tgt, scales[start: start + micro] if reduction == "sequence" else scale)))
    return out
