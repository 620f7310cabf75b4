"""The activation reader: every kept row once per epoch, disjoint ranks in step, deterministic
shuffles, exact resume, dtypes restored, clear errors. Small synthetic stores, no model."""

from __future__ import annotations

import gc
import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from saeworks.activations import reader as reader_module
from saeworks.activations.config import ReaderConfig
from saeworks.activations.reader import ActivationReader, ReaderBatch
from saeworks.activations.store import (
    ActivationStore,
    StoreError,
    StoreGeometry,
    create_store,
    finalize,
    to_storable,
    write_shard,
)
from saeworks.sae.configio import ConfigError

HOOK, OTHER = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
CONTEXT, D = 16, 8
N_WINDOWS = 62  # 16 chunks of 4 windows, the last one half full
EXCLUDED_IDS = [0, 1]
FIRST_POSITIONS = 2


def values_of(n_tokens: int) -> np.ndarray:
    """[n_tokens, D] float32: column 0 is the row index, the others tell the columns apart."""
    rows = np.arange(n_tokens, dtype=np.float32)[:, None]
    return rows + np.arange(D, dtype=np.float32)[None, :] / 8


def token_ids_of(n_windows: int) -> np.ndarray:
    """[n_windows, CONTEXT] int32: BOS first, then random ids with some excluded ones inside."""
    token_ids = np.random.default_rng(1).integers(0, 12, size=(n_windows, CONTEXT), dtype=np.int32)
    token_ids[:, 0] = 1
    return token_ids


def make_store(path: Path, store_dtype: str = "float32", complete: bool = True,
               n_windows: int = N_WINDOWS) -> ActivationStore:
    geometry = StoreGeometry.plan(n_windows, CONTEXT, chunk_tokens=64, chunks_per_shard=2)
    store = create_store(str(path), {"test": store_dtype}, geometry, {HOOK: D, OTHER: D}, store_dtype,
                         "zstd", {"excluded": {"first_positions": FIRST_POSITIONS,
                                               "token_ids": EXCLUDED_IDS}})
    values, token_ids = values_of(geometry.n_tokens), token_ids_of(n_windows)
    for shard in range(geometry.n_shards if complete else geometry.n_shards - 1):
        windows = geometry.shard_windows(shard)
        rows = slice(windows.start * CONTEXT, windows.stop * CONTEXT)
        stored = to_storable(torch.from_numpy(values[rows]), store_dtype, HOOK)
        write_shard(store, shard, {HOOK: stored, OTHER: stored}, token_ids[windows.start:windows.stop])
    if complete:
        finalize(store, n_windows)
    return ActivationStore.open(str(path))


def kept_rows(store: ActivationStore) -> np.ndarray:
    """Rows the reader should yield under the store's own exclusions, ascending."""
    token_ids = np.asarray(store.array("token_ids")[:])
    positions = np.arange(store.n_tokens) % CONTEXT
    return np.flatnonzero((positions >= FIRST_POSITIONS) & ~np.isin(token_ids, EXCLUDED_IDS))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    return make_store(tmp_path_factory.mktemp("reader") / "store.zarr")


def reader(store: ActivationStore, rank: int = 0, world_size: int = 1, epochs: int | None = None,
           **cfg: object) -> ActivationReader:
    settings: dict = {"batch_size": 32, "buffer_chunks": 3, "prefetch": 2, **cfg}
    return ActivationReader(store, HOOK, ReaderConfig(**settings), rank, world_size, epochs)


def take(batches: object, n: int) -> list[ReaderBatch]:
    return list(itertools.islice(batches, n))  # type: ignore[call-overload]


def rows_of(batches: list[ReaderBatch]) -> np.ndarray:
    return torch.cat([b.rows for b in batches]).numpy() if batches else np.zeros(0, np.int64)


def assert_same_batches(got: list[ReaderBatch], want: list[ReaderBatch]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.rows, b.rows)
        assert torch.equal(a.activations, b.activations)


