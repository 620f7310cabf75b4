"""`train.source: model`: activations made on the fly by the model, never written to disk.

The same code as the harvester makes the rows: `iter_windows` packs the configured text into the
same deterministic window stream, `capture_activations` runs the model just far enough to read the
hooks (every hook of `train.hooks` from one forward pass; several hooks give `HooksBatch`es of the
same rows). Windows are grouped into blocks of `model_buffer_rows` rows (the bounded shuffle buffer);
block b belongs to rank b mod world size, as harvest shards do. A block's kept rows (excluded
positions and special tokens dropped) are shuffled by a permutation seeded by (reader seed,
epoch, rank, block), and batches are cut from the concatenation of the rank's shuffled blocks. The
position (epoch, block, rows taken from it) is a checkpoint's resume point: resuming recomputes
that one block and continues exactly. When the text runs out, the next epoch starts over with the
same windows and new row shuffles. A row's id is the store row it would have had:
window * context_size + position.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from itertools import islice
from typing import Any, NamedTuple

import numpy as np
import torch

from saeworks.activations.hooks import HookPoint, capture_activations, resolve_hook
from saeworks.activations.model import (
    check_context_size,
    load_model,
    load_tokenizer,
    resolve_source,
    with_resolved_dtype,
)
from saeworks.activations.multi_reader import HooksBatch
from saeworks.activations.reader import ReaderBatch
from saeworks.activations.text import DataError, excluded_token_ids, iter_windows
from saeworks.sae.distributed import RankInfo
from saeworks.train.config import TrainJob
from saeworks.train.data import SourceInfo, requested_hooks


class LoadedModel(NamedTuple):
    model: Any
    tokenizer: Any
    hooks: list[HookPoint]


def open_model(cfg: TrainJob, rank: RankInfo) -> tuple[LoadedModel, list[SourceInfo]]:
    """Load the model on this rank's device and bind the hooks (HookError lists the valid names)."""
    model_cfg = with_resolved_dtype(cfg.model, rank)  # the dtype loaded is the one recorded
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, rank.device)
    hooks = [resolve_hook(model, name) for name in requested_hooks(cfg.train, cfg.harvest.hooks[0])]
    check_context_size(model, cfg.data.context_size)
    data, reader = cfg.data, cfg.train.reader
    first = data.exclude_first_positions if reader.exclude_first_positions is None else \
        reader.exclude_first_positions
    special = excluded_token_ids(tokenizer, data) if reader.exclude_special_tokens else []
    source = resolve_source(model_cfg)
    return LoadedModel(model, tokenizer, hooks), [
        _info(cfg, hook, source.identity, model_cfg.dtype, first, special) for hook in hooks]


def _info(cfg: TrainJob, hook: HookPoint, source: dict[str, Any], dtype: str, first: int,
          special: list[int]) -> SourceInfo:
    data = cfg.data
    identity = {"model": {**source, "dtype": dtype}, "hook": hook.name,
                "dataset": {"path": data.path, "name": data.name, "split": data.split,
                            "text_field": data.text_field, "shuffle_seed": data.shuffle_seed,
                            "shuffle_buffer": data.shuffle_buffer, "prepend_bos": data.prepend_bos,
                             "holdout_fraction": data.holdout_fraction},
                "context_size": data.context_size, "excluded": [first, special]}
    metadata = {"model_name": source["name"], "hook_name": hook.name,
                "context_size": data.context_size, "prepend_bos": data.prepend_bos,
                "dataset_path": data.path, "exclude_special_tokens": special or False,
                "seqpos_slice": [first, None]}
    return SourceInfo(hook.name, hook.d, f"hook {hook.name} of model {cfg.model.name!r}", identity,
                      metadata)


