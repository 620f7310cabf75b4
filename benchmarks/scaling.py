"""Scaling model of SAE training: data parallel vs latent sharding, measured here, projected to GPUs.

    python benchmarks/scaling.py                 # d_in 576, d_sae 9216, k 32, batch 4096 (~2-3 min, 2 cores)
    python benchmarks/scaling.py --quick         # small shapes, ~1 min
    python benchmarks/scaling.py --json out.json --flops 400e12 --bw-intra 450e9 --bw-nic 50e9

Measured on this machine, in this run:
1. the bare encoder matmul [batch, d_in] @ [d_in, d_sae] float32 (GFLOP/s), a bare memory copy
   (GB/s), one thread, and one process's training step through the real trainer (`train_saes` on a synthetic
   store), split into forward+backward and the update (decoder projection, clipping, Adam, decoder
   normalisation): the step efficiency e = encoder-matmul time / forward+backward time (the fastest
   of each in this run: other work shares these cores), and the
   update's effective bytes per parameter = update time x copy bandwidth / parameters;
2. the collectives of a step, for real: 2 gloo processes under torchrun train (a) data parallel and
   (b) `train.latent_shards=2`, with torch.distributed's all_reduce / all_gather / gather /
   broadcast / all_gather_object wrapped in the worker to count calls and the bytes each rank
   contributes (numel x element size; pickled size for objects), per step; printed next to
   `step_collectives`, the formula, which must agree exactly; and tokens/s of 1 process, 2-process
   data parallel and 2 latent shards. Every process runs one thread (one core stands for one
   device): two threads in one process on 2 shared cores measured 3-4x slower than one.

Projected (`project`, the formula the README's "Scaling model" section states): step time per GPU =
encoder FLOPs / (F x e) + update bytes / HBM bandwidth + the collectives of `step_collectives` on an
assumed interconnect (ring all-reduce 2(n-1)/n x bytes, all-gather (n-1) x bytes, + latency each),
with no overlap of communication and compute (the trainer overlaps none). Every assumption is an
option.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

HOOK = "blocks.0.hook_resid_post"
CONTEXT = 128
REPO = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all_reduce", "all_gather", "gather", "broadcast", "all_gather_object", "reduce_scatter")
PERIODIC = ("metrics", "_metrics", "check_weights")
"""Trainer methods that run only at logging/checkpoint steps: their collectives are not per step."""


# ---------------------------------------------------------------------------------------------
# The formula: collectives of one step, and the projected step time


@dataclass(frozen=True)
class Collective:
    """One collective of a step as one rank sees it."""

    op: str
    """all_reduce or all_gather."""
    group: str
    """all (every rank), shards (a replica's S latent shards), replicas (the R ranks holding a shard)."""
    size: int
    """Ranks in the group."""
    nbytes: int
    """Bytes this rank contributes (numel x 4: every tensor is float32)."""
    what: str


def param_count(d_in: int, d_sae: int) -> int:
    """P = W_enc + b_enc + W_dec + b_dec = 2 d_in d_sae + d_sae + d_in."""
    return 2 * d_in * d_sae + d_sae + d_in


def step_collectives(d_in: int, d_sae: int, k: int, batch: int, world: int, shards: int,
                     aux_k: int = 0, architecture: str = "topk", grad_clip: bool = True) -> list[Collective]:
    """Every collective one rank makes in one training step of one SAE, as saeworks' trainer does it
    (train/trainer.py, sae/sharded.py, sae/distributed.py). `aux_k`: the AuxK width this step
    (min(cfg.aux_k or d_in // 2, dead latents over all shards); 0 when no latent is dead).
    Float32 everywhere (4 bytes); gradient clipping on (the default, 1.0)."""
    if shards == 1:  # data parallel: one flattened all-reduce of grads + [4] stats + fired + flag
        if world == 1:
            return []
        numel = param_count(d_in, d_sae) + 4 + d_sae + 1
        return [Collective("all_reduce", "all", world, 4 * numel, "grads P + stats 4 + fired d_sae + flag")]
    replicas, rows = world // shards, batch * shards // world  # rows: the replica's batch B/R
    out = [Collective("all_gather", "shards", shards, 4 * rows * k, "top-k candidates [B/R, k]"),
           Collective("all_reduce", "shards", shards, 4 * rows * d_in, "partial x_hat [B/R, d_in]"),
           Collective("all_reduce", "shards", shards, 4, "dead-latent count")]
    if aux_k:
        out += [Collective("all_gather", "shards", shards, 4 * rows * aux_k, "AuxK candidates [B/R, aux_k]"),
                Collective("all_reduce", "shards", shards, 4 * rows * d_in, "AuxK partial [B/R, d_in]")]
    if architecture == "batchtopk":
        out.append(Collective("all_reduce", "all", world, 4, "threshold MIN"))
    out.append(Collective("all_reduce", "shards", shards, 4, "l0"))
    if replicas > 1:
        local = d_sae // shards
        out.append(Collective("all_reduce", "replicas", replicas, 4 * (2 * d_in * local + 2 * local),
                              "shard grads P/S + fired d_sae/S"))
    out.append(Collective("all_reduce", "all", world, 4 * (d_in + 4 + 1), "b_dec grad + stats 4 + flag"))
    if grad_clip:
        out.append(Collective("all_reduce", "shards", shards, 4, "grad-norm^2 (clipping)"))
    return out


@dataclass(frozen=True)
class Hardware:
    """The assumed GPU cluster (every field an assumption, set from the command line)."""

    flops: float = 400e12
    """Dense matmul rate of one GPU, FLOP/s (H100-class, bf16, achieved, not peak)."""
    efficiency: float = 0.5
    """Step efficiency e: encoder-matmul time / forward+backward time (measured here by default)."""
    hbm: float = 3.35e12
    """GPU memory bandwidth, bytes/s (H100 SXM HBM3)."""
    update_bytes: float = 60.0
    """Bytes of memory traffic per parameter per step outside the matmuls, counted (fp32): Adam reads
    p, g, m, v and writes p, m, v (28); the backward writes the dense gradient (4) and zero_grad
    clears it (4); clipping reads it and scales it (12); the decoder half's gradient projection and
    normalisation (~12 averaged over P). The CPU's figure is printed, not used: its update is not
    memory-bound."""
    bw_intra: float = 450e9
    """Per-GPU bandwidth inside a node, bytes/s (NVLink 4, one direction)."""
    bw_nic: float = 50e9
    """Per-GPU network bandwidth across nodes, bytes/s (InfiniBand NDR 400 Gb/s, one NIC per GPU)."""
    gpus_per_node: int = 8
    latency: float = 10e-6
    """Seconds added per collective call."""
    memory: float = 80e9
    """GPU memory, bytes."""


def group_bandwidth(group: str, world: int, shards: int, hw: Hardware) -> float:
    """Per-GPU bandwidth of a collective over `group`: NVLink when the group sits in one node, else
    the NICs of its members on one node, g x bw_nic (a ring uses one NIC per member; capped by
    NVLink). Shards are adjacent ranks, replicas stride by S."""
    node = hw.gpus_per_node
    if group == "shards":
        span, per_node = shards, min(shards, node)
    elif group == "replicas":
        span, per_node = world, max(1, node // shards)
    else:
        span, per_node = world, min(world, node)
    return hw.bw_intra if span <= node else min(hw.bw_intra, per_node * hw.bw_nic)


def collective_seconds(c: Collective, world: int, shards: int, hw: Hardware) -> float:
    """Ring all-reduce: 2 (n-1)/n x bytes sent per rank; all-gather: (n-1) x bytes; + latency."""
    if c.size == 1:
        return 0.0
    sent = 2 * (c.size - 1) / c.size * c.nbytes if c.op == "all_reduce" else (c.size - 1) * c.nbytes
    return sent / group_bandwidth(c.group, world, shards, hw) + hw.latency


@dataclass(frozen=True)
class Projection:
    """One SAE's step on `gpus` GPUs, per GPU."""

    d_in: int
    d_sae: int
    batch: int
    gpus: int
    shards: int
    compute_s: float
    update_s: float
    comm_s: float
    memory_gb: float
    fits: bool

    @property
    def step_s(self) -> float:
        return self.compute_s + self.update_s + self.comm_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def mode(self) -> str:
        return "DP" if self.shards == 1 else f"LS S={self.shards}"


def project(d_in: int, d_sae: int, k: int, batch: int, gpus: int, shards: int, hw: Hardware,
            aux_k: int | None = None) -> Projection:
    """The scaling model (README "Scaling model"), per GPU and step, R = gpus / S replicas:
    compute = 2 (B/R) d_in (d_sae/S) / (F e)   (encoder FLOPs; e folds in top-k, the sparse decode
              and backward ~8 k d_in per row, and AuxK, as measured in one process)
    update  = U P/S / HBM                      (Adam, projection, clipping, normalisation: per param)
    comm    = sum over step_collectives of ring all-reduce 2(n-1)/n x bytes / BW, all-gather
              (n-1) x bytes / BW, + latency per call (AuxK on: dead latents exist)
    memory  = 16 P/S (weights, grads, Adam m and v, fp32) + 4 (B/R) d_sae/S (pre-activations)."""
    replicas = gpus // shards
    rows = batch // replicas
    aux = d_in // 2 if aux_k is None else aux_k
    params = param_count(d_in, d_sae)
    compute = 2 * rows * d_in * (d_sae / shards) / (hw.flops * hw.efficiency)
    update = hw.update_bytes * params / shards / hw.hbm
    comm = sum(collective_seconds(c, gpus, shards, hw)
               for c in step_collectives(d_in, d_sae, k, batch, gpus, shards, aux if shards > 1 else 0))
    memory = 16 * params / shards + 4 * rows * d_sae / shards
    return Projection(d_in, d_sae, batch, gpus, shards, compute, update, comm, memory / 1e9,
                      memory <= hw.memory)


def projections(shapes: list[tuple[int, int]], batches: list[int], gpu_counts: list[int], k: int,
                hw: Hardware, aux_k: int | None) -> list[Projection]:
    """For each shape, batch and GPU count: data parallel, latent sharding in one node
    (S = gpus_per_node) and the fastest S that fits (powers of two up to the GPU count)."""
    out = []
    for d_in, d_sae in shapes:
        for batch in batches:
            out.append(project(d_in, d_sae, k, batch, 1, 1, hw, aux_k))
            for gpus in gpu_counts:
                dp = project(d_in, d_sae, k, batch, gpus, 1, hw, aux_k)
                options = [project(d_in, d_sae, k, batch, gpus, 2 ** i, hw, aux_k)
                           for i in range(1, int(math.log2(gpus)) + 1)
                           if d_sae % 2 ** i == 0 and batch % (gpus // 2 ** i) == 0]
                node = [p for p in options if p.shards == min(hw.gpus_per_node, gpus)]
                fitting = [p for p in options if p.fits] or options
                best = min(fitting, key=lambda p: p.step_s)
                out += [dp, *node, *([best] if not node or best.shards != node[0].shards else [])]
    return out


def projection_table(rows: list[Projection]) -> str:
    base: dict[tuple[int, int, int], float] = {}
    lines = [f"{'d_in':>5} {'d_sae':>9} {'batch':>6} {'GPUs':>4} {'mode':>9} {'mem GB':>7} "
             f"{'compute':>8} {'update':>8} {'comm':>8} {'step ms':>8} {'tok/s':>11} {'scaling':>7}"]
    for p in rows:
        key = (p.d_in, p.d_sae, p.batch)
        if p.gpus == 1:
            base[key] = p.tokens_per_s if p.fits else float("nan")
        scaling = p.tokens_per_s / (p.gpus * base[key]) if p.gpus > 1 and p.fits else float("nan")
        width = f"2^{round(math.log2(p.d_sae))}" if p.d_sae & (p.d_sae - 1) == 0 else str(p.d_sae)
        lines.append(f"{p.d_in:>5} {width:>9} "
                     f"{p.batch:>6} {p.gpus:>4} {p.mode:>9} {p.memory_gb:>7.1f}{' ' if p.fits else '!'}"
                     f"{p.compute_s * 1e3:>8.2f} {p.update_s * 1e3:>8.2f} {p.comm_s * 1e3:>8.2f} "
                     f"{p.step_s * 1e3:>8.2f} {p.tokens_per_s:>11,.0f} "
                     f"{'' if math.isnan(scaling) else f'{scaling:.2f}':>7}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Measurement: the worker (torchrun runs this file with --worker)


class _Recorder:
    """Wraps torch.distributed's collectives and the trainer's phases in this process."""

    def __init__(self) -> None:
        self.step, self.periodic = -1, 0
        self.calls: list[dict[str, Any]] = []
        self.starts: list[float] = []
        self.phase_s: dict[str, list[float]] = {"forward_backward": [], "optimizer_step": []}
        self.dead: list[list[int]] = []
        self.done = False
        self.d_in = 0

    def install(self) -> None:
        import torch.distributed as dist

        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._collective(name, getattr(dist, name)))
        from saeworks.train import trainer

        cls = trainer.Trainer
        boundary = "prepare" if hasattr(cls, "prepare") else "forward_backward"
        setattr(cls, boundary, self._boundary(getattr(cls, boundary)))
        for name in ("forward_backward", "optimizer_step"):
            setattr(cls, name, self._timed(name, getattr(cls, name)))
        for name in PERIODIC:
            if hasattr(cls, name):
                setattr(cls, name, self._aside(getattr(cls, name)))
        cls.fit = self._finish(cls.fit)
        from saeworks.train import run

        if hasattr(run, "_write_checkpoint"):
            run._write_checkpoint = self._aside(run._write_checkpoint)

    def _collective(self, name: str, fn: Any) -> Any:
        import torch.distributed as dist

        signature = inspect.signature(fn)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            group = bound.arguments.get("group")
            if name == "all_gather_object":
                nbytes, numel = len(pickle.dumps(bound.arguments["obj"])), -1
            else:
                tensor = bound.arguments.get("tensor")
                if tensor is None:  # reduce_scatter(output, input_list): the inputs
                    tensor = torch.cat([t.reshape(-1) for t in bound.arguments["input_list"]])
                numel, nbytes = tensor.numel(), tensor.numel() * tensor.element_size()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            where = "after" if self.done else "periodic" if self.periodic else \
                "setup" if self.step < 0 else "step"
            self.calls.append({"op": name, "size": dist.get_world_size(group), "numel": numel,
                               "bytes": nbytes, "step": self.step, "where": where,
                               "seconds": time.perf_counter() - start})
            return result

        return wrapped

    def _boundary(self, fn: Any) -> Any:
        def wrapped(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            self.step += 1
            self.starts.append(time.perf_counter())
            self.dead.append([int(m.sum()) if m is not None else 0 for m in trainer.dead.masks()])
            self.d_in = trainer.saes[0].d_in
            return fn(trainer, *args, **kwargs)

        return wrapped

    def _timed(self, name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.phase_s[name].append(time.perf_counter() - start)
            return result

        return wrapped

    def _aside(self, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.periodic += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.periodic -= 1

        return wrapped

    def _finish(self, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                self.done = True

        return wrapped


def worker(args: argparse.Namespace) -> None:
    """Train through `saeworks.api.train_saes` with the collectives counted; write this rank's log."""
    recorder = _Recorder()
    recorder.install()
    from saeworks.api import train_saes

    rank = int(os.environ.get("RANK", "0"))
    overrides = {
        "run_dir": args.run_dir, "train.store": args.store,
        "train.saes": f"[{{architecture: {args.architecture}, k: {args.k}, d_sae: {args.d_sae}}}]",
        "train.total_tokens": args.batch * args.steps, "train.batch_size": args.batch,
        "train.init_sample_rows": args.batch, "train.log_every_steps": 10**6,
        "train.dead_after_tokens": args.batch,  # a latent silent for one step is dead: AuxK runs
        "train.wandb": "false", "train.device": "cpu", "train.latent_shards": args.shards,
        "train.reader.buffer_chunks": 4, "train.b_dec_init": "mean",
    }
    train_saes(None, *[f"{key}={value}" for key, value in overrides.items()])
    # this rank's encoder matmul, [B/R, d_in] @ [d_in, d_sae/S], timed in the same process right after
    # (the cores are shared with other work: the fastest of 5 stands for the machine)
    rows, d_in = args.batch * args.shards // int(os.environ.get("WORLD_SIZE", "1")), recorder.d_in
    x, w = torch.randn(rows, d_in), torch.randn(d_in, args.d_sae // args.shards)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - start)
    out = {"rank": rank, "calls": recorder.calls, "starts": recorder.starts, "dead": recorder.dead,
           "phase_s": recorder.phase_s, "threads": torch.get_num_threads(), "matmul_s": min(times[1:])}
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# Measurement: the parent


def make_store(path: Path, d_in: int, rows: int, seed: int = 0) -> None:
    """A float32 store of one hook holding `rows` synthetic rows (sparse codes over 4 d_in random
    unit directions, ~8 per row, plus an offset and noise), no excluded positions."""
    from saeworks.activations.store import StoreGeometry, create_store, finalize, write_shard

    windows = math.ceil(rows / CONTEXT)
    geometry = StoreGeometry.plan(windows, CONTEXT, chunk_tokens=8 * CONTEXT, chunks_per_shard=8)
    store = create_store(str(path), {"benchmark": "scaling"}, geometry, {HOOK: d_in}, "float32", "none",
                         {"model": "synthetic-model", "dataset": "synthetic-text"})
    rng = np.random.default_rng(seed)
    n_features = 4 * d_in
    directions = rng.standard_normal((n_features, d_in), dtype=np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    for shard in range(geometry.n_shards):
        part = geometry.shard_windows(shard)
        n = (part.stop - part.start) * CONTEXT
        active = rng.integers(0, n_features, (n, 8))
        scales = rng.exponential(3.0, (n, 8)).astype(np.float32)
        values = np.einsum("nj,njd->nd", scales, directions[active]) + 1.0
        values += 0.05 * rng.standard_normal(values.shape, dtype=np.float32)
        token_ids = rng.integers(1, 100, (part.stop - part.start, CONTEXT), dtype=np.int32)
        write_shard(store, shard, {HOOK: values.astype(np.float32)}, token_ids)
    finalize(store, windows)


def launch(args: argparse.Namespace, store: Path, root: Path, processes: int,
           shards: int) -> list[dict[str, Any]]:
    """Run the worker in `processes` processes (torchrun, gloo; 1: a plain process with every core)."""
    out, run_dir = root / f"out-{processes}-{shards}", root / f"run-{processes}-{shards}"
    out.mkdir()
    worker_args = [__file__, "--worker", "--store", str(store), "--run-dir", str(run_dir), "--out", str(out),
                   "--d-sae", str(args.d_sae), "--k", str(args.k), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--shards", str(shards), "--architecture", args.architecture]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = "1"  # one core per process: a process stands for one device
    if processes == 1:
        command = [sys.executable, *worker_args]
        env.pop("WORLD_SIZE", None)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(processes), *worker_args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(command[:6])} ...):\n{result.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def step_time(log: dict[str, Any]) -> float:
    """Median interval between step starts, the first step (warm-up) and the last (it logs and
    checkpoints) left out."""
    gaps = np.diff(log["starts"])[1:]
    return float(statistics.median(gaps)) if len(gaps) else float("nan")


def per_step(log: dict[str, Any], step: int) -> list[dict[str, Any]]:
    return [c for c in log["calls"] if c["where"] == "step" and c["step"] == step]


def check_bytes(logs: list[dict[str, Any]], args: argparse.Namespace, shards: int, d_in: int,
                resolved_aux_k: int) -> tuple[list[str], bool, list[dict[str, Any]]]:
    """Per step: measured calls and bytes of rank 0 vs step_collectives; every rank must agree."""
    world, lines, agree, table = len(logs), [], True, []
    for step in range(args.steps):
        dead = sum(log["dead"][step][0] for log in logs) if shards > 1 else logs[0]["dead"][step][0]
        aux = min(resolved_aux_k, dead) if shards > 1 else 0
        want = step_collectives(d_in, args.d_sae, args.k, args.batch, world, shards, aux, args.architecture)
        got = [per_step(log, step) for log in logs]
        want_ops = [(c.op, c.size, c.nbytes) for c in want]
        got_ops = [[(c["op"], c["size"], c["bytes"]) for c in calls] for calls in got]
        same = all(sorted(ops) == sorted(want_ops) for ops in got_ops)
        agree &= same
        measured = sum(c["bytes"] for c in got[0])
        predicted = sum(c.nbytes for c in want)
        seconds = sum(c["seconds"] for c in got[0])
        table.append({"step": step, "dead": dead, "calls": len(got[0]), "bytes": measured,
                      "predicted_calls": len(want), "predicted_bytes": predicted, "match": same,
                      "seconds_in_collectives": seconds})
        lines.append(f"  step {step}: dead {dead:>5}  calls {len(got[0]):>2} (formula {len(want):>2})  "
                     f"bytes/rank {measured:>12,} (formula {predicted:>12,})  "
                     f"{'exact' if same else 'MISMATCH'}  in collectives {seconds * 1e3:7.1f} ms")
        if not same:
            lines.append(f"    measured {got_ops[0]}\n    formula  {want_ops}")
    other = {where: sum(c["bytes"] for c in logs[0]["calls"] if c["where"] == where)
             for where in ("setup", "periodic", "after")}
    lines.append(f"  not per step (rank 0): setup {other['setup']:,} B, logging/checkpoint "
                 f"{other['periodic']:,} B, saving {other['after']:,} B")
    if shards > 1 and args.steps:
        lines.append("  breakdown of the last full step (formula): " + "; ".join(
            f"{c.what} {c.op}[{c.group} {c.size}] {c.nbytes:,} B"
            for c in step_collectives(d_in, args.d_sae, args.k, args.batch, world, shards,
                                      min(resolved_aux_k, table[-1]["dead"]), args.architecture)))
    return lines, agree, table


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_bandwidth(numel: int, repeats: int = 5) -> float:
    """Bytes/s of a bare float32 copy (read + write) of `numel` elements."""
    a, b = torch.randn(numel), torch.empty(numel)
    b.copy_(a)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - start)
    return 8 * numel / statistics.median(times)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    d_in = args.d_in
    torch.set_num_threads(1)  # as each worker process: one core stands for one device
    x, w = torch.randn(args.batch, d_in), torch.randn(d_in, args.d_sae)
    matmul = min(_timed(lambda: x @ w) for _ in range(7))  # the fastest: other work shares the cores
    gflops = 2 * args.batch * d_in * args.d_sae / matmul / 1e9
    params = param_count(d_in, args.d_sae)
    copy = copy_bandwidth(params)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (other work shares "
          f"these cores), torch {torch.__version__}, {torch.get_num_threads()} threads | "
          f"encoder matmul [{args.batch} x {d_in}] @ [{d_in} x {args.d_sae}] fp32: {matmul * 1e3:.1f} ms, "
          f"{gflops:.1f} GFLOP/s | bare copy {copy / 1e9:.1f} GB/s", flush=True)
    aux_k = args.aux_k if args.aux_k is not None else d_in // 2
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "matmul_s": matmul, "gflops": gflops,
                                           "copy_bytes_per_s": copy}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = root / "store.zarr"
        make_store(store, d_in, args.batch * (args.steps + 2))
        for name, processes, shards in (("1 process", 1, 1), ("2 proc data parallel", 2, 1),
                                        ("2 latent shards", 2, 2)):
            start = time.perf_counter()
            logs = launch(args, store, root, processes, shards)
            seconds = step_time(logs[0])
            fb = min(logs[0]["phase_s"]["forward_backward"][1:-1] or [float("nan")])
            upd = min(logs[0]["phase_s"]["optimizer_step"][1:-1] or [float("nan")])
            local_matmul = logs[0]["matmul_s"]
            wall = time.perf_counter() - start
            print(f"\n{name} ({processes} x {logs[0]['threads']} threads, {wall:.0f} s wall): "
                  f"step {seconds * 1e3:.0f} ms = {args.batch / seconds:,.0f} tok/s "
                  f"(fastest steps on rank 0: forward+backward {fb * 1e3:.0f} ms, update {upd * 1e3:.0f} ms; "
                  f"its encoder matmul alone {local_matmul * 1e3:.0f} ms = {local_matmul / fb:.2f} of "
                  f"forward+backward)", flush=True)
            run: dict[str, Any] = {"processes": processes, "shards": shards, "step_s": seconds,
                                   "tokens_per_s": args.batch / seconds, "forward_backward_s": fb,
                                   "update_s": upd, "local_matmul_s": local_matmul}
            if processes == 1:
                local_matmul = min(local_matmul, matmul)  # the fastest seen in this run, same shape
                efficiency = local_matmul / fb
                update_bytes = upd * copy / params
                run.update(efficiency=efficiency, update_bytes_per_param=update_bytes)
                print(f"  step efficiency e = matmul / forward+backward = {efficiency:.2f}; matmul / median "
                      f"step = {local_matmul / seconds:.2f}; update = {update_bytes:.0f} bytes/param at the "
                      f"copy bandwidth (P = {params:,}; the CPU's update is compute-bound, the "
                      f"projection counts bytes instead)", flush=True)
            else:
                lines, agree, table = check_bytes(logs, args, shards, d_in, aux_k)
                print("\n".join(lines), flush=True)
                run.update(bytes_match_formula=agree, steps=table)
            results["runs"][name] = run
    single = results["runs"]["1 process"]["tokens_per_s"]
    results["machine"]["load_after"] = os.getloadavg()[0]
    print(f"\nload average now {os.getloadavg()[0]:.1f}; throughput vs 1 process: " + ", ".join(
        f"{name} {run['tokens_per_s'] / single:.2f}x" for name, run in results["runs"].items()), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: d_sae 4096, batch 512")
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=9216)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--aux-k", type=int, default=None, help="default: d_in // 2, as the SAEs do")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--architecture", choices=["topk", "batchtopk"], default="topk")
    parser.add_argument("--no-measure", action="store_true", help="projection only (give --efficiency)")
    parser.add_argument("--json", default=None, help="write measurements and projections here")
    hw = Hardware()
    parser.add_argument("--flops", type=float, default=hw.flops, help="GPU dense matmul FLOP/s")
    parser.add_argument("--efficiency", type=float, default=None, help="default: measured here")
    parser.add_argument("--update-bytes", type=float, default=hw.update_bytes,
                        help="memory traffic per parameter per step outside the matmuls (counted)")
    parser.add_argument("--hbm", type=float, default=hw.hbm, help="GPU memory bandwidth, bytes/s")
    parser.add_argument("--bw-intra", type=float, default=hw.bw_intra, help="NVLink per GPU, bytes/s")
    parser.add_argument("--bw-nic", type=float, default=hw.bw_nic, help="network per GPU, bytes/s")
    parser.add_argument("--gpus-per-node", type=int, default=hw.gpus_per_node)
    parser.add_argument("--latency", type=float, default=hw.latency, help="seconds per collective")
    parser.add_argument("--memory", type=float, default=hw.memory, help="GPU memory, bytes")
    parser.add_argument("--gpus", default="8,64,512")
    parser.add_argument("--project-batches", default="4096,65536")
    parser.add_argument("--project-shapes", default="576:65536,4096:65536,4096:1048576,4096:16777216")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.d_sae, args.batch = 4096, 512
    results: dict[str, Any] = {}
    efficiency = args.efficiency
    if not args.no_measure:
        results = measure(args)
        efficiency = efficiency if efficiency is not None else results["runs"]["1 process"]["efficiency"]
    hardware = Hardware(args.flops, efficiency if efficiency is not None else hw.efficiency, args.hbm,
                        args.update_bytes, args.bw_intra,
                        args.bw_nic, args.gpus_per_node, args.latency, args.memory)
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.project_shapes.split(",")]
    rows = projections([(a, b) for a, b in shapes], [int(b) for b in args.project_batches.split(",")],
                       [int(g) for g in args.gpus.split(",")], args.k, hardware, args.aux_k)
    print(f"\nprojection (formula, README \"Scaling model\"): F {hardware.flops / 1e12:.0f} TFLOP/s x e "
          f"{hardware.efficiency:.2f}, update {hardware.update_bytes:.0f} B/param at HBM "
          f"{hardware.hbm / 1e12:.2f} TB/s, NVLink {hardware.bw_intra / 1e9:.0f} GB/s, NIC "
          f"{hardware.bw_nic / 1e9:.0f} GB/s per GPU, {hardware.gpus_per_node} GPUs/node, latency "
          f"{hardware.latency * 1e6:.0f} us/collective, {hardware.memory / 1e9:.0f} GB; k {args.k}, AuxK on "
          f"(aux_k {'d_in/2' if args.aux_k is None else args.aux_k}); times in ms per step; '!' = does not "
          f"fit; scaling = tok/s / (GPUs x 1-GPU tok/s)")
    print(projection_table(rows))
    if args.json:
        results["hardware"] = asdict(hardware)
        results["projection"] = [{**asdict(p), "step_s": p.step_s, "tokens_per_s": p.tokens_per_s}
                                 for p in rows]
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
