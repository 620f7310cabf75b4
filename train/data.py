"""Where training batches come from, and what is estimated once from the first of them.

The trainer sees a `BatchSource`: an iterable of `ReaderBatch`es (this process's share of each
step), or of `HooksBatch`es when several hooks are trained (`train.hooks`: the same rows of every
hook, from one read), that can report and restore its position. `ActivationReader` and
`MultiHookReader` are such sources; `ModelSource` (train/model_source.py) runs the model on the
fly; tests pass their own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from saeworks.activations.multi_reader import HooksBatch, MultiHookReader
from saeworks.activations.reader import ActivationReader, ReaderBatch
from saeworks.activations.store import ActivationStore, StoreError
from saeworks.sae.distributed import RankInfo, all_gather_rows
from saeworks.sae.geometric_median import geometric_median
from saeworks.train.config import TrainConfig, TrainJob
from saeworks.train.errors import TrainingDivergedError


class BatchSource(Protocol):
    """This process's batches, in order, with a position that a checkpoint saves and restores."""

    def __iter__(self) -> Iterator[ReaderBatch | HooksBatch]: ...

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


def requested_hooks(cfg: TrainConfig, default: str) -> list[str]:
    """The hooks a run trains: `train.hooks`, else [`train.hook`], else [`default`]."""
    return list(cfg.hooks) if cfg.hooks is not None else [cfg.hook or default]


def batch_inputs(activations: torch.Tensor | Mapping[str, torch.Tensor], hooks: list[str]
                 ) -> dict[str, torch.Tensor]:
    """Per hook, this batch's `[rows, d]` activations: a `HooksBatch`'s, or the one tensor of a
    single-hook `ReaderBatch` (which only a one-hook run accepts)."""
    if isinstance(activations, torch.Tensor):
        if len(hooks) != 1:
            raise ValueError(f"the batch source gives one hook's activations; training "
                             f"{len(hooks)} hooks ({', '.join(hooks)}) needs HooksBatches of each")
        return {hooks[0]: activations}
    missing = [hook for hook in hooks if hook not in activations]
    if missing:
        raise ValueError(f"the batch source gives no activations of {', '.join(missing)}; it "
                         f"gives {', '.join(activations)}")
    return {hook: activations[hook] for hook in hooks}


def open_store(cfg: TrainJob) -> tuple[ActivationStore, list[SourceInfo]]:
    """Open `train.store` (default: the run's store), check it is complete (or, with
    `train.reader.stream`, at least created: the reader waits for its shards) and has the hooks."""
    url = cfg.train.store or cfg.store_url
    store = ActivationStore.open(url)
    if not cfg.train.reader.stream:
        try:
            store.require_complete()
        except StoreError as err:
            if store.complete:  # damaged, not unfinished
                raise
            raise StoreError(f"{err}; or, to train while the harvest writes it, set "
                             "train.reader.stream=true") from None
    hooks = requested_hooks(cfg.train, store.hooks[0])
    field = "train.hooks" if cfg.train.hooks is not None else "train.hook"
    for hook in hooks:
        if hook not in store.hooks:
            raise StoreError(f"store {url!r} has no hook {hook!r} ({field}); it holds "
                             f"{', '.join(store.hooks)}")
    return store, [_store_info(cfg, store, url, hook) for hook in hooks]


def _store_info(cfg: TrainJob, store: ActivationStore, url: str, hook: str) -> SourceInfo:
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
    if cfg.train.reader.stream:  # without n_windows, which finalize may lower (activations/reader.py)
        identity["geometry"] = {k: v for k, v in store.attrs["geometry"].items() if k != "n_windows"}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    info = SourceInfo(hook, store.d(hook), f"hook {hook} of store {url!r}",
                      {"store": digest[:16], "hook": hook}, metadata)
    return info


def store_reader(store: ActivationStore, infos: list[SourceInfo], cfg: TrainJob, local_batch: int,
                 rank: RankInfo) -> ActivationReader:
    """This rank's partition of the store, in batches of `local_batch` rows (of every hook of
    `infos` at once when there are several)."""
    reader_cfg = replace(cfg.train.reader, batch_size=local_batch)
    try:
        if len(infos) > 1:
            return MultiHookReader(store, [info.hook for info in infos], reader_cfg, rank.rank,
                                   rank.world_size)
        return ActivationReader(store, infos[0].hook, reader_cfg, rank.rank, rank.world_size)
    except ValueError as err:  # too few rows for the batch size and world size
        raise StoreError(str(err)) from err


