"""Checking a store chunk by chunk (`saeworks verify STORE`), and marking its damage for repair
(`saeworks harvest CONFIG --repair`).

`verify_store` decodes every chunk of every array of the store's finished shards (all shards of a
complete store) and checks, per array:
  - the metadata: each array's zarr.json opens and its shape, chunks, shards and dtype are the
    ones the store's geometry says (damage there cannot be repaired in place);
  - every finished shard has its file, and the file's index matches its CRC32C;
  - every chunk decodes: its own CRC32C (stores written with chunk checksums), then the
    decompressor;
  - the values: hook activations are finite; token ids lie in [0, vocabulary size); `window` and
    `position` are row // context_size and row % context_size;
  - the done flags: each decodes and is 0 or 1, a complete store has all of them set, and
    `n_tokens_complete` is what they add up to.
Stores written before chunk checksums are verified the same way, without the per-chunk CRC32C:
a flipped bit inside one of their chunks is found only when it breaks decoding or a value check.

`repair_store` runs the same checks and clears the done flag of every shard holding a damaged
chunk (of any array), then marks the store incomplete: the harvester's ordinary resume recomputes
exactly those shards and rewrites nothing else, so the repaired store is the uninterrupted one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saeworks.activations.store import (
    DECODE_ERRORS,
    INDEX_ARRAYS,
    POSITION,
    SHARD_DONE,
    TOKEN_IDS,
    WINDOW,
    ActivationStore,
    Damage,
    StoreMetadataError,
    decode_failure,
    has_chunk_checksums,
    record_progress,
    shard_file_problem,
)

log = logging.getLogger(__name__)

EXIT_DAMAGED = 1
"""`saeworks verify`'s exit status when it found damage (2 stays the status of user errors)."""
_NON_FINITE_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}  # exponent all ones: inf or NaN


@dataclass
class VerifyReport:
    """What `verify_store` found: damage per chunk, metadata it cannot vouch for, and coverage."""

    url: str
    damage: list[Damage] = field(default_factory=list)
    unrepairable: list[str] = field(default_factory=list)
    """Damaged metadata (zarr.json): not repairable in place."""
    problems: list[str] = field(default_factory=list)
    """Store-level inconsistencies that a repair rewrites (the progress count)."""
    checksummed: bool = True
    """Every chunk carries a CRC32C (False for stores written before chunk checksums)."""
    complete: bool = False
    tokens_complete: int = 0
    n_tokens: int = 0
    n_shards: int = 0
    shards_checked: int = 0
    chunks_checked: int = 0

    @property
    def damaged_shards(self) -> list[int]:
        """Shards holding at least one damaged chunk: the ones a repair recomputes."""
        return sorted({d.shard for d in self.damage})

    @property
    def ok(self) -> bool:
        return not (self.damage or self.unrepairable or self.problems)

    def lines(self) -> list[str]:
        """The report for a terminal: damage one line each, then a summary and what to do."""
        out = [f"unrepairable: {line}" for line in self.unrepairable]
        out += [f"damaged: {d.describe()}" for d in self.damage]
        out += [f"inconsistent: {line}" for line in self.problems]
        if self.unrepairable:
            return out
        if not self.checksummed:
            out.append("note: this store carries no chunk checksums (written before saeworks added "
                       "them): a flipped bit inside a chunk that still decodes cannot be detected; "
                       "checked instead: shard index checksums, that every chunk decodes, finite "
                       "values, and the index arrays")
        if not self.complete:
            out.append(f"incomplete: {self.tokens_complete} of {self.n_tokens} tokens harvested; only "
                       "finished shards were checked; rerun the same `saeworks harvest` to resume")
        scope = f"{self.shards_checked} of {self.n_shards} shards, {self.chunks_checked} chunks"
        if self.ok:
            out.append(f"ok: {self.url}: no damage found in {scope}")
        else:
            shards = self.damaged_shards
            out.append(f"damage found in {self.url}: {len(self.damage)} damaged piece(s) in "
                       f"{len(shards)} shard(s) {shards} ({scope} checked); repair: `saeworks harvest "
                       "CONFIG --repair` with the config that made the store recomputes exactly "
                       "those shards")
        return out


