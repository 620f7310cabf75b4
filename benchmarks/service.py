"""Latency and load of `saeworks serve` on loopback, against the same work done without HTTP.

    python benchmarks/service.py                                   # runs/wide16k's dictionary
    python benchmarks/service.py --dictionary runs/demo/dictionaries/topk-k32-9216
    python benchmarks/service.py --requests 2000 --clients 16 --time-limit 120 --json /tmp/service.json
    python benchmarks/service.py --profile                         # + where a feature's time goes

Starts the real server as a subprocess (`python -m saeworks serve DICT --port P --max-waiting 2`
on a free 127.0.0.1 port: its own process, so the clients here do not share its GIL), waits
until it answers and its context-text index is built, then measures, all in this one run:

- the limit (`in-process`): `FeatureDictionary.feature(i)` + `records.feature_record` per call,
  in this process on its own read-only handle, over the same feature ids as the HTTP runs, plus
  the response body's JSON encoding (pydantic's `dump_json` of a `dict[str, Any]`, what FastAPI
  does); and two bare HTTP round trips on the server: `GET /api/NONE/features/0` (the feature
  route, an unknown dictionary: routing, the thread pool, a 404 body; no dictionary work) and
  `GET /openapi.json` (cached after the first call, ~20 kB);
- `GET /api/{name}/features/{i}` over random live (count > 0) feature ids (`--seed`), with 1 and
  with 8 concurrent clients, each a thread with its own keep-alive `http.client` connection and
  `--latency-requests` requests, after `--warmup` untimed requests per client (which also open
  the server's per-thread database handles). p50/p95/p99 per request, throughput over the run;
  the issue's bar is p95 < 20 ms;
- a bounded load test: `--requests` requests (fixed in advance from `--seed`: 50% feature, 20%
  search by one or two words taken from the dictionary's top tokens, 15% page 2 of such a search,
  15% `GET /api/dictionaries`) from `--clients` keep-alive clients that take the next request
  from a shared list, stopping at `--time-limit` seconds whatever is left; each request has a
  `--request-timeout`. Any exception or non-200 status is an error (there must be none);
- the model queue: one `POST /inspect` loads the model (timed apart), then `--burst` concurrent
  `POST /api/{name}/inspect` requests are released at once (a barrier). The server admits 1 + 2
  (`--max-waiting 2`); the rest must get 503 with a Retry-After header at once, the admitted ones
  200, in turn. Then one more inspect must get 200 (the queue drained).

The CPU column is the server process's CPU time (all its threads, from /proc) over a run divided
by its requests, which other jobs on the machine do not inflate; for the in-process lines, this
thread's CPU time per call.

Hardware: a shared 2-core VM (server and clients share the 2 cores). Time: ~3 min with the
defaults (the server prepares its 16k feature records first, ~75 s); `--cache-mb 0` serves without
prepared records (each built on request). On runs/wide16k/dictionaries/topk-k32-16384 (16,384
features, ~34 contexts each, 28 kB per feature record), one run each, load average 1-2.4, ms:
                                    prepared records (default)    --cache-mb 0
  in-process feature()+record p50   2.95                          2.10
  bare HTTP 404 feature route p50   1.98                          0.84
  GET feature, 1 client  p50/p95    2.37 / 4.41 (406 req/s)       5.60 / 7.95 (175 req/s)
  GET feature, 8 clients p50/p95    5.05 / 10.45 (1,423 req/s)    45.2 / 58.7 (179 req/s)
  server CPU per feature request    1.57 (1 client), 0.62 (8)     5.10, 5.34
  load, 2000 mixed, 16 clients      0 errors, p50 47, p95 334     0 errors, p50 109, p95 311
  queue, 6 concurrent inspects      3 x 200, 3 x 503 + Retry-After: 2 (in 9-20 ms), then 200
Prints one table; `--json PATH` writes every figure.
"""

from __future__ import annotations

import argparse
import cProfile
import http.client
import io
import json
import os
import pstats
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saeworks.eval.dictionary import FeatureDictionary
from saeworks.service import records
from saeworks.service.server import free_port

Job = tuple[str, str, str, dict[str, Any] | None]
"""(kind, method, path, JSON body)."""
DEFAULT_DICTIONARIES = ("runs/wide16k/dictionaries/topk-k32-16384", "runs/demo/dictionaries/topk-k32-9216")
MAX_WAITING = 2
INSPECT_TEXT = ("The garbage collector of CPython frees objects whose reference count drops to zero, and "
                "a cycle detector finds groups of objects that refer only to each other. ") * 3


