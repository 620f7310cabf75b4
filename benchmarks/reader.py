"""Activation reader throughput against its limits: the same bytes read raw, and decoded by Zarr.

    python benchmarks/reader.py                          # synthetic 500k x 576 float16 store, 1 core
    python benchmarks/reader.py --build /tmp/bench.zarr  # keep the synthetic store there (reused)
    python benchmarks/reader.py --store RUN/activations.zarr --hook blocks.15.hook_resid_post
    python benchmarks/reader.py --cpus 0                 # no pinning: all cores
    python benchmarks/reader.py --cold                   # time the process's first epoch instead
    python benchmarks/reader.py --compression none       # the same store without compression
    python benchmarks/reader.py --checksums both         # the same rows with and without a CRC32C
                                                         # per chunk, measured in one run

The synthetic store is written like the harvester writes one (zstd level 1, 4096-row chunks of
whole 128-token windows, 16 chunks per shard, a CRC32C after each compressed chunk, BOS first in
every window, positions 0-1 and ids 0-2 excluded), with values normal x 20 cast to float16. The
process is pinned to one CPU core (`--cpus 1`) and torch to one thread, since the reader must keep
up with training on one core.

Figures, all on a warm page cache, in rows/s (the reader counts the rows it yields: excluded rows
and the drop-last remainder are decoded but not counted, ~2% of a harvested store):
  raw read      every shard file of the hook read with plain Python file reads (`readinto` one
                reused buffer): the bare cost of getting the compressed bytes.
  zarr decode   every chunk read and decompressed by Zarr, one call per chunk, in row order,
                without shuffling: the bare cost of the decoded rows.
  reader        `ActivationReader` over one epoch: decode, exclusions, shuffle, batches of 4096,
                through its prefetch thread. By default an untimed warm-up epoch runs first (it
                pays the first touch of the block buffer and batch memory, which on a VM costs
                ~1 GB/s); `--cold` times the first epoch of the process instead.
Prints one line; the ratios are reader / raw read and reader / zarr decode. `--checksums both`
builds two stores of the same rows, with and without chunk checksums (the format of stores made
before them), and prints the reader and decode rates of both, alternating their epochs (best of
`--repeats`) so that both see the same machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from saeworks.activations.config import ReaderConfig
from saeworks.activations.reader import ActivationReader
from saeworks.activations.store import ActivationStore, StoreGeometry, create_store, finalize, write_shard

HOOK = "blocks.15.hook_resid_post"
CONTEXT, D, VOCAB = 128, 576, 49_152


def build_store(path: Path, n_rows: int, compression: str = "zstd", checksums: bool = True
                ) -> ActivationStore:
    """A complete float16 store of ~`n_rows` realistic-looking rows, as the harvester lays it out
    (the same rows for the same `n_rows`, with or without chunk checksums)."""
    geometry = StoreGeometry.plan(n_rows // CONTEXT, CONTEXT, chunk_tokens=4096, chunks_per_shard=16)
    store = create_store(str(path), {"benchmark": n_rows}, geometry, {HOOK: D}, "float16", compression,
                         {"excluded": {"first_positions": 2, "token_ids": [0, 1, 2]}}, checksums=checksums)
    rng = np.random.default_rng(0)
    for shard in range(geometry.n_shards):
        n_windows = len(geometry.shard_windows(shard))
        token_ids = rng.integers(3, VOCAB, size=(n_windows, CONTEXT), dtype=np.int32)  # [windows, ctx]
        token_ids[:, 0] = 1  # BOS
        values = rng.standard_normal((n_windows * CONTEXT, D), dtype=np.float32) * 20  # [rows, D]
        write_shard(store, shard, {HOOK: values.astype(np.float16)}, token_ids)
    finalize(store, geometry.n_windows)
    return ActivationStore.open(str(path))


def raw_read(store: ActivationStore, hook: str) -> float:
    """Rows/s of reading the hook's shard files with plain file reads into one reused buffer."""
    files = sorted(p for p in (Path(store.url) / hook / "c").rglob("*") if p.is_file())
    if not files:
        raise SystemExit(f"no chunk files under {store.url}/{hook}/c: raw reads need a local store")
    buffer = bytearray(max(p.stat().st_size for p in files))

    def read_all() -> None:
        for path in files:
            with open(path, "rb", buffering=0) as file:
                file.readinto(buffer)

    read_all()  # warm the page cache
    return store.n_tokens / _best_of(read_all, repeats=3)


