"""Training while a harvest writes the store (`train.reader.stream`): the same SAE as on the
finished store, never a row of a shard before its done flag, a bounded wait with a clear error
when the harvest dies, a clear refusal without `stream`, exact resume mid-stream. Small synthetic
stores written by a background thread, no model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import saeworks.train.run as train_run
from saeworks.activations.config import ReaderConfig
from saeworks.activations.reader import ActivationReader, ReaderBatch
from saeworks.activations.store import (
    ActivationStore,
    StoreError,
    StoreGeometry,
    create_store,
    finalize,
    write_shard,
)
from saeworks.api import train_saes
from saeworks.sae.configio import ConfigError
from tests.train_helpers import CONTEXT, D_IN, HOOK, config, make_store, sae_tensors, synthetic_activations

PLANNED_WINDOWS = 256  # 8 shards of 4 chunks of 8 windows
SHARD_ROWS = 32 * CONTEXT
STREAM = {"train.reader.stream": "true"}


class Harvest:
    """A store that is created at once and then filled shard by shard, in `order` (a harvest of
    two ranks finishes shards out of order), optionally from a background thread with a delay
    before each shard; `n_windows` below the planned 256 is a dataset that ran out (a short last
    shard, then `finalize` trims the store)."""

    def __init__(self, path: Path, n_windows: int = PLANNED_WINDOWS) -> None:
        self.path, self.n_windows = path, n_windows
        self.geometry = StoreGeometry.plan(PLANNED_WINDOWS, CONTEXT, chunk_tokens=256, chunks_per_shard=4)
        self.store = create_store(str(path), {"test": "streaming"}, self.geometry, {HOOK: D_IN}, "float32",
                                  "zstd", {"model": "synthetic-model", "dataset": "synthetic-text",
                                           "excluded": {"first_positions": 1, "token_ids": [0]}})
        self.values = synthetic_activations(self.geometry.n_tokens)
        self.token_ids = np.random.default_rng(1).integers(1, 100, (n_windows, CONTEXT), dtype=np.int32)
        self.token_ids[:, 0] = 0
        self.token_ids[::7, 5] = 0  # special tokens inside windows: kept counts vary per chunk
        self.started: dict[int, float] = {}  # shard -> time its write began (its flag is set later)
        self.thread: threading.Thread | None = None

    @property
    def shards(self) -> list[int]:
        """The shards the dataset fills (the last one short when it ran out)."""
        windows = self.geometry.windows_per_shard
        return [s for s in range(self.geometry.n_shards) if s * windows < self.n_windows]

    def write(self, shard: int) -> None:
        windows = self.geometry.shard_windows(shard)
        stop = min(windows.stop, self.n_windows)
        self.started[shard] = time.monotonic()
        write_shard(self.store, shard, {HOOK: self.values[windows.start * CONTEXT:stop * CONTEXT]},
                    self.token_ids[windows.start:stop])

    def run(self, order: list[int] | None = None, delay: float = 0.0, finish: bool = True) -> None:
        for shard in self.shards if order is None else order:
            time.sleep(delay)
            self.write(shard)
        if finish:
            time.sleep(delay)
            finalize(self.store, self.n_windows)

    def start(self, order: list[int] | None = None, delay: float = 0.1) -> Harvest:
        self.thread = threading.Thread(target=self.run, args=(order, delay), daemon=True)
        self.thread.start()
        return self

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(timeout=30)


def scrambled(shards: list[int]) -> list[int]:
    """Pairs swapped (1, 0, 3, 2, ...): the reader must wait for the lower one."""
    order = list(shards)
    for i in range(0, len(order) - 1, 2):
        order[i], order[i + 1] = order[i + 1], order[i]
    return order


class Timed:
    """A batch source that records when each batch's rows were handed to the trainer."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.yielded: list[tuple[float, np.ndarray]] = []

    def __iter__(self) -> Iterator[ReaderBatch]:
        for batch in self.source:
            self.yielded.append((time.monotonic(), batch.rows.numpy().copy()))
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return dict(self.source.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def test_training_on_a_growing_store_matches_the_finished_store(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    finished = Harvest(tmp_path / "finished.zarr")
    finished.run()
    reference = train_saes(config(tmp_path / "ref", finished.path, **STREAM))
    assert reference.finished and reference.steps == 40  # 40 batches of 256: epoch 0, then into 1

    sources: list[Timed] = []

    def timed_reader(*args: Any, **kwargs: Any) -> Timed:
        sources.append(Timed(store_reader(*args, **kwargs)))
        return sources[-1]

    store_reader = train_run.store_reader
    monkeypatch.setattr(train_run, "store_reader", timed_reader)
    growing = Harvest(tmp_path / "growing.zarr")
    growing.start(scrambled(growing.shards), delay=0.15)
    result = train_saes(config(tmp_path / "run", growing.path, **STREAM))
    growing.join()
    assert result.finished and result.steps == 40
    [name] = [sae.name for sae in result.saes]
    want, got = sae_tensors(tmp_path / "ref" / "saes" / name), sae_tensors(tmp_path / "run" / "saes" / name)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    # No row was handed on before its shard was even being written (the flag is set after that).
    first_yield: dict[int, float] = {}
    for when, rows in sources[0].yielded:
        for shard in np.unique(rows // SHARD_ROWS).tolist():
            first_yield.setdefault(shard, when)
    assert sorted(first_yield) == growing.shards
    assert all(first_yield[s] > growing.started[s] for s in first_yield)
    assert first_yield[growing.shards[-1]] > growing.started[growing.shards[-2]]  # it really waited


def test_a_harvest_that_dies_stops_training_with_a_clear_error(tmp_path: Path) -> None:
    dead = Harvest(tmp_path / "dead.zarr")
    dead.run(order=dead.shards[:-1], finish=False)  # the last shard never comes
    run_dir = tmp_path / "run"
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        train_saes(config(run_dir, dead.path, **STREAM, **{"train.reader.stream_timeout_s": 1}))
    message = str(caught.value)
    assert time.monotonic() - started < 20
    assert "is still incomplete" in message and "shard 7 (rows 7168-8191)" in message, message
    assert "waited 1 s" in message and "saeworks harvest" in message and "stream_timeout_s" in message
    saes = run_dir / "saes"
    assert not saes.exists() or not [p for p in saes.rglob("*") if p.name in ("cfg.json",
                                                                            "sae_weights.safetensors")]


def test_an_incomplete_store_is_refused_without_stream(tmp_path: Path) -> None:
    incomplete = tmp_path / "incomplete.zarr"
    make_store(incomplete, n_windows=64, complete=False)
    with pytest.raises(StoreError, match=r"is incomplete \(\d+ of 2048 tokens\).*"
                                         r"train\.reader\.stream=true"):
        train_saes(config(tmp_path / "run", incomplete))
    assert not (tmp_path / "run" / "saes").exists()
    with pytest.raises(ConfigError, match="stream_timeout_s: must be positive"):
        ReaderConfig(stream=True, stream_timeout_s=0)


def reader(store: ActivationStore, rank: int, world_size: int) -> ActivationReader:
    cfg = ReaderConfig(batch_size=64, buffer_chunks=3, seed=3, stream=True, stream_timeout_s=20)
    return ActivationReader(store, HOOK, cfg, rank, world_size, epochs=2)


@pytest.mark.parametrize(("rank", "world_size", "n_windows"),
                         [(0, 1, PLANNED_WINDOWS), (1, 2, PLANNED_WINDOWS), (0, 1, 200)])
def test_kill_and_resume_mid_stream_gives_the_same_batches(tmp_path: Path, rank: int, world_size: int,
                                                            n_windows: int) -> None:
    finished = Harvest(tmp_path / "finished.zarr", n_windows)
    finished.run()
    full = reader(ActivationStore.open(str(finished.path)), rank, world_size)
    want = list(full)
    assert len(want) == full.batches_in_epoch(0) + full.batches_in_epoch(1)
    epoch0 = np.concatenate([b.rows.numpy() for b in want[:full.batches_in_epoch(0)]])
    chunk = epoch0 // (SHARD_ROWS // 4)
    place = chunk // 4 // world_size * 4 + chunk % 4  # the chunk's place among the rank's chunks
    assert (np.diff(place // 3) >= 0).all()  # epoch 0: blocks of 3 chunks in shard order
    assert set((epoch0 // SHARD_ROWS % world_size).tolist()) == {rank}

    growing = Harvest(tmp_path / "growing.zarr", n_windows).start(scrambled(finished.shards), delay=0.1)
    first = reader(ActivationStore.open(str(growing.path)), rank, world_size)
    batches = iter(first)
    got = [next(batches) for _ in range(len(want) // 4)]  # mid epoch 0, while shards still arrive
    state = first.state_dict()
    batches.close()  # type: ignore[attr-defined]
    assert state["epoch"] == 0 and not ActivationStore.open(str(growing.path)).complete
    resumed = reader(ActivationStore.open(str(growing.path)), rank, world_size)
    resumed.load_state_dict(state)
    got += list(resumed)
    growing.join()
    assert len(got) == len(want)
    for mine, theirs in zip(got, want, strict=True):
        assert torch.equal(mine.rows, theirs.rows)
        assert torch.equal(mine.activations, theirs.activations)
    assert resumed.state_dict() == {**full.state_dict()}


def test_a_stream_state_is_refused_by_a_reader_without_stream(tmp_path: Path) -> None:
    finished = Harvest(tmp_path / "finished.zarr")
    finished.run()
    store = ActivationStore.open(str(finished.path))
    streaming = reader(store, 0, 1)
    plain = ActivationReader(store, HOOK, replace(streaming.cfg, stream=False), epochs=2)
    with pytest.raises(ValueError, match="stream setting"):
        plain.load_state_dict(streaming.state_dict())