@dataclass
class Result:
    kind: str
    status: int | None
    seconds: float
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank on the sorted values); nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ms(values: list[float]) -> dict[str, float]:
    return {f"p{int(q * 100)}_ms": quantile(values, q) * 1e3 for q in (0.5, 0.95, 0.99)}


class Client:
    """One keep-alive HTTP/1.1 connection to the server."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port, self.timeout = port, timeout
        self.con = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, kind: str, method: str, path: str, body: dict[str, Any] | None = None) -> Result:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        start = time.perf_counter()
        try:
            self.con.request(method, path, body=data, headers=headers)
            response = self.con.getresponse()
            response.read()
            return Result(kind, response.status, time.perf_counter() - start,
                          headers={k.lower(): v for k, v in response.getheaders()})
        except (OSError, http.client.HTTPException) as err:
            self.con.close()
            self.con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            return Result(kind, None, time.perf_counter() - start, f"{type(err).__name__}: {err}")

    def close(self) -> None:
        self.con.close()


def start_server(dictionary: Path, port: int, log: Path, cache_mb: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "saeworks", "serve", str(dictionary), "--port", str(port),
           "--max-waiting", str(MAX_WAITING), "--cache-mb", str(cache_mb)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_ready(server: subprocess.Popen, port: int, name: str, log: Path, timeout: float,
               records: int) -> float:
    """Seconds until the server answers, its context index is built and `records` feature records
    are prepared (what /api/dictionaries reports)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            con = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            con.request("GET", "/api/dictionaries")
            (entry,) = [d for d in json.loads(con.getresponse().read())["dictionaries"] if d["name"] == name]
            con.close()
            if entry["context_text_indexed"] and entry["records_ready"] >= records:
                return time.perf_counter() - start
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not get ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_clients(port: int, jobs: Sequence[Job], clients: int, timeout: float,
                time_limit: float | None = None, warmup: Sequence[Job] = (), pid: int = 0
                ) -> tuple[list[Result], float, int, float]:
    """`jobs` (kind, method, path, body) taken in turn by `clients` threads; (results, wall
    seconds from release to the last answer, jobs left undone at the time limit, CPU seconds
    the server process `pid` spent meanwhile)."""
    lock = threading.Lock()
    position = [0]
    results: list[Result] = []
    barrier = threading.Barrier(clients + 1)
    deadline = [float("inf")]

    def work() -> None:
        client = Client(port, timeout)
        for kind, method, path, body in warmup:
            client.request(kind, method, path, body)
        barrier.wait()
        mine = []
        while time.perf_counter() < deadline[0]:
            with lock:
                if position[0] >= len(jobs):
                    break
                job = jobs[position[0]]
                position[0] += 1
            mine.append(client.request(*job))
        client.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start, cpu = time.perf_counter(), cpu_seconds(pid)
    if time_limit is not None:
        deadline[0] = start + time_limit
    for t in threads:
        t.join()
    return results, time.perf_counter() - start, len(jobs) - position[0], cpu_seconds(pid) - cpu


def in_process(dictionary: Path, ids: list[int]) -> dict[str, Any]:
    """The same work without HTTP: feature + record, then the JSON body as FastAPI encodes it."""
    from pydantic import TypeAdapter

    adapter = TypeAdapter(dict[str, Any])
    work, encode, sizes, work_cpu, encode_cpu = [], [], [], [], []
    with FeatureDictionary.open(dictionary, readonly=True) as d:
        records.feature_record(d, d.feature(ids[0]))  # first touch
        for i in ids:
            start, start_cpu = time.perf_counter(), time.thread_time()
            record = records.feature_record(d, d.feature(i))
            middle, middle_cpu = time.perf_counter(), time.thread_time()
            body = adapter.dump_json(adapter.validate_python(record))
            work.append(middle - start)
            work_cpu.append(middle_cpu - start_cpu)
            encode.append(time.perf_counter() - middle)
            encode_cpu.append(time.thread_time() - middle_cpu)
            sizes.append(len(body))
    return {"feature+record": {**ms(work), "cpu_ms_mean": statistics.mean(work_cpu) * 1e3},
            "json encode": {**ms(encode), "cpu_ms_mean": statistics.mean(encode_cpu) * 1e3},
            "body_bytes_median": statistics.median(sizes), "n": len(ids)}