def zarr_decode(store: ActivationStore, hook: str) -> float:
    """Rows/s of reading and decompressing every chunk through Zarr, one call per chunk."""
    array, step = store.array(hook), store.geometry.chunk_rows

    def decode_all() -> None:
        for start in range(0, store.n_tokens, step):
            array[start:start + step]

    decode_all()
    return store.n_tokens / _best_of(decode_all, repeats=2)


def compare_checksums(tmp: Path, args: argparse.Namespace, cfg: ReaderConfig) -> str:
    """The figure line of `--checksums both`: reader and decode rows/s with and without a CRC32C
    per chunk, on two stores of the same rows, epochs alternating, best of `args.repeats`."""
    stores = {label: build_store(tmp / f"{label}.zarr", args.rows, args.compression, checksums=on)
              for label, on in (("crc32c", True), ("none", False))}
    reader: dict[str, float] = dict.fromkeys(stores, 0.0)
    per_cpu: dict[str, float] = dict.fromkeys(stores, 0.0)
    decode: dict[str, float] = dict.fromkeys(stores, 0.0)
    for _ in range(args.repeats):
        for label, store in stores.items():
            rate = reader_epoch(store, HOOK, cfg, args.cold)
            reader[label], per_cpu[label] = max(reader[label], rate.wall), max(per_cpu[label], rate.cpu)
            decode[label] = max(decode[label], zarr_decode(store, HOOK))
    raw = raw_read(stores["crc32c"], HOOK)
    cost = 1 - reader["crc32c"] / reader["none"]
    return (f"reader with chunk CRC32C: {reader['crc32c']:,.0f} rows/s | without: {reader['none']:,.0f} "
            f"rows/s | checksum cost {cost:.1%} (d={D} float16, batch {args.batch_size}) | per CPU-second: "
            f"{per_cpu['crc32c']:,.0f} / {per_cpu['none']:,.0f} rows | zarr decode "
            f"{decode['crc32c']:,.0f} / {decode['none']:,.0f} rows/s | raw read {raw:,.0f} rows/s")


class EpochRate(NamedTuple):
    wall: float
    """Rows/s of wall-clock time."""
    cpu: float
    """Rows per CPU-second of the process (all its threads): what an otherwise idle core gives,
    steadier than `wall` on a machine shared with other work."""


def reader_epoch(store: ActivationStore, hook: str, cfg: ReaderConfig, cold: bool) -> EpochRate:
    """Rows/s the reader yields over one epoch (after an untimed warm-up epoch unless `cold`)."""
    reader = ActivationReader(store, hook, cfg)
    batches = iter(reader)
    for epoch in range(1 if cold else 2):
        start, cpu, rows = time.perf_counter(), time.process_time(), 0
        for _ in range(reader.batches_in_epoch(epoch)):
            rows += len(next(batches).rows)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return EpochRate(rows / seconds, rows / cpu_seconds)


def _best_of(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--store", help="an existing complete store (default: a synthetic one)")
    parser.add_argument("--hook", default=HOOK, help="hook of --store to read")
    parser.add_argument("--build", help="where to build (or reuse) the synthetic store; default a temp dir")
    parser.add_argument("--rows", type=int, default=500_000, help="rows of the synthetic store")
    parser.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "none"],
                        help="codec of the synthetic store (harvest.compression)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--buffer-chunks", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=1, help="pin to this many CPU cores (0: no pinning)")
    parser.add_argument("--cold", action="store_true", help="time the first epoch, without warm-up")
    parser.add_argument("--checksums", default="on", choices=["on", "off", "both"],
                        help="a CRC32C per chunk in the synthetic store; both: two stores, one line")
    parser.add_argument("--repeats", type=int, default=2, help="alternating epochs per store (both)")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ReaderConfig(batch_size=args.batch_size, buffer_chunks=args.buffer_chunks)
        if args.checksums == "both":
            print(compare_checksums(Path(tmp), args, cfg))
            return
        if args.store:
            store = ActivationStore.open(args.store)
        elif args.build and Path(args.build).exists():
            store = ActivationStore.open(args.build)
        else:
            store = build_store(Path(args.build or Path(tmp) / "bench.zarr"), args.rows, args.compression,
                                checksums=args.checksums == "on")
        raw, decode = raw_read(store, args.hook), zarr_decode(store, args.hook)
        reader = reader_epoch(store, args.hook, cfg, args.cold).wall
    print(f"reader: {reader:,.0f} rows/s (d={store.d(args.hook)} {store.store_dtype}, batch "
          f"{args.batch_size}) | raw read {raw:,.0f} rows/s | zarr decode {decode:,.0f} rows/s | "
          f"ratio to raw {reader / raw:.2f} | ratio to decode {reader / decode:.2f}")


if __name__ == "__main__":
    main()
