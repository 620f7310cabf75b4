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
Where the TopK step's top k comes from a bfloat16 product refined in float32 (sae/refined_selection.py,
measured faster on CPUs with fast bfloat16 matmuls), the step can beat that float32 limit; a second
line then gives its ratio to the bfloat16 product's limit too. A last line gives a second floor:
the product plus a bare Adam update of every parameter (torch's fused Adam, sae/limits.py
`AdamProbe`), memory bound, so the most any step can reach of the product's limit on this machine.

    python benchmarks/train_step.py --synthetic 2304 --d-sae 65536 --device cuda --autocast bfloat16

`--synthetic D_IN` trains on Gaussian activations with a decaying spectrum (generated on the device,
a pool of 8 batches cycled) instead of a store: for a GPU, or shapes no local store has. On a GPU
each step and each probe ends with a synchronisation.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Iterator
from contextlib import nullcontext

import torch

from saeworks.activations.config import ReaderConfig
from saeworks.activations.reader import ActivationReader
from saeworks.activations.store import ActivationStore
from saeworks.sae.config import SAEConfig
from saeworks.sae.heap import keep_freed_heap
from saeworks.sae.limits import AdamProbe, MatmulProbe, synchronize
from saeworks.sae.refined_selection import chosen_for
from saeworks.sae.registry import ARCHITECTURES, create_sae
from saeworks.train.config import TrainConfig
from saeworks.train.data import SourceInfo
from saeworks.train.plan import make_hooks_plan
from saeworks.train.trainer import Trainer


def step_seconds(cfg: SAEConfig, batches: Iterator[torch.Tensor], batch: int, hook: str, scale: float,
                 steps: int, autocast: str, probe: MatmulProbe, profile: bool = False) -> tuple[float, float]:
    """Median time of a full training step of one SAE by the real `Trainer` (after 2 warm-up
    steps) on the probe's device: read, scale, forward, backward, the (one-process) reduction, loss
    check, decoder-gradient projection, clipping, Adam, decoder normalisation, dead-latent counters;
    and the median time of the limit's matmul (`probe`), timed once after every step."""
    torch.manual_seed(0)
    device = probe.device
    train_cfg = TrainConfig(saes=[cfg], batch_size=batch, total_tokens=batch * (steps + 2),
                            autocast=autocast)  # type: ignore[arg-type]
    info = SourceInfo(hook, int(cfg.d_in or 0), "the benchmark activations", {}, {})
    plan = make_hooks_plan(train_cfg, [info], 1)
    trainer = Trainer([create_sae(cfg).to(device)], plan, train_cfg, scale, device)
    times, limits = [], []
    profiler = torch.profiler.profile() if profile else nullcontext()
    with profiler, keep_freed_heap():  # as Trainer.fit runs its steps
        for step in range(steps + 2):
            synchronize(device)
            start = time.perf_counter()
            inputs = trainer.prepare(next(batches))
            stats = trainer.forward_backward(inputs)
            trainer.reduce(stats, False)
            trainer.check_losses(stats)
            trainer.optimizer_step()
            trainer.dead.update(stats.fired, batch)
            trainer.step += 1
            synchronize(device)
            if step >= 2:
                times.append(time.perf_counter() - start)
                if not profile:
                    limits.append(probe())
    if profile:
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=key, row_limit=25)  # type: ignore[union-attr]
        print(table)
    return statistics.median(times), statistics.median(limits) if limits else probe()


def print_update_floor(cfg: SAEConfig, batch: int, seconds: float, product: float,
                       device: torch.device) -> None:
    """A second floor beside the product: every step also updates every parameter (Adam's moments
    move even where a gradient is zero), and that update is memory bound. Timed bare (`AdamProbe`,
    torch's fused Adam on tensors of this SAE's shapes, the median of 7), the product's time
    `product` plus it is the least any step can take here; its share says how far the product's
    limit alone can be approached at all."""
    update = AdamProbe([tuple(p.shape) for p in create_sae(cfg).parameters()], device)
    update_seconds = statistics.median(update() for _ in range(7))
    floor = product + update_seconds
    print(f"  update floor: the product ({product * 1e3:.1f} ms) + a bare Adam update of the "
          f"{update.elements:,} parameters ({update_seconds * 1e3:.1f} ms, fused torch Adam) = "
          f"{batch / floor:,.0f} tok/s; this step {floor / seconds:.2f} of it; no step here passes "
          f"{product / floor:.2f} of the product's limit", flush=True)


