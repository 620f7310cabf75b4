"""The streaming feature analysis: per-latent statistics and contexts of one SAE over a store.

Two passes over the same rows, in store order, in batches of whole windows:

1. count, sum and max of every latent, and its top-N activating rows;
2. (max now known) a fine histogram of every latent over (0, max], from which the output histogram
   and the quantiles come, and uniform samples from each activation band below the top.

Pass 2 reuses pass 1's encoding: the non-zero (row, latent, value) entries of pass 1 are held,
12 bytes each (8 for a TopK SAE's), up to `replay_bytes` (default 1 GiB: ~2.7M tokens at L0 32,
~4.0M for TopK k 32), and only the batches after those are read and encoded again. So a store that
fits is encoded once, a larger one at most twice, and memory stays bounded whatever the number of
tokens.

Batches hold whole windows and every window's rows are encoded, excluded ones too (positions before
the store's `first_positions`, special tokens: they are not analysed, but they do appear in
contexts, with the activation the SAE gives them). So the context of any row lies in the batch
that holds the row: a band sample takes its context when it enters its table, a top-N row when
pass 2 reaches its batch (most rows that enter the top-N early drop out again), and no third pass
is needed. A batch is `batch_size // context_size` windows (at least one).

Memory: the tables below, O(d_sae x slots); one batch ([batch, d_sae] inside `sae.encode`, then
only its non-zero entries); the bounded replay. Nothing is ever [n_tokens, d_sae]. All per-batch
work is batched over the batch's non-zero entries; no Python loop runs per latent. On a CPU the
per-entry bookkeeping (counters, histogram, table candidates and merges, contexts) runs as native
kernels (eval/native_analysis.py), the same result bit for bit as the torch ops used elsewhere.
On a GPU those torch ops keep to fixed shapes (every entry masked rather than compacted, every
table slot considered; `waits_for_nothing`), so that the host never waits for the device: it reads
the next batches in threads and queues their work while the device runs the current one's.

Tables (`SlotTable`) keep, per group, the entries with the smallest keys: top-N uses the negated
activation (ties: the earlier row wins), bands use a seed-free hash of (row, latent), i.e. priority
sampling, so band samples are a uniform sample without replacement of the band's rows outside the
top-N. Both are exact functions of the data: the result does not depend on the batch size.

Histogram resolution: each latent's (0, max] is cut into `SUB_BINS` x histogram_bins equal
sub-bins (summed down for the output histogram); quantiles interpolate torch.quantile's linear
rule within them and are within max / (SUB_BINS x histogram_bins) of the exact value.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from saeworks.activations.rows import RowSelection
from saeworks.activations.store import TOKEN_IDS, ActivationStore, StoreError, to_tensor
from saeworks.eval.config import AnalyzeConfig
from saeworks.eval.features import Contexts, FeatureAnalysis
from saeworks.eval.logit_effects import LogitEffects, decoder_neighbours, model_logit_effects
from saeworks.eval.native_analysis import Entries, band_candidates, slot_offer, top_stats
from saeworks.sae import native_sparse
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.sparse import release_workspace
from saeworks.sae.topk import encodes_top_k

SUB_BINS = 8
"""Fine histogram sub-bins per output bin: the quantiles' resolution is max / (SUB_BINS x bins)."""
EMPTY_KEY = 1 << 32
"""Key of an empty table slot: larger than every real key (real keys are below 2^32)."""
_KEY_BITS = 33
_MASK32 = 0xFFFFFFFF
_FLOAT_KEY_BASE = 0x7FFFFFFF
_PAIR_BASE = 1 << 40
"""latent * _PAIR_BASE + store row: one int64 per (latent, row) for stores of up to 2^40 rows."""
_CONTEXT_QUERIES = 1 << 20
"""Context look-ups done at once on a CPU (bounds the temporaries of a large first batch)."""
_DEVICE_CONTEXT_QUERIES = 1 << 22
"""Context look-ups done at once off the CPU, where each chunk is a dozen kernel launches
(temporaries ~250 MB) and the fixed-shape context fills ask for every slot of a table (demo SAE:
184,320 x 33 look-ups each)."""


class WindowBatch(NamedTuple):
    """Consecutive whole windows of a store, every row (kept or not)."""

    start: int
    """Store row of the first row (a window boundary)."""
    x: torch.Tensor
    """[rows, d] activations as the store holds them (float16, bfloat16 or float32): `encode_batch`
    widens them to float32 on the device, in the thread that encodes."""
    tokens: torch.Tensor
    """[rows] int64 token ids."""
    keep: torch.Tensor
    """[rows] bool: rows analysed (not excluded, within max_rows)."""
    kept_rows: int
    """keep's count, known on the host (asking a GPU for it would wait for the device)."""

    def to(self, device: torch.device, non_blocking: bool = False) -> WindowBatch:
        return self._replace(x=self.x.to(device, non_blocking=non_blocking),
                             tokens=self.tokens.to(device, non_blocking=non_blocking),
                             keep=self.keep.to(device, non_blocking=non_blocking))

    def pinned(self) -> WindowBatch:
        """In page-locked host memory, so that `to(gpu, non_blocking=True)` does not wait."""
        return self._replace(x=self.x.pin_memory(), tokens=self.tokens.pin_memory(),
                             keep=self.keep.pin_memory())


