"""Activation reader throughput from an S3 store against the same store on local disk, in one run.

    python benchmarks/reader_s3.py                     # synthetic 262k x 576 float16 store, moto on loopback
    python benchmarks/reader_s3.py --latency-ms 20     # every request held 20 ms (a loopback proxy)
    python benchmarks/reader_s3.py --remote-reads 1,8  # the reader's concurrent run reads, off and on
    python benchmarks/reader_s3.py --endpoint http://HOST:9000 --bucket B   # a real S3/MinIO endpoint
                                                       # (credentials from the environment, as usual)

Builds the synthetic store of benchmarks/reader.py (zstd level 1, 4096-row chunks, 16 chunks per
shard, a CRC32C per chunk) on local disk, uploads it to `s3://BUCKET/reader-bench-PID.zarr` on an
S3-compatible server, by default moto in server mode started here on a free 127.0.0.1 port and
stopped at the end, and measures, alternating the stores epoch by epoch (best of `--repeats`):
  reader local  `ActivationReader` rows/s over one epoch of the local store (after a warm-up epoch).
  reader s3     the same over the S3 URL, for each `--remote-reads` (runs of a block fetched at
                once; the package's default is `activations.reader.REMOTE_READS`).
  ranged GET    the hook's shard objects fetched as the reader fetches them, one ranged request
                per 1/16 of an object (a chunk's bytes), concurrently, undecoded: what this server
                gives for that access pattern, the reader's limit.
moto is a Python server that keeps objects in memory and copies a whole object to answer a ranged
request, so over moto the figures are those of that server, not of S3; `--latency-ms` puts a
loopback TCP proxy in front of it that holds each request that long (a remote endpoint's round
trip), which is where concurrent reads matter. The benchmark process is pinned to one core
(`--cpus 1`) and torch to one thread, as in benchmarks/reader.py; the server (and proxy) get the
other cores where there are any. Prints one line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reader import HOOK, build_store, reader_epoch

import saeworks.activations.reader as reader_module
from saeworks.activations.config import ReaderConfig
from saeworks.activations.store import ActivationStore


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(command: list[str], log: Path, cores: list[int], url: str) -> subprocess.Popen:
    """Start `command` pinned to `cores` (all when empty); return once `url` answers."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"{command[:3]} did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)


