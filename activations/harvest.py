"""The harvester: token windows through the model, activations of every requested hook to Zarr.

Work is split by shard: shard s (a run of consecutive windows) belongs to rank s % world_size.
Every rank packs the same deterministic window stream and runs the model only on its own shards;
a shard is written whole and then flagged, so a rerun after a kill skips exactly the finished ones.
`repair=True` first verifies an existing store and clears the flags of its damaged shards
(activations/verify.py), so that the same resume recomputes exactly those.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saeworks.activations.compiled import compile_blocks
from saeworks.activations.config import DataConfig, HarvestConfig, ModelConfig
from saeworks.activations.hooks import HookPoint, capture_activations, resolve_hooks
from saeworks.activations.model import (
    check_context_size,
    load_model,
    load_tokenizer,
    model_revision,
    resolve_source,
    with_resolved_dtype,
)
from saeworks.activations.remote import is_remote, require_writable
from saeworks.activations.store import (
    ActivationStore,
    StoreError,
    StoreGeometry,
    create_store,
    finalize,
    identity_mismatch,
    record_progress,
    to_storable,
    write_shard,
)
from saeworks.activations.text import DataError, excluded_token_ids, iter_windows
from saeworks.activations.verify import repair_store
from saeworks.sae.atomic import fault_point
from saeworks.sae.configio import ConfigError
from saeworks.sae.distributed import RankInfo, barrier, rank_info
from saeworks.sae.heap import keep_freed_heap
from saeworks.sae.locks import exclusive_writer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HarvestResult:
    """What a harvest left behind, from this rank's point of view."""

    store_url: str
    n_tokens: int
    tokens_harvested: int
    """Tokens this rank ran through the model in this call (0 when resuming a complete store)."""
    shards: list[int]
    """Shards this rank wrote in this call."""
    rank: int
    world_size: int
    seconds: float


@dataclass(frozen=True)
class HarvestJob:
    """The config sections a harvest reads, and the store it fills (not the whole run config)."""

    model: ModelConfig
    data: DataConfig
    harvest: HarvestConfig
    store_url: str


def harvest(model_cfg: ModelConfig, data: DataConfig, settings: HarvestConfig, store_url: str,
            repair: bool = False) -> HarvestResult:
    """Fill (or resume) the store at `store_url` with `settings.hooks` of the model over `data`.

    Holds the store's writer lock throughout (sae/locks.py): a second harvest into the same store
    is refused at once, naming this one; the directory is checked writable before the model loads.
    A remote store (`s3://...`) is checked writable the same way but not locked (README)."""
    rank = rank_info(model_cfg.device)
    if is_remote(store_url):
        require_writable(store_url, "run_dir (or harvest.store)", rank.is_main, collective=True)
    with exclusive_writer(store_url, "harvest", rank.is_main, setting="run_dir (or harvest.store)",
                          collective=True):
        return _harvest(model_cfg, data, settings, store_url, repair, rank)


def _harvest(model_cfg: ModelConfig, data: DataConfig, settings: HarvestConfig, store_url: str,
             repair: bool, rank: RankInfo) -> HarvestResult:
    # `auto` resolved once: the model loads in the dtype the store identity records.
    cfg = HarvestJob(with_resolved_dtype(model_cfg, rank), data, settings, store_url)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, rank.device)
    if cfg.harvest.compile:
        compile_blocks(model)
    hooks = resolve_hooks(model, cfg.harvest.hooks)
    check_context_size(model, cfg.data.context_size)
    windows = _windows_or_error(tokenizer, cfg)
    geometry = StoreGeometry.plan(cfg.harvest.max_tokens // cfg.data.context_size,
                                  cfg.data.context_size, cfg.harvest.chunk_tokens,
                                  cfg.harvest.chunks_per_shard)
    identity = _identity(cfg, model, tokenizer)
    if rank.is_main:
        _open_or_create(cfg, identity, geometry, hooks, tokenizer, repair)
    barrier()
    store = ActivationStore.open(cfg.store_url, mode="r+")
    if store.complete:
        log.info("store %s is already complete (%d tokens)", store.url, store.n_tokens)
        return HarvestResult(store.url, store.n_tokens, 0, [], rank.rank, rank.world_size, 0.0)
    start = time.perf_counter()
    with keep_freed_heap():  # each batch's temporaries reused, not page-faulted anew (sae/heap.py)
        shards, n_windows = _harvest_shards(store, model, hooks, windows, rank, cfg.harvest.batch_size)
    barrier()
    if rank.is_main:
        finalize(store, n_windows)
    barrier()
    store = ActivationStore.open(cfg.store_url)
    harvested = sum(len(store.geometry.shard_windows(s)) for s in shards) * store.context_size
    return HarvestResult(store.url, store.n_tokens, harvested, shards, rank.rank, rank.world_size,
                         time.perf_counter() - start)


def _windows_or_error(tokenizer: Any, cfg: HarvestJob) -> Iterator[np.ndarray]:
    """The window stream, checked to hold at least one window before anything is written."""
    max_windows = cfg.harvest.max_tokens // cfg.data.context_size
    if max_windows == 0:
        raise ConfigError(
            f"harvest.max_tokens: {cfg.harvest.max_tokens} is less than one window of "
            f"data.context_size={cfg.data.context_size} tokens; raise it"
        )
    windows = iter_windows(tokenizer, cfg.data, max_windows)
    first = next(windows, None)
    if first is None:
        raise DataError(
            f"data.path: dataset {cfg.data.path!r} yielded no text to harvest (empty files, or "
            f"field {cfg.data.text_field!r} empty); point it at a non-empty dataset"
        )
    return chain([first], windows)


