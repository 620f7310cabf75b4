"""SAE training-step throughput on stored activations, against the encoder matmul limit.

    python benchmarks/train_step.py --store runs/demo/activations.zarr
    python benchmarks/train_step.py --store runs/demo/activations.zarr --autocast bfloat16

One step = what `train.trainer.Trainer` does per step, run by the Trainer itself without its
logging and checkpoints: read a batch (reader thread), scale it, forward, backward, the reduction,
loss check, decoder-gradient projection, gradient clipping, Adam, decoder normalisation, dead-latent
counters. The limit is one bare matmul of the encoder's shape [batch, d_in] @ [d_in, d_sae] in the
same dtype into a kept output (sae/limits.py), timed once after every timed step (the median of
those: a shared VM's speed drifts by 30% within minutes, so a limit taken once before is not the
limit the steps ran under); a TopK step can approach
it because its backward and decode are sparse (k of d_sae latents), a ReLU step cannot (its
backward is dense: about 3 such matmuls). `--profile` prints where the TopK step's time goes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from saeworks.activations.config import ReaderConfig
from saeworks.activations.reader import ActivationReader
from saeworks.activations.store import ActivationStore
from saeworks.sae.config import SAEConfig
from saeworks.sae.heap import keep_freed_heap
from saeworks.sae.limits import MatmulProbe
from saeworks.sae.registry import ARCHITECTURES, create_sae
from saeworks.train.config import TrainConfig
from saeworks.train.data import SourceInfo
from saeworks.train.plan import make_hooks_plan
from saeworks.train.trainer import Trainer


def step_seconds(cfg: SAEConfig, reader: ActivationReader, scale: float, steps: int,
                 autocast: str, probe: MatmulProbe, profile: bool = False) -> tuple[float, float]:
    """Median time of a full training step of one SAE by the real `Trainer` (after 2 warm-up
    steps): read, scale, forward, backward, the (one-process) reduction, loss check, decoder-
    gradient projection, clipping, Adam, decoder normalisation, dead-latent counters; and the
    median time of the limit's matmul (`probe`), timed once after every step."""
    torch.manual_seed(0)
    batch = reader.cfg.batch_size
    train_cfg = TrainConfig(saes=[cfg], batch_size=batch, total_tokens=batch * (steps + 2),
                            autocast=autocast)  # type: ignore[arg-type]
    info = SourceInfo(reader.hook, int(cfg.d_in or 0), "the benchmark store", {}, {})
    plan = make_hooks_plan(train_cfg, [info], 1)
    trainer = Trainer([create_sae(cfg)], plan, train_cfg, scale, torch.device("cpu"))
    batches, times, limits = iter(reader), [], []
    profiler = torch.profiler.profile() if profile else nullcontext()
    with profiler, keep_freed_heap():  # as Trainer.fit runs its steps
        for step in range(steps + 2):
            start = time.perf_counter()
            inputs = trainer.prepare(next(batches).activations)
            stats = trainer.forward_backward(inputs)
            trainer.reduce(stats, False)
            trainer.check_losses(stats)
            trainer.optimizer_step()
            trainer.dead.update(stats.fired, batch)
            trainer.step += 1
            if step >= 2:
                times.append(time.perf_counter() - start)
                if not profile:
                    limits.append(probe())
    if profile:
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)  # type: ignore[union-attr]
        print(table)
    return statistics.median(times), statistics.median(limits) if limits else probe()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--hook", default=None)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--d-sae", type=int, default=9216)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--autocast", choices=["none", "bfloat16"], default="none")
    parser.add_argument("--architectures", default="topk,relu")
    parser.add_argument("--profile", action="store_true", help="print the top ops of the TopK steps")
    args = parser.parse_args()
    store = ActivationStore.open(args.store)
    hook = args.hook or store.hooks[0]
    reader = ActivationReader(store, hook, ReaderConfig(batch_size=args.batch_size))
    sample = next(iter(reader)).activations.float()
    scale = float((store.d(hook) / sample.pow(2).sum(dim=1).mean()) ** 0.5)  # mean ||x||^2 = d_in
    dtype = torch.bfloat16 if args.autocast == "bfloat16" else torch.float32
    probe = MatmulProbe(args.batch_size, store.d(hook), args.d_sae, dtype)
    for architecture in args.architectures.split(","):
        if architecture not in ARCHITECTURES:
            continue
        cfg = SAEConfig(architecture=architecture, k=args.k, d_sae=args.d_sae).resolved(store.d(hook))
        seconds, limit = step_seconds(cfg, reader, scale, args.steps, args.autocast, probe,
                                      args.profile and architecture == "topk")
        print(f"train step {architecture}: {args.batch_size / seconds:,.0f} tok/s (d_in {cfg.d_in}, "
              f"d_sae {cfg.d_sae}, k {cfg.k}, batch {args.batch_size}, {args.autocast}) | encoder "
              f"matmul limit {args.batch_size / limit:,.0f} tok/s | {limit / seconds:.2f} of the limit",
              flush=True)


if __name__ == "__main__":
    main()
