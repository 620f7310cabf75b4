"""Sequential reading of a store's kept rows, in order: what evaluation and feature analysis read.

Training reads shuffled batches (activations/reader.py); evaluation and analysis want every kept
row once, in store order, with its row index (to trace an activation back to its window and
position). The same rows are kept as in training: positions before `first_positions` and rows of
the store's special tokens are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from saeworks.activations.store import TOKEN_IDS, ActivationStore, StoreError, to_tensor


class RowBatch(NamedTuple):
    """Consecutive kept rows of one hook."""

    activations: torch.Tensor
    """[rows, d] float32."""
    rows: torch.Tensor
    """[rows] int64: global store row of each (window = row // context, position = row % context)."""


@dataclass(frozen=True)
class RowSelection:
    """Which rows of a store are read: the store's exclusions, and a cap on how many."""

    first_positions: int
    special_token_ids: tuple[int, ...]
    max_rows: int | None = None

    @classmethod
    def of_store(cls, store: ActivationStore, max_rows: int | None = None,
                 exclude_special_tokens: bool = True) -> RowSelection:
        """The exclusions the store was harvested with (as training applied them)."""
        excluded = store.attrs.get("excluded", {})
        special = tuple(int(t) for t in excluded.get("token_ids", [])) if exclude_special_tokens else ()
        return cls(int(excluded.get("first_positions", 0)), special, max_rows)


def iter_kept_rows(store: ActivationStore, hook: str, selection: RowSelection, batch_rows: int,
                   read_rows: int = 65_536) -> Iterator[RowBatch]:
    """Kept rows of `hook` in store order, in batches of exactly `batch_rows` (the last smaller),
    at most `selection.max_rows` in all. Reads `read_rows` rows of the store at a time."""
    store.require_complete()
    if hook not in store.hooks:
        raise StoreError(f"store {store.url!r} has no hook {hook!r}; it holds {', '.join(store.hooks)}")
    context, n_tokens = store.context_size, store.n_tokens
    excluded = np.asarray(selection.special_token_ids, dtype=np.int64)
    limit = selection.max_rows if selection.max_rows is not None else n_tokens
    pending_x: list[torch.Tensor] = []
    pending_rows: list[torch.Tensor] = []
    held = emitted = 0
    read_rows = max(read_rows, batch_rows)
    for start in range(0, n_tokens, read_rows):
        stop = min(start + read_rows, n_tokens)
        row_ids = np.arange(start, stop)
        keep = row_ids % context >= selection.first_positions
        if excluded.size:
            keep &= ~np.isin(store.read(TOKEN_IDS, start, stop), excluded)
        kept = row_ids[keep][: limit - emitted - held]
        if kept.size == 0:
            continue
        block = to_tensor(store.read(hook, start, stop), store.store_dtype)[torch.from_numpy(kept - start)]
        pending_x.append(block.float())
        pending_rows.append(torch.from_numpy(kept.astype(np.int64)))
        held += kept.size
        while held >= batch_rows:
            x, rows = torch.cat(pending_x), torch.cat(pending_rows)
            yield RowBatch(x[:batch_rows], rows[:batch_rows])
            pending_x, pending_rows = [x[batch_rows:]], [rows[batch_rows:]]
            held -= batch_rows
            emitted += batch_rows
        if emitted + held >= limit:
            break
    if held:
        yield RowBatch(torch.cat(pending_x), torch.cat(pending_rows))
