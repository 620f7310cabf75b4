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
import queue
import threading
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
from saeworks.activations.store import TOKEN_IDS, ActivationStore, StoreError, to_tensor

STATE_VERSION = 1
MAX_RUN_CHUNKS = 4
"""Adjacent chunks read in one Zarr call. More is slower: a call covering a whole shard makes Zarr
read the shard file in one piece (measured ~0.6x the per-chunk rate for 16-chunk shards)."""
REMOTE_READS = 8
"""Runs of a block read at once from a remote store (`s3://`): a run costs an index request and a
ranged request per chunk, and one after another the reader would wait out every round trip (see
benchmarks/reader_s3.py --remote-reads). Local stores read runs one by one."""
_KEPT_SCAN_ROWS = 1 << 22  # token ids read per step when counting kept rows
_POLL_S = 0.1  # how often a blocked thread checks whether the other side is gone


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
    invalidates the previous iterator.
    """

    def __init__(self, store: ActivationStore, hook: str, cfg: ReaderConfig, rank: int = 0,
                 world_size: int = 1, epochs: int | None = None) -> None:
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
        self.first_positions, special = _exclusions(store, cfg)
        self.kept = KeptRows.count(store, self.first_positions, special)
        self._check_enough_rows()
        self._fingerprint = _fingerprint(store)
        self._epoch, self._rows, self._generation = 0, 0, 0

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
        """This rank's blocks of `epoch` and the rows every rank yields in it."""
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n_chunks)
        kept_by_rank = [int(self.kept.per_chunk[order[r::self.world_size]].sum())
                        for r in range(self.world_size)]
        mine = order[self.rank::self.world_size]
        size = self.cfg.buffer_chunks
        blocks = [np.sort(mine[i:i + size]) for i in range(0, len(mine), size)]
        block_rows = [int(self.kept.per_chunk[block].sum()) for block in blocks]
        starts = np.concatenate([[0], np.cumsum(block_rows, dtype=np.int64)]).astype(np.int64)
        usable = min(kept_by_rank) // self.cfg.batch_size * self.cfg.batch_size
        return EpochPlan(epoch, blocks, starts, usable)

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches every rank yields in `epoch` (the same on all ranks)."""
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
                             "world size, batch size, buffer_chunks and exclusions")
        epoch, rows = int(state["epoch"]), int(state["rows_in_epoch"])
        usable = self.plan(epoch).usable if epoch >= 0 else 0
        if epoch < 0 or rows < 0 or rows > usable or rows % self.cfg.batch_size:
            raise ValueError(f"reader state position (epoch {epoch}, row {rows}) is not a batch "
                             f"boundary of that epoch (it has {usable} rows)")
        self._epoch, self._rows = (epoch + 1, 0) if rows == usable else (epoch, rows)
        self._generation += 1

    def __iter__(self) -> Iterator[ReaderBatch]:
        self._generation += 1
        return self._stream(self._generation)

    def _stream(self, generation: int) -> Iterator[ReaderBatch]:
        """Start the loading thread, hand its batches on, stop it when the consumer stops."""
        if self.epochs is not None and self._epoch >= self.epochs:
            return
        blocks: queue.Queue = queue.Queue(maxsize=self.cfg.prefetch)
        stop = threading.Event()
        loader = _Loader(self, self._epoch, self._rows, blocks, stop)
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
                    yield ReaderBatch(to_tensor(batch.activations, self.store.store_dtype),
                                      torch.from_numpy(batch.rows))
        finally:
            stop.set()
            _drain(blocks)

    def _identity(self) -> dict[str, Any]:
        """What decides the batch sequence: a state resumes only a reader with the same."""
        return {"store": self._fingerprint, "hook": self.hook, "seed": self.cfg.seed,
                "world_size": self.world_size, "batch_size": self.cfg.batch_size,
                "buffer_chunks": self.cfg.buffer_chunks, "exclude_first_positions": self.first_positions,
                "exclude_special_tokens": self.cfg.exclude_special_tokens, "kept_rows": self.kept.total}

    def _check_enough_rows(self) -> None:
        """Refuse a schedule in which some epoch could give a rank less than one batch."""
        per_rank = self.n_chunks // self.world_size
        smallest = int(np.sort(self.kept.per_chunk)[:per_rank].sum())
        if smallest < self.cfg.batch_size:
            raise ValueError(
                f"store {self.store.url!r} has {self.kept.total} kept rows of {self.hook!r} in "
                f"{self.n_chunks} chunks; split over {self.world_size} ranks, a rank may get only "
                f"{smallest} in an epoch, less than batch_size={self.cfg.batch_size}; lower the "
                "batch size or use fewer ranks")


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


def _fingerprint(store: ActivationStore) -> str:
    """A short digest of what makes a store's rows: its identity, geometry and dtype."""
    attrs = {key: store.attrs.get(key) for key in ("identity", "geometry", "store_dtype", "d")}
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


class _Loader:
    """The background thread's work: read blocks in schedule order and cut them into batches."""

    def __init__(self, reader: ActivationReader, epoch: int, rows: int, out: queue.Queue,
                 stop: threading.Event) -> None:
        self.reader, self.epoch, self.rows, self.out, self.stop = reader, epoch, rows, out, stop
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
                for batches in self._epoch_batches(self.reader.plan(epoch), first):
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
            try:
                self.out.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _epoch_batches(self, plan: EpochPlan, first: int) -> Iterator[list[_Batch]]:
        """Per block from the one holding stream row `first`: the batches that end in it."""
        size = self.batch_size
        block = int(np.searchsorted(plan.starts, first, side="right")) - 1
        carry: list[tuple[np.ndarray, np.ndarray]] = []  # pieces of a batch begun in earlier blocks
        position = first
        while position < plan.usable:
            sources, rows = self._load_block(plan.epoch, block, plan.blocks[block])
            offset, end = position - int(plan.starts[block]), min(int(plan.starts[block + 1]), plan.usable)
            batches: list[_Batch] = []
            while position < end:
                take = min(size - sum(len(r) for _, r in carry), end - position)
                picked = sources[offset:offset + take]
                carry.append((np.take(self.buffer, picked, axis=0), rows[offset:offset + take]))
                offset, position = offset + take, position + take
                if sum(len(r) for _, r in carry) == size:
                    batches.append(_batch(carry, plan, position))
                    carry = []
            yield batches
            block += 1

    def _load_block(self, epoch: int, index: int, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decode a block into the buffer; its kept rows, shuffled, as (buffer positions, global rows)."""
        if len(self.buffer) == 0:
            self.buffer = np.empty((self.buffer_rows, self.reader.d), dtype=self.buffer.dtype)
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


def _batch(pieces: list[tuple[np.ndarray, np.ndarray]], plan: EpochPlan, end: int) -> _Batch:
    """A batch from its pieces (one, or two when it spans blocks), tagged with the next position."""
    if len(pieces) == 1:
        activations, rows = pieces[0]
    else:
        activations = np.concatenate([a for a, _ in pieces])
        rows = np.concatenate([r for _, r in pieces])
    position = (plan.epoch + 1, 0) if end == plan.usable else (plan.epoch, end)
    return _Batch(activations, rows, position)


def _runs(chunks: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first, last) chunk of each run of adjacent ascending chunks, at most MAX_RUN_CHUNKS long."""
    first = prev = int(chunks[0])
    for chunk in map(int, chunks[1:]):
        if chunk != prev + 1 or chunk - first >= MAX_RUN_CHUNKS:
            yield first, prev
            first = chunk
        prev = chunk
    yield first, prev