def profile(dictionary: Path, ids: list[int]) -> dict[str, Any]:
    """cProfile over feature + feature_record, and each SQL statement of it timed alone."""
    out: dict[str, Any] = {}
    with FeatureDictionary.open(dictionary, readonly=True) as d:
        records.feature_record(d, d.feature(ids[0]))
        profiler = cProfile.Profile()
        profiler.enable()
        for i in ids:
            records.feature_record(d, d.feature(i))
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
        out["cprofile_tottime"] = text.getvalue()
        con: sqlite3.Connection = d.con
        timings: dict[str, list[float]] = {k: [] for k in (
            "features row", "contexts rows", "context tokens (all)", "context tokens (per query)",
            "neighbour labels")}
        n_contexts = []
        for i in ids:
            t0 = time.perf_counter()
            (row,) = con.execute("SELECT neighbours FROM features WHERE id = ?", (i,)).fetchall()
            t1 = time.perf_counter()
            rows = con.execute("SELECT kind, rank, band, activation, row, window, position, focus, length, "
                               "activations FROM contexts WHERE feature_id = ? ORDER BY kind DESC, rank",
                               (i,)).fetchall()
            t2 = time.perf_counter()
            for r in rows:
                s = time.perf_counter()
                start = r[4] - r[7]
                con.execute("SELECT r.token_id, t.text FROM row_tokens r JOIN tokens t ON t.id = r.token_id "
                            "WHERE r.row BETWEEN ? AND ? ORDER BY r.row", (start, start + r[8] - 1)
                            ).fetchall()
                timings["context tokens (per query)"].append(time.perf_counter() - s)
            t3 = time.perf_counter()
            near = [int(j) for j, _ in json.loads(row[0])]
            d.labels(near)
            t4 = time.perf_counter()
            timings["features row"].append(t1 - t0)
            timings["contexts rows"].append(t2 - t1)
            timings["context tokens (all)"].append(t3 - t2)
            timings["neighbour labels"].append(t4 - t3)
            n_contexts.append(len(rows))
        out["sql"] = {k: ms(v) for k, v in timings.items() if v}
        out["contexts_per_feature_median"] = statistics.median(n_contexts)
    return out


def feature_jobs(name: str, ids: list[int]) -> list[Job]:
    return [("feature", "GET", f"/api/{name}/features/{i}", None) for i in ids]


def load_jobs(name: str, ids: list[int], words: list[str], n: int, rng: random.Random) -> list[Job]:
    jobs: list[Job] = []
    for _ in range(n):
        u = rng.random()
        if u < 0.5:
            jobs.append(("feature", "GET", f"/api/{name}/features/{rng.choice(ids)}", None))
        elif u < 0.85:
            q = "+".join(rng.sample(words, rng.choice((1, 1, 2))))
            page = 2 if u >= 0.7 else 1
            jobs.append((f"search p{page}", "GET", f"/api/{name}/search?q={q}&page={page}", None))
        else:
            jobs.append(("dictionaries", "GET", "/api/dictionaries", None))
    return jobs