def proxy(listen: int, target: int, delay_ms: float) -> None:
    """Forward 127.0.0.1:`listen` to 127.0.0.1:`target`, holding each client write `delay_ms`
    (one hold per request: a GET is one write of its headers)."""
    delay = delay_ms / 1000

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, wait: float) -> None:
        try:
            while data := await source.read(1 << 20):
                if wait:
                    await asyncio.sleep(wait)
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()

    async def handle(client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        server_in, server_out = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(client_in, server_out, delay), pipe(server_in, client_out, 0))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def ranged_get(fs: Any, prefix: str, n_rows: int, repeats: int) -> float:
    """Rows/s of fetching the hook's shard objects in 16 ranged requests each, concurrently."""
    keys = [key for key in fs.find(prefix) if "/c/" in key]
    sizes = {key: fs.info(key)["size"] for key in keys}
    paths, starts, ends = [], [], []
    for key, size in sizes.items():
        step = -(-size // 16)
        for begin in range(0, size, step):
            paths.append(key)
            starts.append(begin)
            ends.append(min(begin + step, size))
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fetched = fs.cat_ranges(paths, starts, ends)
        best = min(best, time.perf_counter() - began)
        assert sum(len(piece) for piece in fetched) == sum(sizes.values())
    return n_rows / best


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=262_144, help="rows of the synthetic store")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--buffer-chunks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating epochs per store")
    parser.add_argument("--cpus", type=int, default=1, help="pin the benchmark to this many cores (0: none)")
    parser.add_argument("--remote-reads", default=str(reader_module.REMOTE_READS),
                        help="comma-separated values of the reader's REMOTE_READS to measure")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="hold each request this long in a loopback proxy (moto only)")
    parser.add_argument("--endpoint", help="an S3-compatible endpoint to use instead of starting moto")
    parser.add_argument("--bucket", default="saeworks-bench", help="bucket (made if missing)")
    parser.add_argument("--proxy", nargs=3, type=float, help=argparse.SUPPRESS)  # LISTEN TARGET MS
    args = parser.parse_args()
    if args.proxy:
        proxy(int(args.proxy[0]), int(args.proxy[1]), args.proxy[2])
        return
    import s3fs  # type: ignore[import-untyped]

    cores = sorted(os.sched_getaffinity(0))
    mine = cores[:args.cpus] if args.cpus else cores
    others = [c for c in cores if c not in mine]
    concurrency = [int(n) for n in args.remote_reads.split(",")]
    servers: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            endpoint = args.endpoint
            if endpoint is None:
                port = free_port()
                moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
                servers.append(start(moto, Path(tmp) / "moto.log", others,
                                     f"http://127.0.0.1:{port}/moto-api/"))
                if args.latency_ms:
                    front = free_port()
                    servers.append(start([sys.executable, __file__, "--proxy", str(front), str(port),
                                          str(args.latency_ms)], Path(tmp) / "proxy.log", others,
                                         f"http://127.0.0.1:{front}/moto-api/"))
                    port = front
                endpoint = f"http://127.0.0.1:{port}"
                os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                                  AWS_DEFAULT_REGION="us-east-1", NO_PROXY="127.0.0.1,localhost")
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            if args.cpus:
                os.sched_setaffinity(0, mine)
            torch.set_num_threads(1)
            local = build_store(Path(tmp) / "bench.zarr", args.rows)
            fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
            if not fs.exists(args.bucket):
                fs.mkdir(args.bucket)
            prefix = f"{args.bucket}/reader-bench-{os.getpid()}.zarr"
            began = time.perf_counter()
            fs.put(local.url, prefix, recursive=True)
            upload = time.perf_counter() - began
            remote = ActivationStore.open(f"s3://{prefix}")
            cfg = ReaderConfig(batch_size=args.batch_size, buffer_chunks=args.buffer_chunks)
            rates = dict.fromkeys(["local", *(f"s3 x{n}" for n in concurrency)], 0.0)
            for _ in range(args.repeats):
                rates["local"] = max(rates["local"], reader_epoch(local, HOOK, cfg, cold=False).wall)
                for n in concurrency:
                    reader_module.REMOTE_READS = n
                    rate = reader_epoch(remote, HOOK, cfg, cold=False).wall
                    rates[f"s3 x{n}"] = max(rates[f"s3 x{n}"], rate)
            get = ranged_get(fs, f"{prefix}/{HOOK}", local.n_tokens, args.repeats)
            if args.endpoint is not None:
                fs.rm(prefix, recursive=True)
        finally:
            for server in reversed(servers):
                server.terminate()
                server.wait()
    where = args.endpoint or "moto on 127.0.0.1" + (f", {args.latency_ms:g} ms per request" if args.latency_ms
                                                    else "")
    s3_rates = " | ".join(f"reader s3 ({n} concurrent runs): {rates[f's3 x{n}']:,.0f} rows/s "
                          f"({rates[f's3 x{n}'] / rates['local']:.2f}x local, "
                          f"{rates[f's3 x{n}'] / get:.2f}x ranged GET)" for n in concurrency)
    print(f"{where}: reader local: {rates['local']:,.0f} rows/s | {s3_rates} | ranged GET of the shard "
          f"objects: {get:,.0f} rows/s (d=576 float16, {local.n_tokens:,} rows, batch {args.batch_size}, "
          f"buffer_chunks {args.buffer_chunks}, upload {upload:.1f} s)")


if __name__ == "__main__":
    main()
