"""Shuffled batches of one hook's activation rows, streamed from the store for SAE training.

The schedule is deterministic: it depends only on the store, the hook, the `ReaderConfig`, the
rank and the world size.

1. Kept rows. A row is skipped when its position (row % context_size) is below
   `exclude_first_positions` or its token id is one of the store's special tokens. Skipped rows
   stay in the store (row r is still row r); they are never yielded. Which rows are kept, and how
   many per chunk, is computed once, from `token_ids` alone.
2. Chunk partition. Epoch e orders all chunks by a permutation seeded by (seed, e). Rank r takes
   chunks r, r + world_size, r + 2 world_size, ... of that order: the ranks' partitions are
   disjoint and together hold every chunk.
3. Blocks. Consecutive groups of `buffer_chunks` of the rank's chunks form its blocks. A block's
   kept rows, in ascending row order, are shuffled by a permutation seeded by
   (seed, e, rank, block index).
4. Batches. Batches of `batch_size` rows are cut from the concatenation of the rank's shuffled
   blocks of the epoch; a batch may span two blocks. Every rank yields the same number of batches
   per epoch, min over ranks of floor(kept rows of that rank in the epoch / batch_size), which
   every rank computes from the kept counts without communicating, so DDP ranks stay in step. The
   rest of the epoch's rows are skipped (a different random set each epoch). Epochs follow one
   another without end, or stop after `epochs`.

The position, (epoch, rows yielded in that epoch), is the same on every rank, so the
`state_dict()` of any rank resumes all ranks exactly. Restoring it jumps straight to the block
that holds the next row, using the kept counts: skipped blocks are never read.

Streaming (`ReaderConfig.stream`: train while a harvest is still writing the store). Epoch 0
does not permute: rank r takes shards r, r + world_size, ... (the harvester's own split), in
ascending order; its chunks, in that order, form its blocks (`buffer_chunks` each), shuffled as
in 3. A block is read only once the done flags of all its shards are set; a shard's kept rows are
counted when its flag appears (from its token ids, the same rule as in 1). Epoch 0's batch count
is min over ranks of their kept rows in it, as in 4; it is known once every shard is in, and
until then a batch is handed on only when every rank is known to hold at least as many rows (the
sum of its shards counted so far), so every rank computes the same count, without communicating,
and the batches never depend on timing: a growing store and the finished one give the same
batches. Epochs from 1 on use the permuted plan, which needs every shard: they (and
`batches_in_epoch(0)`, `plan`) wait for the harvest to finish. Each wait is bounded by
`stream_timeout_s` without a new shard; past it, a `StoreError` names the shard awaited. A harvest
whose dataset ran out writes a short last shard and then trims the store (`finalize`): a shard
whose rows are not all written (token id -1, the fill value) is not read until the store is
complete, and the plan then follows the trimmed geometry, whose earlier blocks are unchanged.

Reading: a background daemon thread decodes each block's chunks into one reused buffer (one Zarr
call per run of up to `MAX_RUN_CHUNKS` adjacent chunks; from a remote store, `REMOTE_READS` runs
at a time, since each costs HTTP round trips) and gathers its shuffled batches with numpy; a
queue of `prefetch` blocks separates it from the consumer. Zarr, zstd and numpy release the GIL,
so the thread overlaps the training step. Exceptions in the thread are raised in the consumer (a
damaged chunk: the `StoreError` that names it, see `ActivationStore.reading`); the thread stops
when the iterator is closed or garbage-collected.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import mmap
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import zarr
from zarr.core.buffer.cpu import NDBuffer

from saeworks.activations.config import ReaderConfig
from saeworks.activations.remote import is_remote
from saeworks.activations.store import (
    SHARD_DONE,
    TOKEN_IDS,
    ActivationStore,
    StoreError,
    StoreGeometry,
    to_tensor,
)

STATE_VERSION = 1
MAX_RUN_CHUNKS = 4
"""Adjacent chunks read in one Zarr call. More is slower: a call covering a whole shard makes Zarr
read the shard file in one piece (measured ~0.6x the per-chunk rate for 16-chunk shards)."""
REMOTE_READS = 8
"""Runs of a block read at once from a remote store (`s3://`): a run costs an index request and a
ranged request per chunk, and one after another the reader would wait out every round trip (see
benchmarks/reader_s3.py --remote-reads). Local stores read runs one by one."""
_KEPT_SCAN_ROWS = 1 << 22  # token ids read per step when counting kept rows
MAPPED_BATCH_BYTES = 1 << 20
"""Batches from this size up get a memory mapping of their own (`_mapped_empty`)."""
_POLL_S = 0.1  # how often a blocked thread checks whether the other side is gone
STREAM_POLL_S = 0.2
"""How often a streaming reader looks for new done flags in a local store (remote: `_REMOTE_POLL_S`,
one listing of the flags and one read of the group metadata each time)."""
_REMOTE_POLL_S = 2.0


class ReaderBatch(NamedTuple):
    """One training batch of a single hook."""

    activations: torch.Tensor
    """[batch, d] in the stored dtype (bfloat16 restored from its raw bits)."""
    rows: torch.Tensor
    """[batch] int64: the global store row of each activation row."""


@dataclass(frozen=True)
class KeptRows:
    """Which rows of a store training reads: one packed bit per row, and the count per chunk."""

    bits: np.ndarray  # [ceil(n_tokens / 8)] uint8: keep flags, packed
    per_chunk: np.ndarray  # [n_chunks] int64: kept rows per chunk
    chunk_rows: int
    n_tokens: int

    @classmethod
    def count(cls, store: ActivationStore, first_positions: int, token_ids: list[int]) -> KeptRows:
        """Scan `token_ids` once (in steps of whole chunks and whole bytes of flags)."""
        chunk_rows, n_tokens, context = store.geometry.chunk_rows, store.n_tokens, store.context_size
        step = chunk_rows * 8 * max(1, _KEPT_SCAN_ROWS // (chunk_rows * 8))
        excluded = np.asarray(sorted(token_ids), dtype=np.int64)
        bits, counts = [], []
        for start in range(0, n_tokens, step):
            stop = min(start + step, n_tokens)
            keep = np.arange(start, stop) % context >= first_positions  # [stop - start] bool
            if excluded.size:
                keep &= ~np.isin(store.read(TOKEN_IDS, start, stop), excluded)
            bits.append(np.packbits(keep))
            counts.append(np.add.reduceat(keep, np.arange(0, stop - start, chunk_rows), dtype=np.int64))
        return cls(np.concatenate(bits), np.concatenate(counts), chunk_rows, n_tokens)

    def mask(self, start: int, stop: int) -> np.ndarray:
        """Keep flags of rows [start, stop) as a bool array."""
        first = start // 8
        flags = np.unpackbits(self.bits[first:(stop + 7) // 8])
        return flags[start - 8 * first:stop - 8 * first].view(bool)

    @property
    def total(self) -> int:
        return int(self.per_chunk.sum())


class ShardKept:
    """`KeptRows` built shard by shard as a harvest finishes them (streaming): packed keep flags
    per counted shard, kept rows per chunk and per shard (0 until counted), which are counted."""

    def __init__(self, geometry: StoreGeometry) -> None:
        self.geometry = geometry
        self.chunk_rows, self.n_tokens = geometry.chunk_rows, geometry.n_tokens
        self.per_chunk = np.zeros(-(-self.n_tokens // self.chunk_rows), dtype=np.int64)
        self.per_shard = np.zeros(geometry.n_shards, dtype=np.int64)
        self.counted = np.zeros(geometry.n_shards, dtype=bool)
        self.bits: dict[int, np.ndarray] = {}

    def add(self, shard: int, keep: np.ndarray) -> None:
        """Record shard `shard`'s keep flags (`keep`: [rows of the shard] bool)."""
        first_chunk = self.geometry.shard_rows_range(shard).start // self.chunk_rows
        counts = np.add.reduceat(keep, np.arange(0, len(keep), self.chunk_rows), dtype=np.int64)
        self.per_chunk[first_chunk:first_chunk + len(counts)] = counts
        self.per_shard[shard] = int(counts.sum())
        self.bits[shard] = np.packbits(keep)
        self.counted[shard] = True

    def mask(self, start: int, stop: int) -> np.ndarray:
        """Keep flags of rows [start, stop) as a bool array (their shards must be counted)."""
        shard_rows = self.geometry.shard_rows
        parts = []
        for shard in range(start // shard_rows, (stop - 1) // shard_rows + 1):
            if shard not in self.bits:
                raise RuntimeError(f"rows {start}-{stop - 1} reach shard {shard}, which is not done")
            base = shard * shard_rows
            lo, hi = max(start, base) - base, min(stop, base + shard_rows) - base
            flags = np.unpackbits(self.bits[shard][lo // 8:(hi + 7) // 8])
            parts.append(flags[lo % 8:lo % 8 + hi - lo])
        return np.concatenate(parts).view(bool)

    def trimmed(self, geometry: StoreGeometry) -> ShardKept:
        """The counts carried over to the geometry `finalize` trimmed the store to: every counted
        shard whose rows are unchanged (all but a short last one, which is counted again)."""
        kept = ShardKept(geometry)
        for shard in np.flatnonzero(self.counted).tolist():
            if shard < geometry.n_shards and \
                    geometry.shard_rows_range(shard) == self.geometry.shard_rows_range(shard):
                kept.add(shard, self.mask(*_bounds(self.geometry.shard_rows_range(shard))))
        return kept

    @property
    def total(self) -> int:
        return int(self.per_chunk.sum())


def _bounds(rows: range) -> tuple[int, int]:
    return rows.start, rows.stop


@dataclass(frozen=True)
class EpochPlan:
    """One rank's share of one epoch: its blocks and where each starts in its row stream."""

    epoch: int
    blocks: list[np.ndarray]  # per block: its chunk indices, ascending
    starts: np.ndarray  # [n_blocks + 1] int64: first stream row of each block, then the total
    usable: int  # rows every rank yields in this epoch (a multiple of batch_size)


@dataclass(frozen=True)
class _Batch:
    activations: np.ndarray  # [batch, d] on-disk dtype
    rows: np.ndarray  # [batch] int64
    position: tuple[int, int]  # (epoch, rows in epoch) once this batch is consumed


@dataclass(frozen=True)
class _Failure:
    error: BaseException


_END = object()


class _Stopped(Exception):
    """The consumer went away: the loading thread ends quietly."""


class ActivationReader:
    """Shuffled `ReaderBatch`es of one hook for one rank; iterate it (see the module docstring).

    `epochs=None` streams forever; an int stops after that many epochs (counted from epoch 0, so a
    restored reader yields what is left of them). Starting a new iteration, or loading a state,
    invalidates the previous iterator. With `cfg.stream` the store may still be being harvested.
    """

    def __init__(self, store: ActivationStore, hook: str, cfg: ReaderConfig, rank: int = 0,
                 world_size: int = 1, epochs: int | None = None) -> None:
        if not cfg.stream or store.complete:
            store.require_complete()
        self.array: zarr.Array = store.array(hook)  # StoreError naming the hooks if unknown
        if hook not in store.hooks:
            raise StoreError(f"{hook!r} is an index array, not a hook; the store holds "
                             f"{', '.join(store.hooks)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be positive or None (endless), got {epochs}")
        self.store, self.hook, self.cfg = store, hook, cfg
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.first_positions, self._special = _exclusions(store, cfg)
        self._fingerprint = _fingerprint(store, cfg.stream)
        self._epoch, self._rows, self._generation = 0, 0, 0
        self.pace: _Pace | None = None
        """The latest iteration's read-ahead: its queue depth follows decode and step times."""
        self.back_to_back_reads = False
        """Set by `back_to_back`: the consumer's times between batches are not its pace."""
        self.kept: KeptRows | ShardKept
        if cfg.stream:
            self._lock = threading.RLock()  # the loader thread and the consumer both count shards
            self._complete, self._final = store.complete, False
            self._blocks: list[np.ndarray] | None = None
            self.kept = ShardKept(store.geometry)
            if store.geometry.n_shards < world_size:
                raise ValueError(f"store {store.url!r} has {store.geometry.n_shards} shards; streaming "
                                 f"gives each of {world_size} ranks whole shards, so some would get "
                                 "none: use fewer ranks, or train on the finished store without stream")
            if self._complete:
                self._await(None, None)  # every flag is set: counts the whole store
        else:
            self.kept = KeptRows.count(store, self.first_positions, self._special)
            self._check_enough_rows()

    @property
    def d(self) -> int:
        return self.store.d(self.hook)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the yielded activations: the store's."""
        return getattr(torch, self.store.store_dtype)  # type: ignore[no-any-return]

    @property
    def n_chunks(self) -> int:
        return len(self.kept.per_chunk)

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's blocks of `epoch` and the rows every rank yields in it. Streaming: waits
        (bounded by `stream_timeout_s` per shard) until every shard of the store is done."""
        return self._plan(epoch, None)

    def _plan(self, epoch: int, stop: threading.Event | None) -> EpochPlan:
        if self.cfg.stream:
            self._await(None, stop)
            if epoch == 0:
                return self._stream_plan()
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n_chunks)
        kept_by_rank = [int(self.kept.per_chunk[order[r::self.world_size]].sum())
                        for r in range(self.world_size)]
        mine = order[self.rank::self.world_size]
        size = self.cfg.buffer_chunks
        blocks = [np.sort(mine[i:i + size]) for i in range(0, len(mine), size)]
        return self._epoch_plan(epoch, blocks, min(kept_by_rank))

    def _epoch_plan(self, epoch: int, blocks: list[np.ndarray], fewest: int) -> EpochPlan:
        block_rows = [int(self.kept.per_chunk[block].sum()) for block in blocks]
        starts = np.concatenate([[0], np.cumsum(block_rows, dtype=np.int64)]).astype(np.int64)
        usable = fewest // self.cfg.batch_size * self.cfg.batch_size
        return EpochPlan(epoch, blocks, starts, usable)

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches every rank yields in `epoch` (the same on all ranks). Streaming: waits for
        every shard, like `plan`."""
        return self.plan(epoch).usable // self.cfg.batch_size

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches already yielded (not prefetched ones), JSON-able."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "rows_in_epoch": self._rows,
                **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batches the saved reader had yielded."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state has version {state.get('version')!r}; this reader "
                             f"reads version {STATE_VERSION}")
        mine = self._identity()
        wrong = [f"{key}={state.get(key)!r} in the state, {value!r} here"
                 for key, value in mine.items() if state.get(key) != value]
        if wrong:
            raise ValueError("reader state was saved by a reader with another schedule ("
                             + "; ".join(wrong) + "); resume with the same store, hook, seed, "
                             "world size, batch size, buffer_chunks, exclusions and stream setting")
        epoch, rows = int(state["epoch"]), int(state["rows_in_epoch"])
        # Streaming epoch 0 before every shard is in: its end is not known yet (the loader stops there).
        known = epoch >= 0 and not (self.cfg.stream and epoch == 0 and not self._final)
        usable = self.plan(epoch).usable if known else None
        if epoch < 0 or rows < 0 or rows % self.cfg.batch_size or (usable is not None and rows > usable):
            raise ValueError(f"reader state position (epoch {epoch}, row {rows}) is not a batch "
                             f"boundary of that epoch (it has {usable} rows)")
        self._epoch, self._rows = (epoch + 1, 0) if rows == usable else (epoch, rows)
        self._generation += 1

    @contextlib.contextmanager
    def back_to_back(self) -> Iterator[None]:
        """Batches taken inside are read one after another without work between them (the
        trainer's initial sample): the read-ahead does not take that for the consumer's pace. It
        would otherwise queue a whole block's worth of batches for a consumer that looks
        infinitely fast (151 MB on the demo, held into training)."""
        self.back_to_back_reads = True
        try:
            yield
        finally:
            self.back_to_back_reads = False

    def __iter__(self) -> Iterator[ReaderBatch]:
        self._generation += 1
        return self._stream(self._generation)

    def _stream(self, generation: int) -> Iterator[ReaderBatch]:
        """Start the loading thread, hand its batches on, stop it when the consumer stops."""
        if self.epochs is not None and self._epoch >= self.epochs:
            return
        drain = _drain  # (a global may be None when this generator is closed at interpreter exit)
        per_block = max(1, self.cfg.buffer_chunks * self.kept.chunk_rows // self.cfg.batch_size)
        pace = _Pace(self.cfg.prefetch * per_block)
        self.pace = pace
        blocks: queue.Queue = queue.Queue(maxsize=pace.depth())  # of batches; the loader resizes it
        stop = threading.Event()
        loader = _Loader(self, self._epoch, self._rows, blocks, stop, pace)
        thread = threading.Thread(target=loader.run, daemon=True,
                                  name=f"ActivationReader[{self.hook}, rank {self.rank}]")
        thread.start()
        try:
            while (item := _get(blocks, thread)) is not _END:
                if isinstance(item, _Failure):
                    raise item.error
                item.reverse()
                while item:  # pop, so that a consumed batch's memory can be freed at once
                    batch = item.pop()
                    if generation != self._generation:
                        raise RuntimeError("this iterator is stale: the reader was iterated "
                                           "again or its state reloaded; call iter() again")
                    self._epoch, self._rows = batch.position
                    handed = time.perf_counter()
                    yield ReaderBatch(to_tensor(batch.activations, self.store.store_dtype),
                                      torch.from_numpy(batch.rows))
                    if not self.back_to_back_reads:
                        pace.consumed(time.perf_counter() - handed)
        finally:
            stop.set()
            drain(blocks)

    def _identity(self) -> dict[str, Any]:
        """What decides the batch sequence: a state resumes only a reader with the same. (A
        streaming reader's kept-row total is not known up front: its identity says `stream`.)"""
        identity = {"store": self._fingerprint, "hook": self.hook, "seed": self.cfg.seed,
                    "world_size": self.world_size, "batch_size": self.cfg.batch_size,
                    "buffer_chunks": self.cfg.buffer_chunks,
                    "exclude_first_positions": self.first_positions,
                    "exclude_special_tokens": self.cfg.exclude_special_tokens}
        if self.cfg.stream:
            return {**identity, "stream": True}
        return {**identity, "kept_rows": self.kept.total}

    def _check_enough_rows(self, error: type[Exception] = ValueError) -> None:
        """Refuse a schedule in which some epoch could give a rank less than one batch."""
        per_rank = self.n_chunks // self.world_size
        smallest = int(np.sort(self.kept.per_chunk)[:per_rank].sum())
        if smallest < self.cfg.batch_size:
            raise error(
                f"store {self.store.url!r} has {self.kept.total} kept rows of {self.hook!r} in "
                f"{self.n_chunks} chunks; split over {self.world_size} ranks, a rank may get only "
                f"{smallest} in an epoch, less than batch_size={self.cfg.batch_size}; lower the "
                "batch size or use fewer ranks")

    # Streaming: shards are counted as their done flags appear; epoch 0 follows the shard order.

    def _rank_rows(self) -> list[int]:
        """Kept rows of each rank's epoch-0 shards counted so far (all of them once `_final`)."""
        assert isinstance(self.kept, ShardKept)
        return [int(self.kept.per_shard[r::self.world_size].sum()) for r in range(self.world_size)]

    def _stream_bound(self) -> tuple[int, bool]:
        """(rows every rank is known to yield in epoch 0, whether that is its final count)."""
        with self._lock:
            fewest = min(self._rank_rows())
            return fewest // self.cfg.batch_size * self.cfg.batch_size, self._final

    def _stream_blocks(self) -> list[np.ndarray]:
        """This rank's epoch-0 blocks: the chunks of shards rank, rank + world_size, ... in order."""
        blocks = self._blocks
        if blocks is None:
            geometry = self.store.geometry
            chunks = np.arange(self.n_chunks)
            mine = chunks[chunks // geometry.chunks_per_shard % self.world_size == self.rank]
            size = self.cfg.buffer_chunks
            blocks = self._blocks = [mine[i:i + size] for i in range(0, len(mine), size)]
        return blocks

    def _stream_plan(self) -> EpochPlan:
        """Epoch 0 of a streaming reader, once every shard is counted."""
        return self._epoch_plan(0, self._stream_blocks(), min(self._rank_rows()))

    def _await_rows(self, rows: int, stop: threading.Event | None) -> bool:
        """Wait until every rank is known to yield at least `rows` rows in epoch 0 (True), or the
        final count is known to be fewer (False)."""
        while True:
            bound, final = self._stream_bound()
            if bound >= rows or final:
                return bound >= rows
            self._await(None, stop, until_progress=True)

    def _await(self, shards: list[int] | None, stop: threading.Event | None,
               until_progress: bool = False) -> None:
        """Wait until `shards` (None: every shard) are counted (`until_progress`: until one more
        is), polling their done flags; error after `stream_timeout_s` without a new shard
        counted. `stop` set: raise `_Stopped`."""
        timeout, since = self.cfg.stream_timeout_s, time.monotonic()
        poll = _REMOTE_POLL_S if is_remote(self.store.url) else STREAM_POLL_S
        while True:
            with self._lock:
                missing = self._missing(shards)
                if missing and self._poll(missing):
                    if until_progress:
                        return
                    since = time.monotonic()
                    missing = self._missing(shards)
            if not missing:
                return
            waited = time.monotonic() - since
            if waited >= timeout:
                rows = self.store.geometry.shard_rows_range(missing[0])
                raise StoreError(
                    f"store {self.store.url!r} is still incomplete: the reader waited {waited:.0f} s "
                    f"(stream_timeout_s) for shard {missing[0]} (rows {rows.start}-{rows.stop - 1}) "
                    "and no new shard was finished; the harvest writing it has stopped or is too "
                    "slow: rerun the same `saeworks harvest` command to resume it (then resume "
                    "training with train.resume=true), or raise train.reader.stream_timeout_s")
            pause = min(poll, timeout - waited)
            if stop is None:
                time.sleep(pause)
            elif stop.wait(pause):
                raise _Stopped

    def _missing(self, shards: list[int] | None) -> list[int]:
        """Those of `shards` (None: all) not counted yet, in the current geometry."""
        assert isinstance(self.kept, ShardKept)
        counted = self.kept.counted
        if shards is None:
            return np.flatnonzero(~counted).tolist()  # type: ignore[no-any-return]
        return [s for s in shards if s < len(counted) and not counted[s]]

    def _poll(self, missing: list[int]) -> bool:
        """Count each of `missing` whose done flag is set and whose rows are all written; adopt
        the finished store once it is complete. Whether anything was counted or adopted."""
        assert isinstance(self.kept, ShardKept)
        lo, hi = missing[0], missing[-1] + 1
        if is_remote(self.store.url):
            flags = self.store.flag_objects()[lo:hi]  # one listing, not a read per flag
        else:
            flags = self.store.read(SHARD_DONE, lo, hi).astype(bool)
        progress = False
        for shard in missing:
            keep = self._count_shard(shard) if flags[shard - lo] else None
            if keep is not None:
                self.kept.add(shard, keep)
                progress = True
        if not self._complete and not self.kept.counted[missing].all():
            fresh = ActivationStore.open(self.store.url)
            if fresh.complete:
                self._adopt(fresh)
                progress = True
        if not self._final and self.kept.counted.all():
            self._final = True
            self._check_stream_rows()
        return progress

    def _count_shard(self, shard: int) -> np.ndarray | None:
        """[rows of the shard] keep flags; None for a shard with rows not written (the short last
        shard of a dataset that ran out, read once `finalize` has trimmed the store)."""
        rows = self.kept.geometry.shard_rows_range(shard)  # type: ignore[union-attr]
        token_ids = self.store.read(TOKEN_IDS, rows.start, rows.stop)
        if not self._complete and (token_ids < 0).any():
            return None
        keep = np.arange(rows.start, rows.stop) % self.store.context_size >= self.first_positions
        if self._special:
            keep &= ~np.isin(token_ids, np.asarray(self._special, dtype=np.int64))
        return keep

    def _adopt(self, fresh: ActivationStore) -> None:
        """Read the finished store from now on (its geometry trimmed if the dataset ran out)."""
        assert isinstance(self.kept, ShardKept)
        fresh.require_complete()
        if fresh.geometry != self.kept.geometry:
            self.kept = self.kept.trimmed(fresh.geometry)
            self._blocks = None
        # `self.array` stays: its rows below the trimmed length are the same files (and a
        # subclass may have replaced it, see activations/multi_reader.py).
        self.store, self._complete = fresh, True

    def _check_stream_rows(self) -> None:
        """Once every shard is counted: every epoch must give every rank a batch."""
        rows = self._rank_rows()
        fewest = min(rows)
        if fewest < self.cfg.batch_size:
            raise StoreError(
                f"store {self.store.url!r}: streaming, rank {rows.index(fewest)} of "
                f"{self.world_size} reads shards {rows.index(fewest)}, "
                f"{rows.index(fewest) + self.world_size}, ... in its first epoch, {fewest} kept rows "
                f"of {self.hook!r}, less than batch_size={self.cfg.batch_size}; lower the batch "
                "size or use fewer ranks")
        self._check_enough_rows(StoreError)


def _exclusions(store: ActivationStore, cfg: ReaderConfig) -> tuple[int, list[int]]:
    """(first positions skipped, token ids skipped): the config's, or the store's when unset."""
    excluded = store.attrs.get("excluded", {})
    first = cfg.exclude_first_positions
    if first is None:
        first = int(excluded.get("first_positions", 0))
    if not 0 <= first < store.context_size:
        raise ValueError(f"exclude_first_positions={first} must be in [0, context_size="
                         f"{store.context_size}) of store {store.url!r}")
    special = [int(t) for t in excluded.get("token_ids", [])] if cfg.exclude_special_tokens else []
    return first, special


def _fingerprint(store: ActivationStore, stream: bool = False) -> str:
    """A short digest of what makes a store's rows: its identity, geometry and dtype. `stream`:
    without the window count, which `finalize` lowers when the dataset ran out (the identity,
    which holds max_tokens and the dataset, decides it), so a state taken while the harvest ran
    resumes on the finished store."""
    attrs = {key: store.attrs.get(key) for key in ("identity", "geometry", "store_dtype", "d")}
    if stream:
        attrs["geometry"] = {k: v for k, v in dict(attrs["geometry"] or {}).items() if k != "n_windows"}
    return hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _get(blocks: queue.Queue, thread: threading.Thread) -> Any:
    """The loader's next item; an error if the thread died without saying why."""
    while True:
        try:
            return blocks.get(timeout=_POLL_S)
        except queue.Empty:
            if not thread.is_alive() and blocks.empty():
                raise RuntimeError(f"{thread.name} stopped without a result") from None


def _drain(blocks: queue.Queue) -> None:
    """Drop queued blocks so their memory is freed and a blocked loader can notice the stop.
    (Only builtins here: this also runs while the interpreter shuts down, when module globals such
    as `queue` may already be None.)"""
    while True:
        try:
            blocks.get_nowait()
        except Exception:
            return


class _Pace:
    """How many batches the loader may hold queued: enough to cover decoding the next block twice
    over at the consumer's pace, at least 2, at most `most` (`prefetch` blocks' worth).

    The queue exists to hide the decode of the next block: while the loader decodes it, the
    consumer eats queued batches. A CPU step (~0.5 s) outlasts a block's decode (~0.3-0.6 s), so 4
    batches do (19 MB at d=576); a GPU step of 10 ms needs the whole block's worth (151 MB). Until
    both times are measured (the first block and the first consumed batch), 2."""

    def __init__(self, most: int) -> None:
        self.most = max(1, most)
        self.decode_s: float | None = None
        self.step_s: float | None = None
        self.peak = 0
        """Most batches queued at once so far."""

    def decoded(self, seconds: float) -> None:
        """A block took `seconds` to decode (the slowest recent one counts: disks stall)."""
        self.decode_s = seconds if self.decode_s is None else max(seconds, 0.5 * self.decode_s)

    def consumed(self, seconds: float) -> None:
        """The consumer spent `seconds` on a batch before asking for the next (its own work, not
        waiting for the loader); a moving average, the fastest recent steps weighing most."""
        self.step_s = seconds if self.step_s is None else min(seconds, 0.8 * self.step_s + 0.2 * seconds)

    def depth(self) -> int:
        """Batches the queue may hold now."""
        if self.decode_s is None or self.step_s is None:
            return min(2, self.most)
        wanted = 2 * self.decode_s / max(self.step_s, 1e-6) + 1
        return int(min(self.most, max(2, math.ceil(wanted))))


class _Loader:
    """The background thread's work: read blocks in schedule order and cut them into batches."""

    def __init__(self, reader: ActivationReader, epoch: int, rows: int, out: queue.Queue,
                 stop: threading.Event, pace: _Pace) -> None:
        self.reader, self.epoch, self.rows, self.out, self.stop = reader, epoch, rows, out, stop
        self.pace = pace
        self.batch_size = reader.cfg.batch_size
        n_rows = min(reader.cfg.buffer_chunks * reader.kept.chunk_rows, reader.kept.n_tokens)
        self.buffer = np.empty((0, reader.d), dtype=reader.array.dtype)  # [n_rows, d], on first use
        self.buffer_rows = n_rows
        self.pool: ThreadPoolExecutor | None = None  # concurrent run reads (remote stores)

    def run(self) -> None:
        """Put each block's batches on the queue, then `_END`; or the error that stopped it."""
        if not is_remote(self.reader.store.url):
            self._run()
            return
        with ThreadPoolExecutor(REMOTE_READS, thread_name_prefix="ActivationReader-fetch") as pool:
            self.pool = pool
            self._run()

    def _run(self) -> None:
        try:
            last = self.reader.epochs
            for epoch in itertools.count(self.epoch) if last is None else range(self.epoch, last):
                first = self.rows if epoch == self.epoch else 0
                if self.reader.cfg.stream and epoch == 0:
                    epoch_batches = self._stream_batches(first)
                else:
                    epoch_batches = self._epoch_batches(self.reader._plan(epoch, self.stop), first)
                for batches in epoch_batches:
                    self._put(batches)
            self._put(_END)
        except _Stopped:
            pass
        except BaseException as err:  # surfaces in the consumer
            with contextlib.suppress(_Stopped):
                self._put(_Failure(err))

    def _put(self, item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            with self.out.mutex:  # Queue.put compares against maxsize under this lock
                self.out.maxsize = self.pace.depth()
            try:
                self.out.put(item, timeout=_POLL_S)
                self.pace.peak = max(self.pace.peak, self.out.qsize())
                return
            except queue.Full:
                continue

    def _epoch_batches(self, plan: EpochPlan, first: int) -> Iterator[list[_Batch]]:
        """From the block holding stream row `first` on, each batch as soon as it is gathered (a
        one-batch list): the queue then holds batches, not whole blocks, so at most the decode
        buffer, `prefetch` blocks' worth of queued batches and the consumer's batch are held."""
        size = self.batch_size
        block = int(np.searchsorted(plan.starts, first, side="right")) - 1
        carry: list[tuple[np.ndarray, np.ndarray]] = []  # pieces of a batch begun in earlier blocks
        position = first
        while position < plan.usable:
            sources, rows = self._load_block(plan.epoch, block, plan.blocks[block])
            offset, end = position - int(plan.starts[block]), min(int(plan.starts[block + 1]), plan.usable)
            while position < end:
                take = min(size - sum(len(r) for _, r in carry), end - position)
                picked = sources[offset:offset + take]
                carry.append((_take_rows(self.buffer, picked), rows[offset:offset + take]))
                offset, position = offset + take, position + take
                if sum(len(r) for _, r in carry) == size:
                    after = (plan.epoch + 1, 0) if position == plan.usable else (plan.epoch, position)
                    yield [_batch(carry, after)]
                    carry = []
            block += 1

    def _stream_batches(self, first: int) -> Iterator[list[_Batch]]:
        """Epoch 0 of a streaming reader from stream row `first`: each block read once its shards
        are done; a batch handed on once every rank is known to hold at least its rows. The same
        cut as `_epoch_batches` of the finished store's `plan(0)`, whatever the timing."""
        reader, size = self.reader, self.batch_size
        carry: list[tuple[np.ndarray, np.ndarray]] = []
        carried, block, start = 0, 0, 0  # rows in carry; the block, and its first stream row
        while (chunks := self._stream_block(block)) is not None:
            end = start + int(reader.kept.per_chunk[chunks].sum())
            bound, final = reader._stream_bound()
            if final and start >= bound:
                return
            if end <= first:  # wholly before the resume point: counted, never read
                block, start = block + 1, end
                continue
            sources, rows = self._load_block(0, block, chunks)
            position = max(first, start)
            while position < end:
                take = min(size - carried, end - position)
                if carried + take == size and position + take > bound:
                    if not reader._await_rows(position + take, self.stop):
                        return  # the epoch ends before this batch
                    bound, final = reader._stream_bound()
                piece = slice(position - start, position - start + take)
                carry.append((_take_rows(self.buffer, sources[piece]), rows[piece]))
                position, carried = position + take, carried + take
                if carried == size:
                    bound, final = reader._stream_bound()
                    yield [_batch(carry, (1, 0) if final and position == bound else (0, position))]
                    carry, carried = [], 0
            block, start = block + 1, end

    def _stream_block(self, index: int) -> np.ndarray | None:
        """The chunks of this rank's epoch-0 block `index` once all its shards are done (None: it
        has no such block); follows the store's geometry if `finalize` trims it meanwhile."""
        while True:
            blocks = self.reader._stream_blocks()
            if index >= len(blocks):
                return None
            chunks = blocks[index]
            shards = np.unique(chunks // self.reader.store.geometry.chunks_per_shard).tolist()
            self.reader._await(shards, self.stop)
            if self.reader._stream_blocks() is blocks:
                return chunks

    def _load_block(self, epoch: int, index: int, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decode a block into the buffer; its kept rows, shuffled, as (buffer positions, global rows)."""
        if len(self.buffer) == 0:  # first use: paged in outside the timed decode, whose time sizes the
            # queue (faulting the demo's 151 MB took 0.35 s, a block's decode ~0.3 s: counted in, the
            # first block queued twice the batches the later ones needed)
            self.buffer = np.empty((self.buffer_rows, self.reader.d), dtype=self.buffer.dtype)
            self.buffer.fill(0)
        started = time.perf_counter()
        try:
            return self._decode_block(epoch, index, chunks)
        finally:
            self.pace.decoded(time.perf_counter() - started)

    def _decode_block(self, epoch: int, index: int, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kept, chunk_rows = self.reader.kept, self.reader.kept.chunk_rows
        sources, rows, offset = [], [], 0
        pending = []
        for first, last in _runs(chunks):
            if self.stop.is_set():
                raise _Stopped
            start, stop = first * chunk_rows, min((last + 1) * chunk_rows, kept.n_tokens)
            if self.pool is None:
                self._read_run(start, stop, offset)
            else:
                pending.append(self.pool.submit(self._read_run, start, stop, offset))
            local = np.flatnonzero(kept.mask(start, stop))  # [kept in run]
            sources.append(local + offset)
            rows.append(local + start)
            offset += stop - start
        for read in pending:
            read.result()  # the first failed run's error (a StoreError naming a damaged chunk)
        order = np.random.default_rng([self.reader.cfg.seed, epoch, self.reader.rank, index]
                                      ).permutation(sum(len(s) for s in sources))
        return np.concatenate(sources)[order], np.concatenate(rows).astype(np.int64, copy=False)[order]

    def _read_run(self, start: int, stop: int, offset: int) -> None:
        """Decode rows [start, stop) into the buffer from row `offset` on."""
        into = NDBuffer.from_numpy_array(self.buffer[offset:offset + stop - start])
        with self.reader.store.reading(self.reader.hook, start, stop):  # StoreError if damaged
            self.reader.array.get_basic_selection(slice(start, stop), out=into)


def _batch(pieces: list[tuple[np.ndarray, np.ndarray]], position: tuple[int, int]) -> _Batch:
    """A batch from its pieces (one, or two when it spans blocks), tagged with the next position."""
    if len(pieces) == 1:
        activations, rows = pieces[0]
    else:
        parts = [a for a, _ in pieces]
        activations = _mapped_empty((sum(len(a) for a in parts), parts[0].shape[1]), parts[0].dtype)
        np.concatenate(parts, out=activations)
        rows = np.concatenate([r for _, r in pieces])
    return _Batch(activations, rows, position)


def _take_rows(buffer: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """buffer[picked] [len(picked), d], in memory of its own (`_mapped_empty`)."""
    rows = _mapped_empty((len(picked), buffer.shape[1]), buffer.dtype)
    np.take(buffer, picked, axis=0, out=rows, mode="clip")  # (in range: positions in the buffer)
    return rows


def _mapped_empty(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array in an anonymous memory mapping of its own (from MAPPED_BATCH_BYTES
    up; smaller ones from malloc, whose heap reuses them), unmapped when the array
    (and any tensor sharing it) is freed. A batch is made in the loading thread and freed in the
    consumer's; from malloc, glibc kept the consumed batches (4.7 MB each on the demo) in the heap
    that the training loop keeps untrimmed for its own temporaries (sae/heap.py) until the next
    trim: the demo training's RSS fell by ~250 MB at each trim, ~60 MB with mapped batches."""
    count = int(np.prod(shape))
    size = count * np.dtype(dtype).itemsize
    if size < MAPPED_BATCH_BYTES or not hasattr(mmap, "MAP_PRIVATE"):  # (Windows' mmap takes no flags)
        return np.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(region, dtype=dtype, count=count).reshape(shape)


def _runs(chunks: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first, last) chunk of each run of adjacent ascending chunks, at most MAX_RUN_CHUNKS long."""
    first = prev = int(chunks[0])
    for chunk in map(int, chunks[1:]):
        if chunk != prev + 1 or chunk - first >= MAX_RUN_CHUNKS:
            yield first, prev
            first = chunk
        prev = chunk
    yield first, prev
