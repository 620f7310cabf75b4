"""Shared by the training tests: a small synthetic store an SAE can learn, configs, batch sources."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeworks.activations.reader import ReaderBatch
from saeworks.activations.store import ActivationStore, StoreGeometry, create_store, finalize, write_shard
from saeworks.run_config import RunConfig
from saeworks.sae.configio import load_config
from tests.helpers import REPO

HOOK = "blocks.0.hook_resid_post"
CONTEXT, D_IN, N_FEATURES = 32, 32, 96
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def synthetic_activations(n_rows: int, seed: int = 0) -> np.ndarray:
    """[n_rows, D_IN] float32: ~4 of N_FEATURES random unit directions per row, an offset, noise."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(N_FEATURES, D_IN))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    codes = (rng.random((n_rows, N_FEATURES)) < 4 / N_FEATURES) * rng.exponential(3.0, (n_rows, N_FEATURES))
    return (codes @ directions + 0.05 * rng.normal(size=(n_rows, D_IN)) + 1.0).astype(np.float32)


def make_store(path: Path, n_windows: int = 256, complete: bool = True,
               poison_rows: slice | None = None) -> ActivationStore:
    """A float32 store of one hook (8 windows per chunk); rows at position 0 and token 0 excluded."""
    geometry = StoreGeometry.plan(n_windows, CONTEXT, chunk_tokens=256, chunks_per_shard=4)
    identity = {"test": "synthetic", "dataset": {"prepend_bos": True}}
    store = create_store(str(path), identity, geometry, {HOOK: D_IN}, "float32", "zstd",
                         {"model": "synthetic-model", "dataset": "synthetic-text",
                          "excluded": {"first_positions": 1, "token_ids": [0]}})
    values = synthetic_activations(geometry.n_tokens)
    if poison_rows is not None:
        values[poison_rows] = np.nan
    token_ids = np.random.default_rng(1).integers(1, 100, (n_windows, CONTEXT), dtype=np.int32)
    token_ids[:, 0] = 0
    for shard in range(geometry.n_shards if complete else geometry.n_shards - 1):
        windows = geometry.shard_windows(shard)
        rows = slice(windows.start * CONTEXT, windows.stop * CONTEXT)
        write_shard(store, shard, {HOOK: values[rows]}, token_ids[windows.start:windows.stop])
    if complete:
        finalize(store, n_windows)
    return ActivationStore.open(str(path))


def train_overrides(run_dir: Path, store: Path, **extra: object) -> list[str]:
    """A quick TopK run: 256-row batches, 64 latents, no wandb, mean b_dec init."""
    settings: dict[str, object] = {
        "run_dir": run_dir,
        "train.store": store,
        "train.saes": "[{k: 4, d_sae: 64}]",
        "train.total_tokens": 256 * 40,
        "train.batch_size": 256,
        "train.lr": 1e-2,
        "train.init_sample_rows": 256,
        "train.log_every_steps": 10,
        "train.wandb": "false",
        "train.device": "cpu",
        "train.reader.buffer_chunks": 4,
        "train.b_dec_init": "mean",
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def config(run_dir: Path, store: Path, **extra: object) -> RunConfig:
    return load_config(RunConfig, None, train_overrides(run_dir, store, **extra))


def sae_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "sae_weights.safetensors"))


class Concatenated:
    """Several readers' batches side by side, in order: W ranks' batches as one process's batch."""

    def __init__(self, sources: list[Any]) -> None:
        self.sources = sources

    def __iter__(self):  # type: ignore[no-untyped-def]
        for parts in zip(*self.sources, strict=False):
            yield ReaderBatch(torch.cat([p.activations for p in parts]), torch.cat([p.rows for p in parts]))

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for source, part in zip(self.sources, state["parts"], strict=True):
            source.load_state_dict(part)


class Recording:
    """A batch source that remembers the rows it handed out (and can act after N batches)."""

    def __init__(self, source: Any, after: int | None = None, action: Any = None) -> None:
        self.source, self.rows, self.after, self.action = source, [], after, action
        self.yielded = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.rows, self.yielded = [], 0  # the last iteration is training's (the first, the sample's)
        for batch in self.source:
            self.rows.append(batch.rows.clone())
            self.yielded += 1
            if self.action is not None and self.yielded == self.after:
                self.action()
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return dict(self.source.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


__all__ = ["CONTEXT", "D_IN", "HOOK", "REPO", "TORCHRUN"]