def initial_sample(source: BatchSource, n_batches: int, device: torch.device, hooks: list[str],
                   group: Any = None) -> tuple[dict[str, torch.Tensor], ReplayedStart]:
    """Per hook, [n_batches * batch_size, d_in] float32: the first global batches, gathered in rank
    order so every rank holds the same rows; and the source to train from, which hands this
    rank's first `n_batches` batches over again before the rest (`ReplayedStart`: the start of the
    stream is read once). `group`: the ranks that read different rows (latent sharding: one rank
    of each replica)."""
    states = [source.state_dict()]
    batches = iter(source)
    held: list[ReaderBatch | HooksBatch] = []
    try:
        with _back_to_back(source):
            for _ in range(n_batches):
                held.append(next(batches))
                states.append(source.state_dict())
        samples = {}
        for hook in hooks:  # every rank gathers every hook, in the same order
            parts = [batch_inputs(batch.activations, hooks)[hook].to(device).float() for batch in held]
            sample = all_gather_rows(torch.cat(parts), group)
            if not torch.isfinite(sample).all():
                raise TrainingDivergedError(f"the first {len(sample)} training rows of {hook} hold "
                                            "NaN/Inf activations; the data is corrupt")
            samples[hook] = sample
    except BaseException:
        close_batches(batches)
        raise
    return samples, ReplayedStart(source, batches, held, states)


def _back_to_back(source: BatchSource) -> AbstractContextManager[None]:
    """The source's `back_to_back()` where it has one (a store reader: its read-ahead then does
    not take the sample's quick reads for the training pace), else nothing."""
    back_to_back = getattr(source, "back_to_back", None)
    return back_to_back() if back_to_back is not None else nullcontext()


class ReplayedStart:
    """A `BatchSource` whose first batches were already read (the initial sample), with the
    iterator that read them still open: iterating it hands those batches over again, then goes on
    with that iterator. Rewinding the source instead would read and decode the start of the stream
    a second time (a whole shuffle block of the store reader: ~1 s on the demo's 2-core VM, waited
    for before the first step). While the held batches are handed on, `state_dict()` is the state
    the source reported after the same number of batches when they were first read, so a
    checkpoint among them resumes exactly; after them it is the source's own. `load_state_dict`
    drops the held batches and repositions the source itself."""

    def __init__(self, source: BatchSource, batches: Iterator[ReaderBatch | HooksBatch],
                 held: list[ReaderBatch | HooksBatch], states: list[dict[str, Any]]) -> None:
        self.source = source
        self._rest: Iterator[ReaderBatch | HooksBatch] | None = batches
        self._held = held
        self._states = states  # [len(held) + 1]: before the first held batch, after each
        self._handed = 0

    def __iter__(self) -> Iterator[ReaderBatch | HooksBatch]:
        if self._rest is None:  # already handed on, or dropped: the source from where it is
            return iter(self.source)
        rest, self._rest = self._rest, None
        return self._replay(rest)

    def _replay(self, rest: Iterator[ReaderBatch | HooksBatch]) -> Iterator[ReaderBatch | HooksBatch]:
        try:
            while self._held:
                batch = self._held.pop(0)
                self._handed += 1
                yield batch
            self._states = []  # the source's own position is the stream's from here on
            yield from rest
        finally:
            close_batches(rest)
            self._release()

    def _release(self) -> None:
        """Drop the held batches; stopped among them, the source (which read past them) is put
        back at the position after those handed on, so it reports and continues from there."""
        if self._states:
            self.source.load_state_dict(self._states[self._handed])
        self._held, self._states = [], []

    def state_dict(self) -> dict[str, Any]:
        return self._states[self._handed] if self._states else self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._rest is not None:
            close_batches(self._rest)
        self._rest, self._held, self._states = None, [], []
        self.source.load_state_dict(state)

    def close(self) -> None:
        """Stop the held iterator (its reading thread) without training from it: the source is
        left at the position before the held batches."""
        if self._rest is not None:
            close_batches(self._rest)
            self._rest = None
            self._release()


def close_batches(batches: Iterator[Any]) -> None:
    """Stop an iterator of batches that can be stopped (a reader's: its loading thread)."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


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