def verify_store(url: str, progress: bool = True) -> VerifyReport:
    """Check every chunk of the store at `url` (see the module docstring). A missing or foreign
    store is a StoreError; damaged metadata is reported, not raised."""
    try:
        store = ActivationStore.open(url)
    except StoreMetadataError as err:
        return VerifyReport(url, unrepairable=[str(err)])
    return check_store(store, progress)


def check_store(store: ActivationStore, progress: bool = True) -> VerifyReport:
    """`verify_store` on an opened store."""
    geometry = store.geometry
    report = VerifyReport(store.url, complete=store.complete, n_tokens=store.n_tokens,
                          n_shards=geometry.n_shards,
                          tokens_complete=int(store.attrs.get("n_tokens_complete", 0)))
    row_arrays = [*store.hooks, *INDEX_ARRAYS]
    report.unrepairable = [line for name in [*row_arrays, SHARD_DONE]
                           if (line := _metadata_problem(store, name))]
    if report.unrepairable:
        return report
    report.checksummed = all(has_chunk_checksums(store.array(n)) for n in [*row_arrays, SHARD_DONE])
    done, report.damage = _check_flags(store)
    report.problems = _progress_problems(store, done)
    shards = range(geometry.n_shards) if store.complete else np.flatnonzero(done).tolist()
    report.shards_checked = len(shards)
    chunks = sum(len(_shard_chunks(store, s)) for s in shards)
    with tqdm(total=chunks * len(row_arrays), unit="chunk", disable=not progress,
              desc=f"verify {store.url}") as bar:
        for name in row_arrays:
            for shard in shards:
                report.damage += _check_shard(store, name, shard, bar)
    report.chunks_checked = chunks * len(row_arrays)
    return report


def repair_store(store: ActivationStore, progress: bool = True) -> VerifyReport:
    """Verify `store` (opened for writing; rank 0 only) and mark its damaged shards unfinished:
    clear their done flags, mark the store incomplete and recount its progress, so that the
    harvest's resume recomputes exactly those shards. Damaged metadata is a StoreMetadataError."""
    report = check_store(store, progress)
    if report.unrepairable:
        raise StoreMetadataError("cannot repair: " + "; ".join(report.unrepairable))
    if report.ok:
        log.info("repair: no damage found in %s (%d shards checked)", store.url, report.shards_checked)
        return report
    for damage in report.damage:
        log.warning("repair: %s", damage.describe())
    flags = store.array(SHARD_DONE)
    for shard in report.damaged_shards:
        flags[shard] = 0
    store.group.attrs["complete"] = False
    record_progress(store)
    store.attrs = dict(store.group.attrs)
    log.info("repair: recomputing shards %s of %s", report.damaged_shards, store.url)
    return report


def _metadata_problem(store: ActivationStore, name: str) -> str | None:
    """Why array `name`'s metadata cannot be trusted (it does not open, or its layout is not the
    one the store's geometry says), or None."""
    try:
        array = store.array(name)
    except StoreMetadataError as err:
        return str(err)
    geometry = store.geometry
    wanted: tuple[Any, ...]
    if name == SHARD_DONE:
        wanted = ((geometry.n_shards,), (1,), None, np.dtype("uint8"))
    elif name in INDEX_ARRAYS:
        wanted = ((geometry.n_tokens,), (geometry.chunk_rows,), (geometry.shard_rows,), np.dtype("int32"))
    else:
        d, disk = store.d(name), "uint16" if store.store_dtype == "bfloat16" else store.store_dtype
        wanted = ((geometry.n_tokens, d), (geometry.chunk_rows, d), (geometry.shard_rows, d), np.dtype(disk))
    found = (array.shape, array.chunks, array.shards, array.dtype)
    if found == wanted:
        return None
    return (f"array {name!r} of store {store.url!r} has (shape, chunks, shards, dtype) {found}, not "
            f"{wanted} as the store's geometry says: its zarr.json is damaged; restore it from a "
            "copy, or delete the store and harvest again")