def summarize(results: list[Result], seconds: float, server_cpu: float) -> dict[str, Any]:
    ok = [r.seconds for r in results if r.error is None and r.status == 200]
    return {"n": len(results), "ok": len(ok), "errors": sum(r.error is not None for r in results),
            "server_cpu_ms_per_request": server_cpu / max(1, len(results)) * 1e3,
            "statuses": dict(Counter(str(r.status) for r in results)), **ms([r.seconds for r in results]),
            "throughput_rps": len(results) / seconds if seconds else float("nan"), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dictionary", default=None,
                        help=f"a feature dictionary directory (default: the first of {DEFAULT_DICTIONARIES} "
                             "that exists)")
    parser.add_argument("--requests", type=int, default=2000, help="requests of the load test")
    parser.add_argument("--clients", type=int, default=16, help="clients of the load test")
    parser.add_argument("--time-limit", type=float, default=120.0, help="the load test stops after this")
    parser.add_argument("--latency-requests", type=int, default=300,
                        help="timed feature requests per client in the 1- and 8-client runs")
    parser.add_argument("--warmup", type=int, default=20, help="untimed feature requests per client first")
    parser.add_argument("--burst", type=int, default=1 + MAX_WAITING + 3, help="concurrent inspect requests")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--cache-mb", type=float, default=512,
                        help="the server's --cache-mb (0: every feature record built on request)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also profile feature + record in-process")
    parser.add_argument("--server-log", default=None, help="the server's output (default: a temp file)")
    parser.add_argument("--json", default=None, help="also write every figure here")
    args = parser.parse_args()

    dictionary = Path(args.dictionary or next((p for p in DEFAULT_DICTIONARIES if Path(p).is_dir()),
                                              DEFAULT_DICTIONARIES[-1]))
    rng = random.Random(args.seed)
    with FeatureDictionary.open(dictionary, readonly=True) as d:
        d_sae = len(d)
        live = [int(i) for (i,) in d.con.execute("SELECT id FROM features WHERE count > 0 ORDER BY id")]
        tokens = [t for s in d.summaries(rng.sample(live, min(400, len(live)))) for t, _ in s.top_tokens]
    words = sorted({w.lower() for t in tokens for w in re.findall(r"[A-Za-z]{3,}", t)})
    n_latency = args.latency_requests
    ids_1 = [rng.choice(live) for _ in range(n_latency)]
    ids_8 = [rng.choice(live) for _ in range(8 * n_latency)]
    warm_ids = [rng.choice(live) for _ in range(args.warmup)]
    figures: dict[str, Any] = {"dictionary": str(dictionary), "d_sae": d_sae, "live": len(live),
                               "cpus": os.cpu_count(), "python": sys.version.split()[0]}

    figures["in_process"] = in_process(dictionary, ids_1)
    if args.profile:
        figures["profile"] = profile(dictionary, ids_1[:200])

    port = free_port()
    log = Path(args.server_log) if args.server_log else Path(f"/tmp/saeworks-bench-serve-{port}.log")
    name = dictionary.resolve().name
    server = start_server(dictionary, port, log, args.cache_mb)
    figures["cache_mb"] = args.cache_mb
    try:
        figures["startup_seconds"] = wait_ready(server, port, name, log, timeout=600,
                                                records=len(live) if args.cache_mb > 0 else 0)
        figures["load_average_start"] = os.getloadavg()
        warm = feature_jobs(name, warm_ids)
        bare = {}
        for kind, path in (("bare_404", "/api/NONE/features/0"), ("bare_openapi", "/openapi.json")):
            warm_bare = [("warm-up", "GET", path, None)] * 5
            results, seconds, _, cpu = run_clients(port, [(kind, "GET", path, None)] * n_latency, 1,
                                                   args.request_timeout, warmup=warm_bare, pid=server.pid)
            bare[kind] = summarize(results, seconds, cpu)
        figures.update(bare)
        for clients, ids in ((1, ids_1), (8, ids_8)):
            results, seconds, _, cpu = run_clients(port, feature_jobs(name, ids), clients,
                                                   args.request_timeout, warmup=warm, pid=server.pid)
            figures[f"feature_{clients}"] = summarize(results, seconds, cpu)

        jobs = load_jobs(name, live, words, args.requests, rng)
        results, seconds, undone, cpu = run_clients(port, jobs, args.clients, args.request_timeout,
                                                    time_limit=args.time_limit, pid=server.pid)
        load = summarize(results, seconds, cpu)
        load.update(clients=args.clients, planned=args.requests, undone=undone, time_limit=args.time_limit,
                    by_kind={k: {**ms([r.seconds for r in results if r.kind == k]),
                                 "n": sum(r.kind == k for r in results)}
                             for k in sorted({r.kind for r in results})},
                    error_samples=[r.error or f"HTTP {r.status}" for r in results
                                   if r.error or r.status != 200][:5])
        figures["load"] = load
        figures["queue"] = queue_test(port, name, args.burst, args.request_timeout)
        figures["load_average_end"] = os.getloadavg()
    finally:
        stop_server(server)
    figures["server_exit"] = server.returncode
    print_table(figures, args)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