@pytest.mark.parametrize("batch_size", [1, 32])
def test_one_epoch_yields_every_kept_row_once(store: ActivationStore, batch_size: int) -> None:
    batches = list(reader(store, epochs=1, batch_size=batch_size))
    rows, kept = rows_of(batches), kept_rows(store)
    assert all(b.activations.shape == (batch_size, D) and b.rows.dtype == torch.int64 for b in batches)
    assert len(np.unique(rows)) == len(rows)  # never twice
    assert set(rows.tolist()) <= set(kept.tolist())  # never an excluded row
    assert len(kept) - len(rows) < batch_size  # all of them but the last partial batch
    if batch_size == 1:
        np.testing.assert_array_equal(np.sort(rows), kept)
    activations = torch.cat([b.activations for b in batches])  # [rows, D]
    np.testing.assert_array_equal(activations[:, 0].numpy(), rows.astype(np.float32))
    torch.testing.assert_close(activations, store.read_rows(HOOK, 0, store.n_tokens)[rows], rtol=0, atol=0)
    # excluded rows keep their place in the store: row r still holds r
    excluded = np.setdiff1d(np.arange(store.n_tokens), kept)
    assert excluded.size > 2 * N_WINDOWS  # first positions and some special tokens
    np.testing.assert_array_equal(store.read_rows(HOOK, 0, store.n_tokens)[excluded, 0].numpy(), excluded)


def test_exclusions_can_be_switched_off(store: ActivationStore) -> None:
    rows = rows_of(list(reader(store, epochs=1, batch_size=1, exclude_first_positions=0,
                               exclude_special_tokens=False)))
    np.testing.assert_array_equal(np.sort(rows), np.arange(store.n_tokens))
    only_positions = rows_of(list(reader(store, epochs=1, batch_size=1, exclude_special_tokens=False)))
    np.testing.assert_array_equal(np.sort(only_positions),
                                  np.flatnonzero(np.arange(store.n_tokens) % CONTEXT >= FIRST_POSITIONS))


