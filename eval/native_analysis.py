"""The feature analysis' per-entry bookkeeping as native kernels (eval/kernels/analysis_tables.c).

Why: after the encoder, analysis spent its time in a dozen torch ops over every non-zero
activation of a batch (boolean filters, bincount, index_add_, the float keys, the band test, the
sample hash) and in SlotTable merges that sort every affected group's slots with the candidates:
18 + 18 ms a batch in steady state, 100-240 ms in the first batches, against a 280-330 ms encoder
matmul (demo SAE, 4,096 rows, 2 threads). One serial C pass does each in well under a millisecond.

Each function answers None where its kernel does not apply (tensors not on the CPU, other dtypes,
no C compiler, SAEWORKS_NATIVE=0); eval/analysis.py then runs its torch ops, with the same result
bit for bit (tests/test_analysis.py compares the whole analysis both ways).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, NamedTuple

import torch

from saeworks.sae import native

KERNELS_DIR = Path(__file__).parent / "kernels"
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
SIGNATURES: dict[str, list[Any]] = {
    "top_stats": [_PTR, _PTR, _PTR, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR],
    "band_candidates": [_PTR, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _I64,
                        _PTR, _I64, _PTR, _PTR, _PTR, _PTR],
    "slot_offer": [_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR],
}


class Entries(NamedTuple):
    """A batch's non-zero activations (EncodedBatch's arrays) and which batch rows are analysed."""

    local: torch.Tensor
    """[nnz] int64 row within the batch."""
    features: torch.Tensor
    """[nnz] int64 latent."""
    values: torch.Tensor
    """[nnz] float32 activation."""
    keep: torch.Tensor
    """[rows] bool."""


def _library(*tensors: torch.Tensor) -> Any:
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    return native.library("analysis_tables", KERNELS_DIR, SIGNATURES)


def _entries_apply(entries: Entries) -> bool:
    return (entries.local.dtype == torch.int64 and entries.features.dtype == torch.int64
            and entries.values.dtype == torch.float32 and entries.keep.dtype == torch.bool)


def _checked(found: int, what: str) -> int:
    if found < 0:
        raise IndexError(f"{what}: a row or latent index is out of range")
    return found


def top_stats(entries: Entries, count: torch.Tensor, sum_: torch.Tensor, max_: torch.Tensor,
              worst_keys: torch.Tensor) -> torch.Tensor | None:
    """Pass 1 on the analysed entries: count [d_sae] int64 += 1, sum [d_sae] float64 += value, max
    [d_sae] float32 = max(max, value), in place; returns [m] int64 the entries whose descending key
    is below their latent's worst key (worst_keys [d_sae]), in entry order. None: not applicable."""
    if not _entries_apply(entries) or count.dtype != torch.int64 or sum_.dtype != torch.float64 \
            or max_.dtype != torch.float32 or worst_keys.dtype != torch.int64:
        return None
    lib = _library(*entries, count, sum_, max_, worst_keys)
    if lib is None:
        return None
    candidates = torch.empty(entries.values.shape[0], dtype=torch.int64)
    found = _checked(lib.top_stats(
        entries.local.data_ptr(), entries.features.data_ptr(), entries.values.data_ptr(),
        entries.values.shape[0], entries.keep.data_ptr(), entries.keep.shape[0], count.shape[0],
        count.data_ptr(), sum_.data_ptr(), max_.data_ptr(), worst_keys.data_ptr(), candidates.data_ptr()),
        "top_stats")
    return candidates[:found]


class BandCandidates(NamedTuple):
    """Pass 2's candidates for the band tables."""

    entries: torch.Tensor
    """[m] int64 index into the batch's entries, ascending."""
    groups: torch.Tensor
    """[m] int64 latent * bands + band."""
    keys: torch.Tensor
    """[m] int64 sample key."""


def band_candidates(entries: Entries, start: int, max_: torch.Tensor, fine: torch.Tensor,
                    inner_edges: torch.Tensor, top_rows: torch.Tensor, worst_keys: torch.Tensor
                    ) -> BandCandidates | None:
    """Pass 2 on the analysed entries: fine [d_sae, S] int64 histogram counts added in place; the
    entries whose sample key beats their band's worst key (worst_keys [d_sae * bands]) and whose
    store row (start + row) is not among their latent's top rows (top_rows [d_sae, top_n]).
    None: not applicable."""
    if not _entries_apply(entries) or max_.dtype != torch.float32 or fine.dtype != torch.int64 \
            or inner_edges.dtype != torch.float32 or top_rows.dtype != torch.int64 \
            or worst_keys.dtype != torch.int64:
        return None
    lib = _library(*entries, max_, fine, inner_edges, top_rows, worst_keys)
    if lib is None:
        return None
    n = entries.values.shape[0]
    found_entries, groups, keys = (torch.empty(n, dtype=torch.int64) for _ in range(3))
    found = _checked(lib.band_candidates(
        entries.local.data_ptr(), entries.features.data_ptr(), entries.values.data_ptr(), n,
        entries.keep.data_ptr(), entries.keep.shape[0], start, max_.shape[0], max_.data_ptr(),
        fine.shape[1], fine.data_ptr(), inner_edges.data_ptr(), inner_edges.shape[0] + 1,
        top_rows.data_ptr(), top_rows.shape[1], worst_keys.data_ptr(), found_entries.data_ptr(),
        groups.data_ptr(), keys.data_ptr()), "band_candidates")
    return BandCandidates(found_entries[:found], groups[:found], keys[:found])


def slot_offer(groups: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, table_keys: torch.Tensor,
               table_rows: torch.Tensor, worst_keys: torch.Tensor, owner: torch.Tensor
               ) -> torch.Tensor | None:
    """Merge candidates (groups, keys, rows [n] int64) into [groups, slots] tables: per group the
    `slots` smallest (key, row) pairs stay, an equal pair keeps the one already there; table_keys,
    table_rows and worst_keys updated in place; owner: [groups, slots] int64 scratch, all -1.
    Returns [n] int64: the slot each candidate holds now, -1 if none. None: not applicable."""
    if any(t.dtype != torch.int64 for t in (groups, keys, rows, table_keys, table_rows, worst_keys, owner)):
        return None
    lib = _library(groups, keys, rows, table_keys, table_rows, worst_keys, owner)
    if lib is None:
        return None
    slot_of = torch.empty(groups.shape[0], dtype=torch.int64)
    _checked(lib.slot_offer(groups.data_ptr(), keys.data_ptr(), rows.data_ptr(), groups.shape[0],
                            table_keys.shape[0], table_keys.shape[1], table_keys.data_ptr(),
                            table_rows.data_ptr(), worst_keys.data_ptr(), owner.data_ptr(),
                            slot_of.data_ptr()), "slot_offer")
    return slot_of