def queue_test(port: int, name: str, burst: int, timeout: float) -> dict[str, Any]:
    """Load the model, then release `burst` inspect requests at once."""
    path = f"/api/{name}/inspect"
    first = Client(port, 600)
    cold = first.request("inspect cold", "POST", path, {"text": "Hello world"})
    warm = first.request("inspect warm", "POST", path, {"text": INSPECT_TEXT})
    first.close()
    clients = [Client(port, timeout) for _ in range(burst)]
    for c in clients:  # connect now, so the burst is only the requests
        c.con.connect()
    barrier = threading.Barrier(burst)
    out: list[Result | None] = [None] * burst

    def fire(k: int) -> None:
        barrier.wait()
        out[k] = clients[k].request("inspect burst", "POST", path, {"text": INSPECT_TEXT})

    threads = [threading.Thread(target=fire, args=(k,), daemon=True) for k in range(burst)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = clients[0].request("inspect after", "POST", path, {"text": "Hello again"})
    for c in clients:
        c.close()
    results = [r for r in out if r is not None]
    refused = [r for r in results if r.status == 503]
    admitted = [r for r in results if r.status == 200]
    return {"burst": burst, "max_waiting": MAX_WAITING, "cold_status": cold.status,
            "cold_seconds": cold.seconds, "warm_status": warm.status, "warm_ms": warm.seconds * 1e3,
            "statuses": dict(Counter(str(r.status) for r in results)),
            "admitted_ms": sorted(r.seconds * 1e3 for r in admitted),
            "refused_ms": sorted(r.seconds * 1e3 for r in refused),
            "refused_retry_after": sorted({r.headers.get("retry-after", "MISSING") for r in refused}),
            "errors": [r.error for r in results if r.error],
            "after_status": after.status, "after_ms": after.seconds * 1e3}


def print_table(f: dict[str, Any], args: argparse.Namespace) -> None:
    ip = f["in_process"]
    print(f"saeworks serve on 127.0.0.1: {f['dictionary']} ({f['d_sae']:,} features, {f['live']:,} live); "
          f"server ready in {f['startup_seconds']:.1f} s; {f['cpus']} CPUs, load average "
          f"{f['load_average_start'][0]:.2f} -> {f['load_average_end'][0]:.2f}")
    print(f"{'':44} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8} {'CPU ms':>7} "
          f"{'errors':>6}  statuses")

    def line(label: str, s: dict[str, Any], rps: bool = True) -> None:
        rate = f"{s['throughput_rps']:8.1f}" if rps else f"{'':>8}"
        cpu = s.get("server_cpu_ms_per_request", s.get("cpu_ms_mean"))
        cpu_text = f"{cpu:7.2f}" if cpu is not None else f"{'':>7}"
        errors = s.get("errors", "")
        statuses = " ".join(f"{k}:{v}" for k, v in s.get("statuses", {}).items())
        print(f"{label:44} {s['n']:>6} {s['p50_ms']:8.2f} {s['p95_ms']:8.2f} {s['p99_ms']:8.2f} {rate} "
              f"{cpu_text} {errors:>6}  {statuses}")

    line("limit: feature()+feature_record in-process", {**ip["feature+record"], "n": ip["n"]}, rps=False)
    line(f"limit: + JSON body ({ip['body_bytes_median'] / 1e3:.0f} kB) in-process",
         {**ip["json encode"], "n": ip["n"]}, rps=False)
    line("limit: HTTP round trip, 404 feature route", f["bare_404"], rps=False)
    line("limit: HTTP round trip, /openapi.json", f["bare_openapi"], rps=False)
    for c in (1, 8):
        s = f[f"feature_{c}"]
        verdict = "meets" if s["p95_ms"] < 20 else "MISSES"
        line(f"GET features/{{i}}, {c} client{'s' * (c > 1)} ({verdict} p95<20ms)", s)
    one, eight = f["feature_1"], f["feature_8"]
    print(f"  server CPU per feature request: {one['server_cpu_ms_per_request']:.2f} ms with 1 client, "
          f"{eight['server_cpu_ms_per_request']:.2f} ms with 8 (cache {f['cache_mb']:g} MB; the in-process "
          f"limit builds each record: what --cache-mb 0 pays per request)")
    load = f["load"]
    line(f"load: {load['planned']} mixed, {load['clients']} clients, {load['time_limit']:.0f} s cap", load)
    for kind, s in load["by_kind"].items():
        line(f"  load: {kind}", s, rps=False)
    print("CPU ms: per request, the server process's CPU time (all its threads) over the run / requests; "
          "for the in-process lines, this thread's CPU time per call")
    if load["undone"]:
        print(f"  load: {load['undone']} requests not sent before the time limit")
    for sample in load["error_samples"]:
        print(f"  load error: {sample}")
    q = f["queue"]
    admitted = ", ".join(f"{v:.0f}" for v in q["admitted_ms"])
    refused = ", ".join(f"{v:.1f}" for v in q["refused_ms"])
    print(f"queue (--max-waiting {q['max_waiting']}): model load + first inspect {q['cold_seconds']:.1f} s "
          f"(HTTP {q['cold_status']}), one warm inspect {q['warm_ms']:.0f} ms; burst of {q['burst']} "
          f"concurrent inspects -> {q['statuses']}; 200s after {admitted} ms; 503s after {refused} ms "
          f"with Retry-After {q['refused_retry_after']}; the next inspect: HTTP {q['after_status']} in "
          f"{q['after_ms']:.0f} ms")
    if "profile" in f:
        p = f["profile"]
        print(f"profile of feature()+feature_record ({p['contexts_per_feature_median']:.0f} contexts per "
              "feature), each SQL statement timed alone, ms per feature (per query for 'per query'):")
        for k, v in p["sql"].items():
            print(f"  {k:28} p50 {v['p50_ms']:7.3f}  p95 {v['p95_ms']:7.3f}")
        print(p["cprofile_tottime"])


if __name__ == "__main__":
    main()