def test_two_ranks_are_disjoint_complete_and_in_step(store: ActivationStore) -> None:
    readers = [reader(store, rank, 2, epochs=2) for rank in (0, 1)]
    per_rank = [list(r) for r in readers]
    assert len(per_rank[0]) == len(per_rank[1]) == sum(readers[0].batches_in_epoch(e) for e in (0, 1))
    assert readers[0].state_dict() == readers[1].state_dict()  # same position on every rank
    for epoch in (0, 1):
        n = readers[0].batches_in_epoch(epoch)
        first = sum(readers[0].batches_in_epoch(e) for e in range(epoch))
        rows = [rows_of(batches[first:first + n]) for batches in per_rank]
        assert not set(rows[0].tolist()) & set(rows[1].tolist())
        union = np.concatenate(rows)
        assert set(union.tolist()) <= set(kept_rows(store).tolist())
        usable = readers[0].plan(epoch).usable
        assert len(union) == 2 * usable  # the drop-last remainder of each rank is all that is missing
        assert len(kept_rows(store)) - len(union) == sum(int(r.plan(epoch).starts[-1]) - usable
                                                         for r in readers)
        # each rank's rows come from its own chunks, which together are all chunks
        chunks = [set((r // 64).tolist()) for r in rows]
        assert not chunks[0] & chunks[1] and chunks[0] | chunks[1] == set(range(16))


def test_shuffles_are_random_and_deterministic(store: ActivationStore) -> None:
    n = reader(store).batches_in_epoch(0)
    stream = take(iter(reader(store)), 2 * n)
    epoch0, epoch1 = rows_of(stream[:n]), rows_of(stream[n:])
    assert not np.array_equal(epoch0, np.sort(epoch0))
    assert not np.array_equal(epoch0[:64], epoch1[:64])
    assert_same_batches(take(iter(reader(store)), 2 * n), stream)
    other = rows_of(take(iter(reader(store, seed=1)), n))
    assert not np.array_equal(other, epoch0)


def block_boundary_batch(r: ActivationReader) -> int:
    """Index of the first batch of epoch 0 that spans two blocks."""
    size = r.cfg.batch_size
    for start in r.plan(0).starts[1:-1].tolist():
        if start % size:
            return start // size
    raise AssertionError("no batch spans two blocks in this store")


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_continues_exactly(store: ActivationStore, world_size: int) -> None:
    per_epoch = reader(store, 0, world_size).batches_in_epoch(0)
    spanning = block_boundary_batch(reader(store, 0, world_size))
    for rank in range(world_size):
        reference = take(iter(reader(store, rank, world_size)), per_epoch + 8)
        for k in (0, 3, spanning, spanning + 1, per_epoch - 1, per_epoch, per_epoch + 2):
            first = reader(store, rank, world_size)
            consumed = take(iter(first), k)
            assert_same_batches(consumed, reference[:k])
            state = json.loads(json.dumps(first.state_dict()))  # JSON-able
            resumed = reader(store, rank, world_size)
            resumed.load_state_dict(state)
            assert_same_batches(take(iter(resumed), 5), reference[k:k + 5])


class RecordingArray:
    """Wraps a zarr array and records the start row of every read of activation data."""

    def __init__(self, array: object) -> None:
        self.array, self.starts = array, []  # type: ignore[var-annotated]

    def get_basic_selection(self, selection: slice, **kwargs: object) -> object:
        self.starts.append(selection.start)
        return self.array.get_basic_selection(selection, **kwargs)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.array, name)


def test_resume_reads_no_skipped_block(store: ActivationStore) -> None:
    first = reader(store, buffer_chunks=2)
    plan = first.plan(0)
    k = int(plan.starts[5]) // 32 + 1  # inside block 5
    take(iter(first), k)
    resumed = reader(store, buffer_chunks=2)
    resumed.load_state_dict(first.state_dict())
    recording = RecordingArray(resumed.array)
    resumed.array = recording  # type: ignore[assignment]
    take(iter(resumed), 1)
    skipped = {int(c) for block in plan.blocks[:5] for c in block}
    assert recording.starts and not {s // 64 for s in recording.starts} & skipped
    assert recording.starts[0] // 64 == int(plan.blocks[5][0])


@pytest.mark.parametrize("store_dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes_come_back(tmp_path: Path, store_dtype: str) -> None:
    half = make_store(tmp_path / "half.zarr", store_dtype)
    batches = list(reader(half, epochs=1))
    dtype = getattr(torch, store_dtype)
    assert all(b.activations.dtype == dtype for b in batches)
    rows = rows_of(batches)
    expected = torch.from_numpy(values_of(half.n_tokens)).to(dtype)[rows]  # [rows, D]
    assert torch.equal(torch.cat([b.activations for b in batches]), expected)


def test_finite_epochs_stop(store: ActivationStore) -> None:
    r = reader(store, epochs=2)
    batches = list(r)
    assert len(batches) == r.batches_in_epoch(0) + r.batches_in_epoch(1)
    assert r.state_dict()["epoch"] == 2 and r.state_dict()["rows_in_epoch"] == 0
    assert list(r) == []
    endless = take(iter(reader(store)), len(batches) + 1)
    assert len(endless) == len(batches) + 1


def test_incomplete_store_and_unknown_hook_are_refused(tmp_path: Path, store: ActivationStore) -> None:
    incomplete = make_store(tmp_path / "incomplete.zarr", complete=False)
    with pytest.raises(StoreError, match="incomplete"):
        reader(incomplete)
    with pytest.raises(StoreError, match=f"no hook 'blocks.9.mlp'; it holds {HOOK}, {OTHER}"):
        ActivationReader(store, "blocks.9.mlp", ReaderConfig())
    with pytest.raises(StoreError, match="index array"):
        ActivationReader(store, "token_ids", ReaderConfig())


def test_state_from_another_schedule_is_refused(tmp_path: Path, store: ActivationStore) -> None:
    state = reader(store).state_dict()
    with pytest.raises(ValueError, match="seed=0 in the state, 1 here"):
        reader(store, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size=1 in the state, 2 here"):
        reader(store, 0, 2).load_state_dict(state)
    other_hook = ActivationReader(store, OTHER, ReaderConfig(batch_size=32, buffer_chunks=3))
    with pytest.raises(ValueError, match="hook="):
        other_hook.load_state_dict(state)
    with pytest.raises(ValueError, match="store="):
        reader(make_store(tmp_path / "smaller.zarr", n_windows=40)).load_state_dict(state)
    with pytest.raises(ValueError, match="not a batch boundary"):
        reader(store).load_state_dict({**state, "rows_in_epoch": 5})


def test_bad_settings_are_refused(store: ActivationStore) -> None:
    with pytest.raises(ConfigError, match="batch_size: must be positive"):
        ReaderConfig(batch_size=0)
    with pytest.raises(ConfigError, match="buffer_chunks"):
        ReaderConfig(buffer_chunks=0)
    with pytest.raises(ConfigError, match="prefetch"):
        ReaderConfig(prefetch=0)
    with pytest.raises(ValueError, match="less than batch_size=100000"):
        reader(store, batch_size=100_000)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        reader(store, 2, 2)
    with pytest.raises(ValueError, match="exclude_first_positions=16"):
        reader(store, exclude_first_positions=16)


def test_loader_errors_surface_and_the_thread_stops(store: ActivationStore) -> None:
    broken = reader(store)

    class Failing(RecordingArray):
        def get_basic_selection(self, selection: slice, **kwargs: object) -> object:
            raise OSError("disk gone")

    broken.array = Failing(broken.array)  # type: ignore[assignment]
    with pytest.raises(OSError, match="disk gone"):
        next(iter(broken))
    stream = iter(reader(store))
    next(stream)
    del stream
    gc.collect()
    deadline = time.monotonic() + 5
    while any(t.name.startswith("ActivationReader") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "loader thread still running after its iterator went away"
        time.sleep(0.02)


def test_a_stale_iterator_is_refused(store: ActivationStore) -> None:
    r = reader(store)
    old = iter(r)
    next(old)
    take(iter(r), 1)
    with pytest.raises(RuntimeError, match="stale"):
        take(old, 100)


def test_read_ahead_follows_the_consumers_pace(store: ActivationStore) -> None:
    """A consumer slower than a block's decode keeps only a few batches queued, not the block's
    worth `prefetch` allows (memory: 151 MB at the defaults); the batches are the same as a fast
    consumer's."""
    settings = {"epochs": 1, "batch_size": 4, "buffer_chunks": 8, "prefetch": 1}
    fast = reader(store, **settings)  # type: ignore[arg-type]
    quick = list(iter(fast))
    slow_reader = reader(store, **settings)  # type: ignore[arg-type]
    slow = []
    for batch in slow_reader:
        slow.append(batch)
        time.sleep(0.03)  # a training step that outlasts decoding a block
    assert_same_batches(slow, quick)
    assert slow_reader.pace is not None and slow_reader.pace.most == 8 * 64 // 4
    assert 0 < slow_reader.pace.peak <= slow_reader.pace.most // 16, slow_reader.pace.peak  # 8 of 128
    assert slow_reader.pace.depth() <= slow_reader.pace.most // 16


def test_back_to_back_reads_do_not_set_the_pace(store: ActivationStore) -> None:
    """Batches taken one after another inside `back_to_back` (the trainer's initial sample) leave the
    consumer's pace unmeasured, so the read-ahead keeps its smallest queue instead of sizing it for
    a consumer that looks infinitely fast; outside it, the time between batches counts again."""
    settings = {"batch_size": 4, "buffer_chunks": 8, "prefetch": 1}
    r = reader(store, **settings)  # type: ignore[arg-type]
    batches = iter(r)
    with r.back_to_back():
        sample = take(batches, 6)
    assert r.pace is not None and r.pace.step_s is None and r.pace.depth() == 2
    time.sleep(0.2)  # the loader may run ahead now: it still holds at most the two batches
    assert r.pace.peak <= 2
    rest = take(batches, 3)  # training pace: measured from the first batch after the sample
    assert r.pace.step_s is not None
    assert_same_batches(sample + rest, take(iter(reader(store, **settings)), 9))  # type: ignore[arg-type]
    batches.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("mapped_from", [0, 1 << 20])
def test_a_batch_owns_its_memory(store: ActivationStore, mapped_from: int,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch's rows are a copy of their own, in a memory mapping of its own or not (they stay
    right while the loader overwrites its buffer with later blocks), and batches spanning two blocks
    come out whole."""
    monkeypatch.setattr(reader_module, "MAPPED_BATCH_BYTES", mapped_from)
    settings = {"epochs": 1, "batch_size": 5, "buffer_chunks": 1, "prefetch": 1}  # 64-row blocks
    batches = list(iter(reader(store, **settings)))  # type: ignore[arg-type]
    values = values_of(store.n_tokens)
    for batch in batches:  # read to the end: every block overwrote the buffer since
        assert torch.equal(batch.activations, torch.from_numpy(values[batch.rows.numpy()]))
    assert len({int(b.rows[0]) // 64 != int(b.rows[-1]) // 64 for b in batches}) == 2  # some span two