def synthetic_batches(d_in: int, batch: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless [batch, d_in] float32 batches on `device`: Gaussian rows with a decaying spectrum
    (the i-th of d_in random directions scaled by 1/sqrt(1 + i)), mean ||x||^2 = d_in; a pool of 8
    batches, cycled, so that generating them is not timed."""
    generator = torch.Generator(device=device).manual_seed(0)
    directions = torch.linalg.qr(torch.randn(d_in, d_in, device=device, generator=generator))[0]
    spectrum = (1.0 + torch.arange(d_in, device=device)).rsqrt()
    mixing = spectrum[:, None] * directions * (d_in / spectrum.pow(2).sum()).sqrt()  # [d_in, d_in]
    pool = [torch.randn(batch, d_in, device=device, generator=generator) @ mixing for _ in range(8)]
    return itertools.cycle(pool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="an activation store (or --synthetic)")
    parser.add_argument("--synthetic", type=int, metavar="D_IN",
                        help="train on synthetic activations of this width instead of a store")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--hook", default=None)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--d-sae", type=int, default=9216)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--autocast", choices=["none", "bfloat16"], default="none")
    parser.add_argument("--architectures", default="topk,relu")
    parser.add_argument("--profile", action="store_true", help="print the top ops of the TopK steps")
    args = parser.parse_args()
    if (args.store is None) == (args.synthetic is None):
        parser.error("give one of --store and --synthetic")
    device = torch.device(args.device)
    if args.synthetic is not None:
        d_in, hook, scale = args.synthetic, "synthetic", 1.0
        batches = synthetic_batches(d_in, args.batch_size, device)
    else:
        store = ActivationStore.open(args.store)
        hook = args.hook or store.hooks[0]
        d_in = store.d(hook)
        reader = ActivationReader(store, hook, ReaderConfig(batch_size=args.batch_size))
        batches = (batch.activations for batch in reader)
        sample = next(batches).float()
        scale = float((d_in / sample.pow(2).sum(dim=1).mean()) ** 0.5)  # mean ||x||^2 = d_in
    dtype = torch.bfloat16 if args.autocast == "bfloat16" else torch.float32
    probe = MatmulProbe(args.batch_size, d_in, args.d_sae, dtype, device)
    for architecture in args.architectures.split(","):
        if architecture not in ARCHITECTURES:
            continue
        cfg = SAEConfig(architecture=architecture, k=args.k, d_sae=args.d_sae).resolved(d_in)
        seconds, limit = step_seconds(cfg, batches, args.batch_size, hook, scale, args.steps, args.autocast,
                                      probe, args.profile and architecture == "topk")
        refined = architecture == "topk" and chosen_for(args.batch_size, d_in, args.d_sae, args.k)
        print(f"train step {architecture}: {args.batch_size / seconds:,.0f} tok/s (d_in {cfg.d_in}, "
              f"d_sae {cfg.d_sae}, k {cfg.k}, batch {args.batch_size}, {args.autocast}, {device}) | "
              f"encoder matmul limit {args.batch_size / limit:,.0f} tok/s | "
              f"{limit / seconds:.2f} of the limit", flush=True)
        product_limit = limit
        if refined:  # the step's dense product ran in bfloat16 (sae/refined_selection.py): its own limit
            product = MatmulProbe(args.batch_size, d_in, args.d_sae, torch.bfloat16, device)
            product_limit = statistics.median(product() for _ in range(5))
            print(f"  refined selection: the dense product in bfloat16, limit "
                  f"{args.batch_size / product_limit:,.0f} tok/s | "
                  f"{product_limit / seconds:.2f} of that limit", flush=True)
        print_update_floor(cfg, args.batch_size, seconds, product_limit, device)


if __name__ == "__main__":
    main()
