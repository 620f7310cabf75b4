"""Shuffled batches of several hooks' activations at once: one read of the store per block.

`MultiHookReader` is an `ActivationReader` (same schedule, same rows, same shuffle, same state
positions: see activations/reader.py) whose block buffer holds the hooks side by side, columns
[d_0 | d_1 | ...]: each block's chunks are decoded once per hook into that hook's columns, the
shuffled rows are gathered once for all hooks together, and each batch is handed on as a
`HooksBatch` holding every hook's `[batch, d_h]` slice of the same rows. So training SAEs on H hooks
costs one pass over the rows instead of H, and every hook sees the batch a single-hook reader of
that hook would give (the schedule depends on the store, the seed, the rank and the world size,
never on the hook).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import zarr
from zarr.core.buffer.cpu import NDBuffer

from saeworks.activations.config import ReaderConfig
from saeworks.activations.reader import ActivationReader
from saeworks.activations.store import ActivationStore, StoreError


class HooksBatch(NamedTuple):
    """One training batch of several hooks: the same rows of each."""

    activations: dict[str, torch.Tensor]
    """Per hook, [batch, d_hook] in the stored dtype."""
    rows: torch.Tensor
    """[batch] int64: the global store row of each activation row."""


class _HookColumns:
    """Stands in for the reader's one zarr array: a read of rows [start, stop) decodes every hook's
    array into its own columns of the output buffer (each hook's damage named by `reading`)."""

    def __init__(self, store: ActivationStore, hooks: list[str], widths: list[int]) -> None:
        self.store, self.hooks = store, hooks
        self.arrays: list[zarr.Array] = [store.array(hook) for hook in hooks]
        self.columns = np.cumsum([0, *widths]).tolist()  # hook i: columns [columns[i], columns[i+1])
        self.dtype = self.arrays[0].dtype

    def get_basic_selection(self, selection: slice, out: NDBuffer) -> None:
        buffer = out.as_numpy_array()  # [stop - start, sum of d], a view of the reader's buffer
        for hook, array, lo, hi in zip(self.hooks, self.arrays, self.columns, self.columns[1:],
                                       strict=False):
            with self.store.reading(hook, selection.start, selection.stop):  # StoreError if damaged
                array.get_basic_selection(selection, out=NDBuffer.from_numpy_array(buffer[:, lo:hi]))


class MultiHookReader(ActivationReader):
    """Shuffled `HooksBatch`es of `hooks` for one rank (see the module docstring)."""

    def __init__(self, store: ActivationStore, hooks: Sequence[str], cfg: ReaderConfig, rank: int = 0,
                 world_size: int = 1, epochs: int | None = None) -> None:
        hooks = list(hooks)
        if not hooks:
            raise ValueError("MultiHookReader needs at least one hook")
        unknown = [hook for hook in hooks if hook not in store.hooks]
        if unknown:
            raise StoreError(f"store {store.url!r} has no hook {unknown[0]!r}; it holds "
                             f"{', '.join(store.hooks)}")
        super().__init__(store, hooks[0], cfg, rank, world_size, epochs)
        self.hooks = hooks
        self.widths = [store.d(hook) for hook in hooks]
        self.array = _HookColumns(store, hooks, self.widths)  # type: ignore[assignment]

    @property
    def d(self) -> int:
        """Width of the block buffer: every hook's columns."""
        return sum(self.widths)

    def __iter__(self) -> Iterator[HooksBatch]:  # type: ignore[override]
        columns = np.cumsum([0, *self.widths]).tolist()
        for batch in super().__iter__():
            both = batch.activations  # [batch, sum of d]
            yield HooksBatch({hook: both[:, lo:hi] for hook, lo, hi
                              in zip(self.hooks, columns, columns[1:], strict=False)}, batch.rows)

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "hook": list(self.hooks)}