def window_batches(store: ActivationStore, hook: str, selection: RowSelection, windows_per_batch: int,
                   first_window: int = 0, kept_before: int = 0, rows: bool = True) -> Iterator[WindowBatch]:
    """Batches of `windows_per_batch` whole windows in store order, until `selection.max_rows` kept
    rows. Kept rows are those `activations.rows.iter_kept_rows` yields. The last batch ends with the
    window that holds the last kept row wanted (its token ids are read first): no window is read or
    encoded for nothing. `first_window`, `kept_before`: resume after the batches that held that many
    kept rows. `rows=False`: the batches' activations are not read (x is empty), for `read_rows`
    (one batch, in any thread) or `read_rows_together` (several a call) to read."""
    store.require_complete()
    if hook not in store.hooks:
        raise StoreError(f"store {store.url!r} has no hook {hook!r}; it holds {', '.join(store.hooks)}")
    context, n_windows = store.context_size, store.n_tokens // store.context_size
    special = torch.tensor(selection.special_token_ids, dtype=torch.int64)
    limit = selection.max_rows if selection.max_rows is not None else store.n_tokens
    shard_rows = store.geometry.shard_rows
    held_start, held_ids = 0, torch.empty(0, dtype=torch.int64)  # the last token ids read

    def token_ids(start: int, stop: int) -> torch.Tensor:
        """[stop - start] int64 token ids of rows [start, stop), read up to the end of the shard that
        holds `start`: one read of 16 KB per batch cost 2.8 ms (zarr's per-call overhead), a fifth
        of a batch's read (demo store, 4,096 rows)."""
        nonlocal held_start, held_ids
        if not (held_start <= start and stop <= held_start + held_ids.shape[0]):
            end = max(stop, min((start // shard_rows + 1) * shard_rows, store.n_tokens))
            held_start, held_ids = start, torch.from_numpy(store.read(TOKEN_IDS, start, end).astype(np.int64))
        return held_ids[start - held_start: stop - held_start]

    def read(first_window: int, kept: int) -> tuple[WindowBatch, int]:
        """The batch at `first_window` after `kept` kept rows, and the kept rows after it."""
        start = first_window * context
        stop = min(first_window + windows_per_batch, n_windows) * context
        tokens = token_ids(start, stop)
        positions = torch.arange(stop - start) % context
        keep = (positions >= selection.first_positions) & ~torch.isin(tokens, special)
        keep &= keep.cumsum(0) <= limit - kept
        kept_rows = int(keep.sum())
        if kept + kept_rows >= limit and kept_rows:  # the last batch: up to the window of its last kept row
            stop = start + (int(torch.nonzero(keep)[-1]) // context + 1) * context
            tokens, keep = tokens[: stop - start], keep[: stop - start]
        x = to_tensor(store.read(hook, start, stop), store.store_dtype) if rows else torch.empty(0)
        return WindowBatch(start, x, tokens, keep, kept_rows), kept + kept_rows  # x widened by encode_batch

    window, kept = first_window, kept_before
    while kept < limit and window < n_windows:
        batch, kept = read(window, kept)
        window = (batch.start + batch.tokens.shape[0]) // context
        yield batch


def read_rows(store: ActivationStore, hook: str, batch: WindowBatch) -> WindowBatch:
    """`batch` (from `window_batches(..., rows=False)`) with its activations read."""
    stop = batch.start + batch.tokens.shape[0]
    return batch._replace(x=to_tensor(store.read(hook, batch.start, stop), store.store_dtype))


READ_TOGETHER = 2
"""Consecutive batches whose rows a CPU analysis reads in one call."""


def read_rows_together(store: ActivationStore, hook: str, batches: Iterator[WindowBatch],
                       together: int = READ_TOGETHER) -> Iterator[WindowBatch]:
    """`batches` (from `window_batches(..., rows=False)`, consecutive) with their activations, read
    `together` batches at a time in one call: Zarr decodes the chunks of one call on all cores
    (demo store, 4,096-row chunks, 2 cores: 7.3 ms a chunk read one a call, 5.2 two a call), and
    the caller waits for every other batch only (an analysis on 2 CPU threads waited 0.56 s of
    5.2 s for reads one batch a call, reading after each encode as `encoded_reading_ahead` does)."""
    while group := list(itertools.islice(batches, together)):
        start, stop = group[0].start, group[-1].start + group[-1].tokens.shape[0]
        x = to_tensor(store.read(hook, start, stop), store.store_dtype)  # [stop - start, d]
        for batch in group:
            yield batch._replace(x=x[batch.start - start: batch.start - start + batch.tokens.shape[0]])


class EncodedBatch:
    """A window batch's SAE activations as their non-zero entries, sorted by (row, latent)."""

    def __init__(self, batch: WindowBatch, local: torch.Tensor, features: torch.Tensor,
                 values: torch.Tensor, d_sae: int, context_size: int, per_row: int = 0) -> None:
        self.batch = batch
        self.local = local.long()
        """[nnz] int64: row within the batch."""
        self.per_row = per_row
        """k where every row has exactly k entries (local is each row's index k times), else 0."""
        self.features = features.long()
        """[nnz] int64: latent."""
        self.values = values
        """[nnz] float32 activation, > 0 on a CPU; off it a TopK row's inactive entries stay, as zeros
        (dropping them would make the host wait for the device), and the bookkeeping skips them."""
        self.d_sae, self.context_size = d_sae, context_size
        self._row_start: torch.Tensor | None = None  # [rows + 1] each row's first entry, when needed
        self._keys: torch.Tensor | None = None  # [nnz] row * d_sae + latent, for the torch lookup

    @property
    def kept(self) -> torch.Tensor:
        """[nnz] bool: entries on analysed rows."""
        return self.batch.keep[self.local]

    @property
    def analysed(self) -> torch.Tensor:
        """[nnz] bool: active entries (> 0) on analysed rows."""
        return self.kept & (self.values > 0)

    @property
    def entries(self) -> Entries:
        """The entries and the batch's analysed rows, for the native bookkeeping."""
        return Entries(self.local, self.features, self.values, self.batch.keep)

    @property
    def row_start(self) -> torch.Tensor:
        """[rows + 1] int64: row r's entries are [row_start[r], row_start[r + 1])."""
        if self._row_start is None:
            rows = self.batch.tokens.shape[0]
            self._row_start = torch.zeros(rows + 1, dtype=torch.int64, device=self.local.device)
            torch.cumsum(torch.bincount(self.local, minlength=rows), 0, out=self._row_start[1:])
        return self._row_start

    def lookup(self, local: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Activations at (row within batch, latent) pairs of any shape (0 where inactive).

        On a CPU a native binary search within each row's entries (sae/kernels/sparse_lookup.c):
        the search over all of the batch's entries was analysis' largest cost after the encoder
        (searchsorted 1.1 s and its gathers 0.8 s of 23 s, demo SAE, 131,072 tokens)."""
        if self.values.numel() == 0:
            return torch.zeros(local.shape, device=local.device)
        if not waits_for_nothing(self.values.device):  # row_start would wait for the device
            found = native_sparse.sparse_lookup(self.row_start, self.features, self.values, local, features)
            if found is not None:
                return found
        if self._keys is None:
            self._keys = self.local * self.d_sae + self.features  # [nnz] ascending
        keys = self._keys
        wanted = local * self.d_sae + features
        at = torch.searchsorted(keys, wanted).clamp_(max=keys.numel() - 1)
        return torch.where(keys[at] == wanted, self.values[at], 0.0)

    def contexts(self, local: torch.Tensor, features: torch.Tensor, before: int, after: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [n, C] int32 (-1 outside the window) and latent activations [n, C] float32 (0 outside)
        at offsets -before..after of each (row, latent), within the row's window. On a CPU one native
        pass (sae/kernels/sparse_lookup.c; ~a dozen [n, C] torch ops were 0.8-1.8 s of an analysis
        of 131,072 tokens, most in its first batches, where most candidates enter the tables)."""
        if not waits_for_nothing(self.values.device):  # row_start would wait for the device
            native = native_sparse.sparse_window_lookup(self.row_start, self.features, self.values,
                                                        self.batch.tokens, local, features, self.context_size,
                                                        before, after)
            if native is not None:
                return native
        offsets = torch.arange(-before, after + 1, device=local.device)  # [C]
        tokens = torch.empty(local.shape[0], offsets.shape[0], dtype=torch.int32, device=local.device)
        acts = torch.empty(tokens.shape, device=local.device)
        queries = _CONTEXT_QUERIES if local.device.type == "cpu" else _DEVICE_CONTEXT_QUERIES
        step = max(1, queries // offsets.shape[0])
        for lo in range(0, local.shape[0], step):
            rows, feats = local[lo:lo + step], features[lo:lo + step]
            position = (rows % self.context_size)[:, None] + offsets  # [n, C], batches start at windows
            inside = (position >= 0) & (position < self.context_size)
            target = torch.where(inside, rows[:, None] + offsets, 0)
            tokens[lo:lo + step] = torch.where(inside, self.batch.tokens[target], -1).int()
            found = self.lookup(target, feats[:, None].expand_as(target))
            acts[lo:lo + step] = torch.where(inside, found, 0.0)
        return tokens, acts


@torch.no_grad()
def encode_batch(sae: SparseAutoencoder, batch: WindowBatch, context_size: int) -> EncodedBatch:
    """Encode every row of the batch and keep the non-zero entries.

    A TopK SAE (with its own `encode`) skips the dense [rows, d_sae] result: the entries come
    straight from the same top-k of the same pre-activations, so the values are identical. Its
    pre-activations go into the buffer training reuses (sae/sparse.py): a fresh [rows, d_sae]
    output each batch cost page faults (pre-activations 533 ms against a 340 ms bare matmul per
    4,096 rows, 2 threads).

    The rows are widened to float32 here, not where they are read: on a CPU, a torch op large enough
    to run in parallel, called from the reading thread, starts a second OpenMP team whose threads
    spin after it beside the matmul's (reading 4,096 float16 rows of the demo store: 9.5 ms of CPU;
    18 ms with the widening in that thread, which alone takes 1.2 ms on one thread)."""
    x = batch.x.float()  # [B, d_in]
    if encodes_top_k(sae):
        values, indices = sae.encode_active(x)  # [B, k], each row by ascending latent
        local = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(values)
        active = values > 0
        if waits_for_nothing(x.device) or bool(active.all()):  # the usual case on a CPU (no
            # compaction: 2.7 ms a batch of 4,096 x 32 entries); off it zeros stay (`EncodedBatch.values`)
            return EncodedBatch(batch, local.reshape(-1), indices.reshape(-1), values.reshape(-1).float(),
                                sae.d_sae, context_size, per_row=values.shape[1])
        local, features, values = local[active], indices[active], values[active]
    else:
        acts = sae.encode(x)  # [B, d_sae]
        local, features = acts.nonzero(as_tuple=True)
        values = acts[local, features]
        del acts
        if not waits_for_nothing(x.device):  # (off the CPU the bookkeeping masks what is not > 0)
            active = values > 0
            local, features, values = local[active], features[active], values[active]
    return EncodedBatch(batch, local, features, values.float(), sae.d_sae, context_size)


def encoded_reading_ahead(sae: SparseAutoencoder, batches: Iterator[WindowBatch], device: torch.device,
                          context_size: int) -> Iterator[EncodedBatch]:
    """Each batch encoded (`encode_batch`), the next one read in a thread while the caller uses
    this one. The read starts after the encode, not beside it: on a CPU a reading thread takes its
    time from the matmul's threads, which split the work statically (an analysis pass measured 81
    matmul-times for 66 batches with the read beside the encode, 76 with it in line, 3 rounds,
    2 threads), while the caller's bookkeeping runs on one thread and leaves a core to the read.
    The bookkeeping is shorter than a read, though: `read_rows_together` reads two batches a call
    (262,144 tokens of the demo on 2 threads, the refined selection's encodes: 5.17 -> 4.67 s, the
    median of 3 interleaved rounds; float32 encodes 10.58 -> 10.56 s)."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(next, batches, None)
        while (batch := pending.result()) is not None:
            encoded = encode_batch(sae, batch.to(device), context_size)
            pending = pool.submit(next, batches, None)
            yield encoded


READ_AHEAD_BYTES = 1 << 30
"""Most page-locked bytes of rows read ahead of a device analysis."""


def device_readers(batch_bytes: int) -> int:
    """Threads that read a device analysis' batches of `batch_bytes` (as many batches ahead): all
    but one of the host's cores, at most 8 and READ_AHEAD_BYTES (zarr's decompressors release the
    GIL: 4,096 demo rows took 7.5-12 ms on one thread, 6.5 ms a batch with two threads on two cores)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1, READ_AHEAD_BYTES // max(batch_bytes, 1)))


def encoded_on_device(sae: SparseAutoencoder, store: ActivationStore, hook: str,
                      batches: Iterator[WindowBatch], device: torch.device, context_size: int,
                      readers: int) -> Iterator[EncodedBatch]:
    """`encoded_reading_ahead` off the CPU: `readers` threads read the batches' rows (`batches` from
    `window_batches(..., rows=False)`) into page-locked memory, `readers` batches ahead, and each
    is encoded on `device` after a non-blocking copy. Nothing here or in the bookkeeping after waits
    for the device (see `waits_for_nothing`), so the host queues the next batch's work while the
    device runs this one's, and the reads overlap both. (With the tables on a GPU updated by torch
    ops that counted, compacted and sorted through the host, an H200 measured 0.03-0.10 of its
    matmul limit: ~21 synchronisations and ~287 launches a batch, CPU and GPU never overlapping.)"""
    pin = device.type == "cuda"

    def read(batch: WindowBatch) -> WindowBatch:
        batch = read_rows(store, hook, batch)
        return batch.pinned() if pin else batch

    with ThreadPoolExecutor(readers) as pool:
        ahead: deque[Future[WindowBatch]] = deque()
        for batch in batches:
            ahead.append(pool.submit(read, batch))
            if len(ahead) > readers:
                yield encode_batch(sae, ahead.popleft().result().to(device, non_blocking=pin), context_size)
        while ahead:
            yield encode_batch(sae, ahead.popleft().result().to(device, non_blocking=pin), context_size)


def waits_for_nothing(device: torch.device) -> bool:
    """Whether the bookkeeping on `device` keeps to fixed-shape torch ops (no counts, compactions or
    values read back by the host: each would wait for the device). Off the CPU, always; on it the
    native kernels (or, without them, torch ops that may read back) are faster. Tests patch this
    to run the fixed-shape formulation on a CPU."""
    return device.type != "cpu"


class Replay:
    """Pass 1's encoded batches, held compactly (int32 indices, no input rows) up to `budget` bytes,
    so that pass 2 re-encodes only the batches after them: one encode pass when all fit. A batch
    with the same number of entries on every row (a TopK SAE's, all active) is held without its
    rows, 8 bytes an entry instead of 12: its rows are rebuilt when it is replayed."""

    def __init__(self, budget: int, d_sae: int, context_size: int) -> None:
        self.budget, self.bytes, self.d_sae, self.context_size = budget, 0, d_sae, context_size
        self.held: deque[tuple[WindowBatch, torch.Tensor | None, torch.Tensor, torch.Tensor, int]] = deque()
        self.complete = True
        """Every batch offered so far is held."""
        self.next_window = self.kept = 0
        """Where reading resumes after the held batches, and the kept rows they hold."""

    def hold(self, encoded: EncodedBatch) -> None:
        batch = encoded.batch
        size = encoded.values.numel() * (8 if encoded.per_row else 12) + batch.tokens.numel() * 9
        if not self.complete or self.bytes + size > self.budget:
            self.complete = False
            return
        local = None if encoded.per_row else encoded.local.int()
        self.held.append((batch._replace(x=batch.x.new_empty(0)), local, encoded.features.int(),
                          encoded.values, encoded.per_row))
        self.bytes += size
        self.next_window = (batch.start + batch.tokens.shape[0]) // self.context_size
        self.kept += batch.kept_rows

    def replay(self) -> Iterator[EncodedBatch]:
        """The held batches in order, each released as it is handed out."""
        while self.held:
            batch, local, features, values, per_row = self.held.popleft()
            if local is None:
                rows = batch.tokens.shape[0]
                local = torch.arange(rows, device=values.device)[:, None].expand(rows, per_row).reshape(-1)
            yield EncodedBatch(batch, local, features, values, self.d_sae, self.context_size, per_row)


def sample_keys(rows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """[n] int64 in [0, 2^32): a seed-free pseudo-random key per (store row, latent), the same on
    every device (murmur3's 32-bit finaliser in exact int64 arithmetic). Distinct within a latent
    for rows below 2^32."""
    key = _fmix32(_mul32(features & _MASK32, 0x9E3779B1) ^ (rows & _MASK32))
    return _fmix32(key ^ ((rows >> 32) & _MASK32))


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for a in [0, 2^32), without int64 overflow."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def descending_keys(values: torch.Tensor) -> torch.Tensor:
    """[n] int64 in [0, 2^31): smaller for larger positive float32 values (their bits are monotone)."""
    return _FLOAT_KEY_BASE - values.contiguous().view(torch.int32).long()


ContextFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Candidate indices [n] -> their context tokens [n, C] and activations [n, C]."""


class SlotTable:
    """Per group, the `slots` entries with the smallest keys seen so far, with their contexts.

    Ties go to the earlier row (entries are offered in store-row order: the one offered first).
    Empty slots have key EMPTY_KEY, row -1, value 0 and zero context. A group's slots are kept
    in no order: an entry that gets in takes the slot of one that drops out, so an offer writes only
    the entries that get in (moving every affected group's [slots, context] rows instead cost most
    of the per-batch bookkeeping on the demo SAE); `contexts` sorts them by (key, row).
    """

    def __init__(self, groups: int, slots: int, width: int, device: torch.device) -> None:
        self.slots = slots
        self.keys = torch.full((groups, slots), EMPTY_KEY, dtype=torch.int64, device=device)
        self.values = torch.zeros(groups, slots, device=device)
        self.rows = torch.full((groups, slots), -1, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(groups, slots, width, dtype=torch.int32, device=device)
        self.context = torch.zeros(groups, slots, width, device=device)
        self.worst_keys = torch.full((groups,), EMPTY_KEY, dtype=torch.int64, device=device)
        """[groups] the largest key in each group's slots."""
        self._owner: torch.Tensor | None = None
        """[groups, slots] all -1: the native merge's scratch, allocated at its first use."""
        self._native = self.keys.device.type == "cpu"
        """Whether to try the native merge (until it does not apply)."""
        self._by_row: tuple[torch.Tensor, torch.Tensor] | None = None
        """fill_contexts: the slots' rows ascending, and their flat (group, slot) indices."""
        self._batch_slots: tuple[int, int, list[int]] = (1, -1, [])
        """fill_contexts: a batch size, the last row held, and where each batch of that size starts
        in `_by_row`."""

    def state(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "rows": self.rows, "tokens": self.tokens,
                "context": self.context}

    def worst(self, groups: torch.Tensor) -> torch.Tensor:
        """[n] the key a candidate of each group must beat."""
        return self.worst_keys[groups]

    def offer(self, groups: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
              context_of: ContextFn | None) -> None:
        """Merge candidates into their groups' slots: per group the `slots` smallest (key, row) pairs
        stay (an entry with key EMPTY_KEY never gets in). `context_of` (None: the contexts are
        filled in later, `fill_contexts`) is asked for the candidates that get in; where nothing
        may wait for the device (`waits_for_nothing`), for `slots` places of every group at once,
        whatever gets in (placeholders: candidate 0), and only those that get in are kept.

        Off the native merge, in fixed shapes: each group's best `slots` candidates are set beside
        its slots, a stable sort of each group's 2 x slots entries decides, and the j-th candidate
        that gets in takes the j-th slot that is freed, so no other slot is written."""
        if groups.numel() == 0:
            return
        if self._offer_native(groups, keys, values, rows, context_of):
            return
        n_groups, slots = self.keys.shape
        device = groups.device
        candidate = self._best_candidates(groups, keys, rows)  # [groups, slots] candidate index, -1: none
        has, some = candidate >= 0, candidate.clamp(min=0)
        # beside each group's slots; the `slots` smallest (key, row) pairs of the two stay
        all_keys = torch.cat([self.keys, torch.where(has, keys[some], EMPTY_KEY)], 1)  # [groups, 2 slots]
        all_rows = torch.cat([self.rows, torch.where(has, rows[some], -1)], 1)
        by_row = all_rows.argsort(dim=1, stable=True)
        stay = by_row.gather(1, all_keys.gather(1, by_row).argsort(dim=1, stable=True))[:, :slots]
        # the j-th candidate that gets in takes the j-th slot that is freed (no other slot moves)
        staying = torch.zeros(n_groups, 2 * slots, dtype=torch.uint8, device=device).scatter_(1, stay, 1)
        freed = staying[:, :slots].argsort(dim=1, stable=True)  # [groups, slots] freed slots first
        getting_in = staying[:, slots:]  # [groups, slots] 1 where that candidate place stays
        entering = candidate.gather(1, (1 - getting_in).argsort(dim=1, stable=True))  # those first
        write = torch.arange(slots, device=device) < getting_in.sum(1, keepdim=True)  # [groups, slots]
        entering = entering.clamp(min=0)
        for table, new in ((self.keys, keys), (self.rows, rows), (self.values, values)):
            table.scatter_(1, freed, torch.where(write, new[entering], table.gather(1, freed)))
        if context_of is not None:
            self._write_contexts(context_of, entering, freed, write)
        torch.amax(self.keys, dim=1, out=self.worst_keys)

    def _best_candidates(self, groups: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[groups, slots] each group's best candidates by (key, row), as indices into the
        candidates; -1 where a group has fewer that could get in (a key above the group's worst
        cannot; an equal key may still win by an earlier row)."""
        n_groups, slots = self.keys.shape
        group = torch.where((keys <= self.worst_keys[groups]) & (keys < EMPTY_KEY), groups, n_groups)
        by_row = rows.argsort(stable=True)
        order = by_row[((group[by_row] << _KEY_BITS) | keys[by_row]).argsort(stable=True)]  # [n]
        sorted_group = group[order]  # those that cannot get in last, as group n_groups
        first_of_group = torch.searchsorted(sorted_group, sorted_group)
        rank = torch.arange(order.shape[0], device=keys.device) - first_of_group
        place = torch.where((rank < slots) & (sorted_group < n_groups), sorted_group * slots + rank,
                            n_groups * slots)  # the others in a last place, dropped
        candidate = torch.full((n_groups * slots + 1,), -1, dtype=torch.int64, device=keys.device)
        candidate.scatter_(0, place, order)
        return candidate[:-1].view(n_groups, slots)

    def _write_contexts(self, context_of: ContextFn, entering: torch.Tensor, freed: torch.Tensor,
                        write: torch.Tensor) -> None:
        """The contexts of the candidates `entering` [groups, slots] into slots `freed` [groups,
        slots] where `write` [groups, slots]."""
        width = self.tokens.shape[2]
        if waits_for_nothing(write.device):  # every (group, j) asked at once: fixed shapes
            tokens, context = context_of(entering.view(-1))  # [groups * slots, width]
            per_slot = freed[:, :, None].expand(-1, -1, width)
            for table, new in ((self.tokens, tokens), (self.context, context)):
                old = table.gather(1, per_slot)
                table.scatter_(1, per_slot, torch.where(write[:, :, None], new.view(old.shape), old))
            return
        flat = torch.nonzero(write.view(-1)).squeeze(1)  # on a CPU, only the candidates that get in
        slot = torch.div(flat, self.slots, rounding_mode="floor") * self.slots + freed.view(-1)[flat]
        self.tokens.view(-1, width)[slot], self.context.view(-1, width)[slot] = \
            context_of(entering.view(-1)[flat])

    def _offer_native(self, groups: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      rows: torch.Tensor, context_of: ContextFn | None) -> bool:
        """`offer` by the native merge (eval/kernels/analysis_tables.c: one pass over the candidates,
        each compared with its group's worst slot): the same entries stay, in other slots; False
        where the kernel does not apply."""
        if not self._native:
            return False
        if self._owner is None:
            self._owner = torch.full_like(self.keys, -1)
        slot_of = slot_offer(groups.contiguous(), keys.contiguous(), rows.contiguous(), self.keys,
                             self.rows, self.worst_keys, self._owner)
        if slot_of is None:
            self._native, self._owner = False, None
            return False
        entering = torch.nonzero(slot_of >= 0).squeeze(1)
        group, slot = groups[entering], slot_of[entering]
        self.values[group, slot] = values[entering]
        if context_of is not None:
            self.tokens[group, slot], self.context[group, slot] = context_of(entering)
        return True

    def fill_contexts(self, encoded: EncodedBatch, before: int, after: int) -> None:
        """The contexts of the entries on `encoded`'s rows, for a table filled with no `context_of`
        (its rows final): looked up once per entry that stayed, not per entry that got in."""
        start = encoded.batch.start
        lo, hi = self._slots_on_rows(start, encoded.batch.tokens.shape[0])
        if lo == hi:
            return
        assert self._by_row is not None  # set by _slots_on_rows
        sorted_rows, order = self._by_row
        slots = order[lo:hi]  # [n] flat (group, slot) indices
        width = self.tokens.shape[2]
        tokens, context = encoded.contexts(sorted_rows[lo:hi] - start, slots // self.slots, before, after)
        self.tokens.view(-1, width)[slots] = tokens
        self.context.view(-1, width)[slots] = context

    def _slots_on_rows(self, start: int, rows: int) -> tuple[int, int]:
        """[lo, hi): the slots (in row order, `_by_row`) whose rows are in [start, start + rows).
        The first call sorts the slots by row and finds the range of every batch of its size at
        once, the one time `fill_contexts` reads from the device: later batches of that size (an
        analysis' pass 2) need nothing read back, where a search per batch would wait for the
        device each time (as it still does for a batch of another size)."""
        if self._by_row is None:
            flat = self.rows.view(-1)
            order = flat.argsort(stable=True)  # [groups * slots] empty slots (row -1) first
            self._by_row = flat[order], order
            last = int(self._by_row[0][-1])  # the last row held
            edges = torch.arange(0, last + 1 + rows, rows, device=flat.device)
            self._batch_slots = (rows, last, torch.searchsorted(self._by_row[0], edges).tolist())
        sorted_rows = self._by_row[0]
        step, last, bounds = self._batch_slots
        if start > last:
            return 0, 0
        if start % step == 0 and (rows == step or start + rows > last):
            lo = bounds[start // step]
            return lo, (bounds[start // step + 1] if rows == step else sorted_rows.shape[0])
        edges = torch.tensor([start, start + rows], device=sorted_rows.device)
        lo, hi = torch.searchsorted(sorted_rows, edges).tolist()
        return lo, hi

    def contexts(self, groups_per_row: int = 1) -> Contexts:
        """The table as `Contexts` on the CPU, each group's entries by ascending key (ties: the
        earlier row), `groups_per_row` consecutive groups per output row."""
        by_row = self.rows.argsort(dim=1, stable=True)
        order = by_row.gather(1, self.keys.gather(1, by_row).argsort(dim=1, stable=True))  # [groups, slots]
        rows = self.keys.shape[0] // groups_per_row
        width = self.tokens.shape[2]
        per_slot = order[:, :, None].expand(-1, -1, width)

        def sorted_(table: torch.Tensor) -> torch.Tensor:
            return table.gather(1, per_slot if table.dim() == 3 else order)

        return Contexts(sorted_(self.values).reshape(rows, -1).cpu(),
                        sorted_(self.rows).reshape(rows, -1).cpu(),
                        sorted_(self.tokens).reshape(rows, -1, width).cpu(),
                        sorted_(self.context).reshape(rows, -1, width).cpu())


class TopPass:
    """Pass 1: count, sum, max and the top-N rows of every latent; in pass 2 their contexts."""

    def __init__(self, d_sae: int, cfg: AnalyzeConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max = torch.zeros(d_sae, device=device)
        self.top = SlotTable(d_sae, cfg.top_n, cfg.context_before + 1 + cfg.context_after, device)

    def state(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "sum": self.sum, "max": self.max,
                **{f"top.{k}": v for k, v in self.top.state().items()}}

    def add(self, encoded: EncodedBatch) -> None:
        # contexts in pass 2 (add_contexts): most entries that get in drop out again (demo SAE:
        # 710k got in, 184k stayed), and each would cost a window lookup and its table writes
        better = top_stats(encoded.entries, self.count, self.sum, self.max, self.top.worst_keys)
        if better is not None:
            local, features, values = encoded.local[better], encoded.features[better], encoded.values[better]
            self.top.offer(features, descending_keys(values), values, local + encoded.batch.start, None)
            return
        # every entry, the others masked: nothing waits for the device (`waits_for_nothing`); adding
        # 0.0 to the sums leaves them as they were, bit for bit
        analysed, features, values = encoded.analysed, encoded.features, encoded.values
        self.count.index_add_(0, features, analysed.long())
        self.sum.index_add_(0, features, torch.where(analysed, values.double(), 0.0))
        self.max.scatter_reduce_(0, features, torch.where(analysed, values, 0.0), "amax")
        keys = torch.where(analysed, descending_keys(values), EMPTY_KEY)  # the others never get in
        self.top.offer(features, keys, values, encoded.local + encoded.batch.start, None)

    def add_contexts(self, encoded: EncodedBatch) -> None:
        """Pass 2: the contexts of the top-N entries on this batch's rows."""
        self.top.fill_contexts(encoded, self.cfg.context_before, self.cfg.context_after)


class DistributionPass:
    """Pass 2: fine histograms over (0, max] and band samples outside the top-N."""

    def __init__(self, first: TopPass, cfg: AnalyzeConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.max, self.top_rows = first.max, first.top.rows
        d_sae = self.max.shape[0]
        self.sub_bins = SUB_BINS * cfg.histogram_bins
        self.fine = torch.zeros(d_sae, self.sub_bins, dtype=torch.int64, device=device)
        self.band_edges = band_edges(cfg.bands)
        self._inner_edges = self.band_edges[1:-1].to(device)  # [bands - 1]
        self._top_pairs: torch.Tensor | None = None
        """[d_sae * top_n] latent * 2^40 + store row of every top-N entry, ascending (the
        fixed-shape path's test of whether an entry is in its latent's top-N)."""
        self.bands = SlotTable(d_sae * cfg.bands, cfg.samples_per_band,
                               cfg.context_before + 1 + cfg.context_after, device)

    def state(self) -> dict[str, torch.Tensor]:
        return {"fine_histogram": self.fine, **{f"bands.{k}": v for k, v in self.bands.state().items()}}

    def add(self, encoded: EncodedBatch) -> None:
        found = band_candidates(encoded.entries, encoded.batch.start, self.max, self.fine,
                                self._inner_edges, self.top_rows, self.bands.worst_keys)
        if found is not None:
            chosen = found.entries
            self._offer(encoded, found.groups, found.keys, encoded.local[chosen], encoded.features[chosen],
                        encoded.values[chosen])
            return
        # every entry, the others masked (`waits_for_nothing`)
        analysed, local, features, values = encoded.analysed, encoded.local, encoded.features, encoded.values
        maxima = self.max[features]
        sub_bin = fine_bin(values, maxima, self.sub_bins)  # masked entries: any bin, counted 0 times
        self.fine.view(-1).index_add_(0, features * self.sub_bins + sub_bin, analysed.long())
        band = (values[:, None] <= self._inner_edges * maxima[:, None]).sum(1)  # [n]
        rows = local + encoded.batch.start
        keys = torch.where(analysed & ~self._in_top(features, rows), sample_keys(rows, features), EMPTY_KEY)
        self._offer(encoded, features * self.cfg.bands + band, keys, local, features, values)

    def _in_top(self, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[n] bool: whether store row `rows` is among latent `features`' top-N rows."""
        if self._top_pairs is None:
            latents = torch.arange(self.top_rows.shape[0], device=self.top_rows.device)[:, None]
            self._top_pairs = (latents * _PAIR_BASE + self.top_rows).view(-1).sort().values
        pairs = features * _PAIR_BASE + rows
        at = torch.searchsorted(self._top_pairs, pairs).clamp_(max=self._top_pairs.shape[0] - 1)
        return self._top_pairs[at] == pairs

    def _offer(self, encoded: EncodedBatch, groups: torch.Tensor, keys: torch.Tensor, local: torch.Tensor,
               features: torch.Tensor, values: torch.Tensor) -> None:
        self.bands.offer(groups, keys, values, local + encoded.batch.start,
                         lambda i: encoded.contexts(local[i], features[i], self.cfg.context_before,
                                                    self.cfg.context_after))

    def histogram(self) -> torch.Tensor:
        """[d_sae, histogram_bins] int64 on the CPU."""
        return self.fine.view(self.fine.shape[0], -1, SUB_BINS).sum(-1).cpu()


def band_edges(bands: int) -> torch.Tensor:
    """[bands + 1] float32 fractions of max, descending from 1 to 0; band b is
    (edges[b + 1] * max, edges[b] * max]."""
    return torch.tensor([1 - b / bands for b in range(bands + 1)], dtype=torch.float32)


def fine_bin(values: torch.Tensor, maxima: torch.Tensor, sub_bins: int) -> torch.Tensor:
    """[n] int64: sub-bin j of (0, max] holding each value, j covering (j, j + 1] * max / sub_bins."""
    return ((values / maxima * sub_bins).ceil().long() - 1).clamp_(0, sub_bins - 1)


def histogram_quantiles(fine: torch.Tensor, maxima: torch.Tensor, levels: list[float]) -> torch.Tensor:
    """[d_sae, len(levels)] float32 quantiles from fine histograms [d_sae, S] over (0, max].

    torch.quantile's linear rule: position t = q (n - 1) between sorted elements k = floor(t) and
    k + 1. Each element is placed inside its (known) sub-bin as if the sub-bin's values were spread
    evenly, so each is off by less than a sub-bin, and so is their interpolation: error < max / S.
    """
    sub_bins = fine.shape[1]
    n = fine.sum(1)  # [d_sae]
    cumulative = fine.cumsum(1)  # [d_sae, S]
    position = torch.tensor(levels, dtype=torch.float64, device=fine.device) * (n - 1).clamp(min=0)[:, None]
    below = position.floor()
    width = (maxima.double() / sub_bins)[:, None]

    def element(rank: torch.Tensor) -> torch.Tensor:  # [d_sae, Q] integer ranks -> estimated values
        j = torch.searchsorted(cumulative, rank.long(), right=True).clamp_(max=sub_bins - 1)
        in_bin = fine.gather(1, j)
        before = cumulative.gather(1, j) - in_bin
        return (j + (rank - before + 0.5) / in_bin.clamp(min=1)) * width

    low = element(below)
    high = element(torch.minimum(below + 1, (n - 1).clamp(min=0)[:, None].double()))
    quantiles = low + (position - below) * (high - low)
    return torch.where(n[:, None] > 0, quantiles, 0.0).float().cpu()


def _run_pass(name: str, add: Callable[[EncodedBatch], None], batches: Iterator[tuple[EncodedBatch, bool]],
              device: torch.device, total: int, progress: bool,
              after_batch: Callable[[], None] | None = None) -> tuple[float, int, int]:
    """Feed every (batch, freshly encoded) to `add`; returns (seconds, rows encoded, rows analysed)."""
    start, encoded_rows, kept_rows = time.perf_counter(), 0, 0
    with tqdm(total=total, unit="tok", desc=name, disable=not progress) as bar:
        for encoded, fresh in batches:
            add(encoded)
            if after_batch is not None:
                after_batch()
            kept = encoded.batch.kept_rows
            encoded_rows += encoded.batch.tokens.shape[0] if fresh else 0
            kept_rows += kept
            bar.update(kept)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, encoded_rows, kept_rows


REPLAY_BYTES = 1 << 30
"""Default budget for holding pass 1's non-zero activations for pass 2 (12 bytes per entry, 8 for
a TopK SAE's: `Replay`)."""


@torch.no_grad()
def analyze_features(sae: SparseAutoencoder, store: ActivationStore, hook: str, cfg: AnalyzeConfig,
                     model: torch.nn.Module | None = None, device: str | torch.device = "cpu",
                     progress: bool = True, replay_bytes: int = REPLAY_BYTES,
                     after_batch: Callable[[], None] | None = None) -> FeatureAnalysis:
    """Analyse every latent of `sae` over the first `cfg.max_tokens` kept rows of `hook` in `store`.

    The SAE is moved to `device`. `model` (the causal LM the store was harvested with) is used only
    for logit effects; without it, or for a hook outside the residual stream, those are [d_sae, 0].
    Pass 1's non-zero activations are held for pass 2 up to `replay_bytes` (0: encode twice); the
    result is the same either way. `after_batch` is called after each batch of both passes, inside
    their timing (benchmarks/analysis.py times its limit there, under the analysis' conditions).
    """
    device = torch.device(device)
    sae = sae.to(device).eval()
    if store.d(hook) != sae.d_in:
        raise ValueError(f"the SAE reads {sae.d_in}-wide activations but {hook} in {store.url!r} is "
                         f"{store.d(hook)} wide")
    clock = time.perf_counter()
    selection = RowSelection.of_store(store, cfg.max_tokens)
    context = store.context_size
    windows = max(1, cfg.batch_size // context)
    total = min(cfg.max_tokens or store.n_tokens, store.n_tokens)
    replay = Replay(replay_bytes, sae.d_sae, context)

    def encoded(first_window: int = 0, kept_before: int = 0) -> Iterator[tuple[EncodedBatch, bool]]:
        on_cpu = device.type == "cpu"
        batches = window_batches(store, hook, selection, windows, first_window, kept_before, rows=False)
        batch_bytes = windows * context * store.d(hook) * getattr(torch, store.store_dtype).itemsize
        stream = encoded_reading_ahead(sae, read_rows_together(store, hook, batches), device, context) \
            if on_cpu else encoded_on_device(sae, store, hook, batches, device, context,
                                             device_readers(batch_bytes))
        yield from ((batch, True) for batch in stream)

    def first_pass() -> Iterator[tuple[EncodedBatch, bool]]:
        for item in encoded():
            replay.hold(item[0])
            yield item

    def second_pass() -> Iterator[tuple[EncodedBatch, bool]]:
        complete, next_window, kept = replay.complete, replay.next_window, replay.kept
        yield from ((batch, False) for batch in replay.replay())
        if not complete:
            yield from encoded(next_window, kept)

    first = TopPass(sae.d_sae, cfg, device)
    seconds1, rows1, n_tokens = _run_pass("analysis pass 1/2", first.add, first_pass(), device, total,
                                          progress, after_batch)
    second = DistributionPass(first, cfg, device)

    def second_add(encoded: EncodedBatch) -> None:
        first.add_contexts(encoded)
        second.add(encoded)

    seconds2, rows2, _ = _run_pass("analysis pass 2/2", second_add, second_pass(), device, total, progress,
                                   after_batch)
    release_workspace()  # the pre-activation buffer of the encodes
    quantiles = histogram_quantiles(second.fine, first.max, list(cfg.quantiles))
    start = time.perf_counter()
    W_dec = sae.W_dec.detach()
    logits, logit_note = logit_effects_for(W_dec, hook, model, cfg.logit_tokens)
    logit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    neighbours = decoder_neighbours(W_dec, cfg.neighbours)
    neighbour_seconds = time.perf_counter() - start
    seconds = time.perf_counter() - clock

    info: dict[str, Any] = {
        "store": store.url, "hook": hook, "n_tokens": n_tokens, "d_sae": sae.d_sae, "context_size": context,
        "prepend_bos": store.attrs.get("identity", {}).get("dataset", {}).get("prepend_bos"),
        "seconds": seconds, "tokens_per_s": n_tokens / max(seconds, 1e-9),
        "pass1_seconds": seconds1, "pass2_seconds": seconds2, "logit_seconds": logit_seconds,
        "neighbour_seconds": neighbour_seconds, "rows_per_pass": rows1,
        "rows_encoded": {"pass1": rows1, "pass2": rows2}, "encode_passes": (rows1 + rows2) / max(rows1, 1),
        "histogram_sub_bins": second.sub_bins, "logit_effects": logit_note,
        "model": getattr(getattr(model, "config", None), "name_or_path", None),
        "device": str(device), "analyze": asdict(cfg),
    }
    return FeatureAnalysis(
        n_tokens=n_tokens, count=first.count.cpu(), sum=first.sum.cpu(), max=first.max.cpu(),
        quantile_levels=list(cfg.quantiles), quantiles=quantiles,
        histogram=second.histogram(), top=first.top.contexts(), band_edges=second.band_edges,
        bands=second.bands.contexts(groups_per_row=cfg.bands),
        logit_positive_ids=logits.positive_ids, logit_positive_values=logits.positive_values,
        logit_negative_ids=logits.negative_ids, logit_negative_values=logits.negative_values,
        neighbour_ids=neighbours.ids, neighbour_cosines=neighbours.cosines, info=info,
    )


def logit_effects_for(W_dec: torch.Tensor, hook: str, model: torch.nn.Module | None, k: int
                      ) -> tuple[LogitEffects, str]:
    """Logit effects of decoder rows read at `hook`, or empty ones ([d_sae, 0]) and why not."""
    d_sae = W_dec.shape[0]
    if model is None:
        return LogitEffects.empty(d_sae), "skipped: no model"
    d_model = getattr(getattr(model, "config", None), "hidden_size", None)
    if hook.endswith("mlp.hook_post") or W_dec.shape[1] != d_model:
        return LogitEffects.empty(d_sae), (f"skipped: {hook} is not in the residual stream "
                                           f"(d_in {W_dec.shape[1]}, d_model {d_model})")
    return model_logit_effects(W_dec, model, k), "computed: (W_dec ⊙ final-norm gain) @ W_U^T"