def _identity(cfg: HarvestJob, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Everything that decides the rows' values and order: a store resumes only under the same."""
    source = resolve_source(cfg.model)
    data = cfg.data
    return {
        "model": {**source.identity, "revision": model_revision(model, source.identity),
                  "dtype": cfg.model.dtype},
        "tokenizer": {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
                      "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id},
        "hooks": list(cfg.harvest.hooks),
        "context_size": data.context_size,
        "dataset": {"path": data.path, "name": data.name, "split": data.split,
                    "text_field": data.text_field, "shuffle_seed": data.shuffle_seed,
                    "shuffle_buffer": data.shuffle_buffer, "prepend_bos": data.prepend_bos,
                    "holdout_fraction": data.holdout_fraction},
        "max_tokens": cfg.harvest.max_tokens,
        "store_dtype": cfg.harvest.store_dtype,
        "compression": cfg.harvest.compression,
        "chunk_tokens": cfg.harvest.chunk_tokens,
        "chunks_per_shard": cfg.harvest.chunks_per_shard,
    }


def _open_or_create(cfg: HarvestJob, identity: dict[str, Any], geometry: StoreGeometry,
                    hooks: list[HookPoint], tokenizer: Any, repair: bool = False) -> None:
    """Resume a store made with the same identity (after marking its damaged shards unfinished
    when `repair`); refuse any other; create one if none."""
    try:
        existing = ActivationStore.open(cfg.store_url, mode="r+")
    except StoreError as err:
        if "no activation store" not in str(err):
            raise
        if repair:
            raise StoreError(f"no activation store at {cfg.store_url!r} to repair; run `saeworks "
                             "harvest CONFIG` without --repair to make one") from err
    except Exception as err:  # unreadable metadata
        raise StoreError(f"{cfg.store_url!r} exists but cannot be read as a store ({err}); "
                         "delete it or choose another harvest.store") from err
    else:
        mismatch = identity_mismatch(existing.attrs.get("identity", {}), identity)
        if mismatch:
            raise StoreError(
                f"store {cfg.store_url!r} was made with another configuration ({'; '.join(mismatch)}); "
                "choose another harvest.store or run_dir, or delete the old store"
            )
        if repair:
            repair_store(existing)
        log.info("resuming %s: %d of %d tokens done", existing.url,
                 existing.attrs.get("n_tokens_complete", 0), existing.n_tokens)
        return
    create_store(cfg.store_url, identity, geometry, {h.name: h.d for h in hooks},
                 cfg.harvest.store_dtype, cfg.harvest.compression,
                 {"model": identity["model"]["name"], "model_revision": identity["model"]["revision"],
                  "dataset": cfg.data.path, "tokenizer": identity["tokenizer"],
                  "excluded": {"first_positions": cfg.data.exclude_first_positions,
                               "token_ids": excluded_token_ids(tokenizer, cfg.data)}})


def _shards(windows: Iterator[np.ndarray], per_shard: int) -> Iterator[list[np.ndarray]]:
    while shard := list(islice(windows, per_shard)):
        yield shard


def _harvest_shards(store: ActivationStore, model: Any, hooks: list[HookPoint],
                    windows: Iterator[np.ndarray], rank: RankInfo, batch_size: int
                    ) -> tuple[list[int], int]:
    """Run this rank's unfinished shards; returns (shards written, windows in the dataset)."""
    geometry, done = store.geometry, store.shards_done()
    mine = [s for s in range(geometry.n_shards) if s % rank.world_size == rank.rank and not done[s]]
    todo_tokens = sum(len(geometry.shard_windows(s)) for s in mine) * geometry.context_size
    bar = tqdm(total=todo_tokens, unit="tok", unit_scale=True, disable=not rank.is_main,
               desc=f"harvest {len(mine)} shards")
    written: list[int] = []
    n_windows, pending = 0, None
    with ThreadPoolExecutor(max_workers=1) as writer:  # compress and write while the model runs
        for shard, shard_windows in enumerate(_shards(windows, geometry.windows_per_shard)):
            n_windows += len(shard_windows)
            if shard not in mine:
                continue
            token_ids = np.stack(shard_windows)  # [windows, context_size]
            activations = _run_shard(model, hooks, token_ids, store.store_dtype, rank, batch_size, bar)
            _wait(pending, store, rank)
            pending = writer.submit(write_shard, store, shard, activations, token_ids)
            written.append(shard)
        _wait(pending, store, rank)
    bar.close()
    return written, n_windows


def _wait(pending: Future | None, store: ActivationStore, rank: RankInfo) -> None:
    if pending is not None:
        pending.result()  # re-raises a failed write
        if rank.is_main:
            record_progress(store)
        fault_point("harvest:shard-written")


def _run_shard(model: Any, hooks: list[HookPoint], token_ids: np.ndarray, store_dtype: str,
               rank: RankInfo, batch_size: int, bar: tqdm) -> dict[str, np.ndarray]:
    """Activations `{hook: [windows * context_size, d]}` of one shard, in the store's dtype."""
    names = [h.name for h in hooks]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(token_ids), batch_size):
        batch = torch.from_numpy(token_ids[start:start + batch_size]).to(rank.device, torch.long)
        captured = capture_activations(model, batch, names)
        for hook in hooks:
            parts[hook.name].append(to_storable(captured[hook.name].reshape(-1, hook.d), store_dtype,
                                                hook.name))
        bar.update(batch.numel())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}