class ModelSource:
    """This rank's shuffled rows of the model's activations at its hooks (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, info: SourceInfo, cfg: TrainJob, batch_size: int,
                 rank: RankInfo) -> None:
        self.loaded, self.cfg, self.batch_size, self.rank = loaded, cfg, batch_size, rank
        self.context = cfg.data.context_size
        self.windows_per_block = max(1, cfg.train.model_buffer_rows // self.context)
        self.first_positions, self.special = info.metadata["seqpos_slice"][0], info.identity["excluded"][1]
        self.seed = cfg.train.reader.seed
        self.position = (0, rank.rank, 0)  # (epoch, block, rows of that block already yielded)

    def state_dict(self) -> dict[str, Any]:
        epoch, block, offset = self.position
        return {"epoch": epoch, "block": block, "offset": offset, "world_size": self.rank.world_size,
                "batch_size": self.batch_size, "windows_per_block": self.windows_per_block}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        wrong = [k for k in ("world_size", "batch_size", "windows_per_block") if state.get(k) != mine[k]]
        if wrong:
            raise ValueError(f"model source state was saved with other {', '.join(wrong)}")
        self.position = (int(state["epoch"]), int(state["block"]), int(state["offset"]))

    def __iter__(self) -> Iterator[ReaderBatch | HooksBatch]:
        epoch, block, offset = self.position
        carry: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []  # a batch begun in an earlier block
        while True:
            blocks = 0
            for index, activations, rows in self._blocks(epoch, block):
                blocks += 1
                while offset < len(rows):
                    take = min(self.batch_size - sum(len(r) for _, r in carry), len(rows) - offset)
                    carry.append(({h: a[offset:offset + take] for h, a in activations.items()},
                                  rows[offset:offset + take]))
                    offset += take
                    if sum(len(r) for _, r in carry) == self.batch_size:
                        done = offset == len(rows)
                        self.position = (epoch, index + self.rank.world_size, 0) if done else \
                            (epoch, index, offset)
                        yield self._batch(carry)
                        carry = []
                offset = 0
            if blocks == 0 and block == self.rank.rank:
                raise DataError(f"data.path: dataset {self.cfg.data.path!r} has too few windows to "
                                f"give each of {self.rank.world_size} processes a block of "
                                f"{self.windows_per_block} windows; lower train.model_buffer_rows")
            epoch, block = epoch + 1, self.rank.rank

    def _batch(self, carry: list[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> ReaderBatch | HooksBatch:
        """A batch from its pieces: a `ReaderBatch` of the one hook, or a `HooksBatch` of several."""
        rows = torch.cat([r for _, r in carry])
        activations = {hook.name: torch.cat([a[hook.name] for a, _ in carry]) for hook in self.loaded.hooks}
        if len(activations) == 1:
            return ReaderBatch(next(iter(activations.values())), rows)
        return HooksBatch(activations, rows)

    def _blocks(self, epoch: int, first: int) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor]]:
        """(block index, per hook [kept rows, d] shuffled activations, [kept rows] row ids) of this
        rank's blocks from block `first` on."""
        windows = iter_windows(self.loaded.tokenizer, self.cfg.data, sys.maxsize)
        index = 0
        while block := list(islice(windows, self.windows_per_block)):
            if index >= first and index % self.rank.world_size == self.rank.rank:
                yield index, *self._block_rows(epoch, index, np.stack(block))
            index += 1

    def _block_rows(self, epoch: int, index: int, token_ids: np.ndarray
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        model, hooks, device = self.loaded.model, self.loaded.hooks, self.rank.device
        names = [hook.name for hook in hooks]
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        step = self.cfg.harvest.batch_size  # windows per forward pass, as the harvester
        for start in range(0, len(token_ids), step):
            ids = torch.from_numpy(token_ids[start:start + step]).to(device, torch.long)
            captured = capture_activations(model, ids, names)  # one forward for every hook
            for hook in hooks:
                parts[hook.name].append(captured[hook.name].reshape(-1, hook.d))
        keep = (np.arange(token_ids.size) % self.context >= self.first_positions) & \
            ~np.isin(token_ids.reshape(-1), np.asarray(self.special, dtype=np.int64))
        kept = np.flatnonzero(keep)
        kept = kept[np.random.default_rng([self.seed, epoch, self.rank.rank, index]).permutation(len(kept))]
        rows = torch.from_numpy(kept + index * self.windows_per_block * self.context)
        picked = torch.from_numpy(kept).to(device)
        return {name: torch.cat(parts[name])[picked] for name in names}, rows  # [kept, d] per hook