def _check_flags(store: ActivationStore) -> tuple[np.ndarray, list[Damage]]:
    """(finished shards as bools, damaged flags): a flag that does not decode, is not 0 or 1, or
    is unset in a complete store is damage; only intact set flags count as finished."""
    flags, damage = _read_flags(store)
    geometry = store.geometry
    for shard in np.flatnonzero(flags >= 0).tolist():
        value, reason = int(flags[shard]), None
        if value not in (0, 1):
            reason = f"flag holds {value}, not 0 or 1"
        elif value == 0 and store.complete:
            reason = "flag not set, yet the store says it is complete"
        if reason:
            damage.append(Damage(SHARD_DONE, range(shard, shard + 1),
                                 geometry.shard_rows_range(shard), shard, reason))
    return flags == 1, damage


def _read_flags(store: ActivationStore) -> tuple[np.ndarray, list[Damage]]:
    """The done flags (-1 where one does not decode) and the damage of those that do not."""
    array = store.array(SHARD_DONE)
    try:
        return np.asarray(array[:]).astype(np.int64), []
    except DECODE_ERRORS:
        pass
    flags, damage = np.full(array.shape[0], -1, dtype=np.int64), []
    for shard in range(array.shape[0]):
        found = store.chunk_damage(SHARD_DONE, shard)
        if found is None:
            flags[shard] = int(np.asarray(array[shard]))
        else:
            damage.append(found)
    return flags, damage


def _progress_problems(store: ActivationStore, done: np.ndarray) -> list[str]:
    """The recorded progress count against what the intact flags add up to."""
    geometry = store.geometry
    tokens = sum(len(geometry.shard_rows_range(s)) for s in np.flatnonzero(done).tolist())
    recorded = int(store.attrs.get("n_tokens_complete", 0))
    if store.complete and recorded != store.n_tokens:
        return [f"n_tokens_complete is {recorded} in a complete store of {store.n_tokens} tokens"]
    if not store.complete and recorded > tokens:
        return [f"n_tokens_complete is {recorded}, but the finished shards hold {tokens} tokens"]
    return []


def _shard_chunks(store: ActivationStore, shard: int) -> range:
    geometry = store.geometry
    rows = geometry.shard_rows_range(shard)
    return store.chunks_of(TOKEN_IDS, rows.start, rows.stop)


def _check_shard(store: ActivationStore, name: str, shard: int, bar: tqdm) -> list[Damage]:
    """Damage in one shard of the row array `name`: the shard file as a whole, then each chunk."""
    array, chunks = store.array(name), _shard_chunks(store, shard)
    whole = shard_file_problem(array, shard)
    if whole is not None:
        bar.update(len(chunks))
        return [Damage(name, chunks, store.geometry.shard_rows_range(shard), shard, whole)]
    damage = []
    for chunk in chunks:
        rows = store.geometry.chunk_rows_range(chunk)
        try:
            values = np.asarray(array[rows.start:rows.stop])
        except DECODE_ERRORS as err:
            reason: str | None = decode_failure(err)
        else:
            reason = _value_problem(store, name, values, rows)
        if reason is not None:
            damage.append(Damage(name, range(chunk, chunk + 1), rows, shard, reason))
        bar.update(1)
    return damage


def _value_problem(store: ActivationStore, name: str, values: np.ndarray, rows: range) -> str | None:
    """Why the decoded `values` of rows `rows` of array `name` cannot be right, or None."""
    context = store.context_size
    row_ids = np.arange(rows.start, rows.stop)
    if name == WINDOW:
        wrong = int((values != row_ids // context).sum())
        return f"{wrong} window ids are not row // context_size" if wrong else None
    if name == POSITION:
        wrong = int((values != row_ids % context).sum())
        return f"{wrong} positions are not row % context_size" if wrong else None
    if name == TOKEN_IDS:
        vocab = int(store.attrs.get("tokenizer", {}).get("vocab_size") or np.iinfo(np.int32).max)
        wrong = int(((values < 0) | (values >= vocab)).sum())
        return f"{wrong} token ids outside [0, {vocab})" if wrong else None
    bits = _NON_FINITE_BITS.get(store.store_dtype)
    if bits is None:  # float32
        bad = int((~np.isfinite(values)).sum())
    else:  # 16-bit floats: exponent bits all ones
        bad = int(((values.view(np.uint16) & bits) == bits).sum())
    return f"{bad} non-finite values (inf or NaN)" if bad else None
