"""Where training batches come from, and what is estimated once from the first of them.

The trainer sees a `BatchSource`: an iterable of `ReaderBatch`es (this process's share of each
step) that can report and restore its position. `ActivationReader` is one; `ModelSource`
(train/model_source.py) runs the model on the fly; tests pass their own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from saeworks.activations.reader import ActivationReader, ReaderBatch
from saeworks.activations.store import ActivationStore, StoreError
from saeworks.sae.distributed import RankInfo, all_gather_rows
from saeworks.sae.geometric_median import geometric_median
from saeworks.train.config import TrainJob
from saeworks.train.errors import TrainingDivergedError


class BatchSource(Protocol):
    """This process's batches, in order, with a position that a checkpoint saves and restores."""

    def __iter__(self) -> Iterator[ReaderBatch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class SourceInfo:
    """What the trainer needs to know about the data before reading it."""

    hook: str
    d_in: int
    name: str
    """How errors refer to it, e.g. `hook blocks.3.hook_resid_post of store runs/x/activations.zarr`."""
    identity: dict[str, Any]
    """What decides the rows' values: a checkpoint resumes only on data with the same."""
    metadata: dict[str, Any]
    """SAELens `metadata` of the saved SAEs (model_name, hook_name, context_size, ...)."""


def open_store(cfg: TrainJob) -> tuple[ActivationStore, SourceInfo]:
    """Open `train.store` (default: the run's store), check it is complete and has the hook."""
    url = cfg.train.store or cfg.store_url
    store = ActivationStore.open(url)
    store.require_complete()
    hook = cfg.train.hook or store.hooks[0]
    if hook not in store.hooks:
        raise StoreError(f"store {url!r} has no hook {hook!r} (train.hook); it holds "
                         f"{', '.join(store.hooks)}")
    attrs, excluded = store.attrs, store.attrs.get("excluded", {})
    first = cfg.train.reader.exclude_first_positions
    first = int(excluded.get("first_positions", 0)) if first is None else first
    metadata = {
        "model_name": attrs.get("model"), "hook_name": hook, "context_size": store.context_size,
        "prepend_bos": attrs.get("identity", {}).get("dataset", {}).get("prepend_bos", True),
        "dataset_path": attrs.get("dataset"),
        "exclude_special_tokens": list(excluded.get("token_ids", []))
        if cfg.train.reader.exclude_special_tokens else False,
        "seqpos_slice": [first, None],
    }
    identity = {key: attrs.get(key) for key in ("identity", "geometry", "store_dtype", "d")}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    info = SourceInfo(hook, store.d(hook), f"hook {hook} of store {url!r}",
                      {"store": digest[:16], "hook": hook}, metadata)
    return store, info


def store_reader(store: ActivationStore, info: SourceInfo, cfg: TrainJob, local_batch: int,
                 rank: RankInfo) -> ActivationReader:
    """This rank's partition of the store, in batches of `local_batch` rows."""
    reader_cfg = replace(cfg.train.reader, batch_size=local_batch)
    try:
        return ActivationReader(store, info.hook, reader_cfg, rank.rank, rank.world_size)
    except ValueError as err:  # too few rows for the batch size and world size
        raise StoreError(str(err)) from err


def initial_sample(source: BatchSource, n_batches: int, device: torch.device) -> torch.Tensor:
    """[n_batches * batch_size, d_in] float32: the first global batches, gathered in rank order
    so every rank holds the same rows; the source is rewound to where it was."""
    state = source.state_dict()
    batches = iter(source)
    try:
        local = torch.cat([next(batches).activations.to(device).float() for _ in range(n_batches)])
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    source.load_state_dict(state)
    sample = all_gather_rows(local)
    if not torch.isfinite(sample).all():
        raise TrainingDivergedError(f"the first {len(sample)} training rows hold NaN/Inf "
                                    "activations; the data is corrupt")
    return sample


def input_scale(sample: torch.Tensor) -> float:
    """The constant that makes the mean squared norm of the rows equal to d_in."""
    mean_sq = sample.double().pow(2).sum(dim=1).mean()
    return float((sample.shape[1] / mean_sq.clamp_min(1e-30)).sqrt())


def initial_b_dec(sample: torch.Tensor, method: str) -> torch.Tensor:
    """[d_in] decoder bias from the scaled sample: its geometric median, its mean, or zeros."""
    if method == "zeros":
        return sample.new_zeros(sample.shape[1])
    if method == "mean":
        return sample.double().mean(dim=0).float()
    return geometric_median(sample).float()
