"""SAE training-step throughput on stored activations, against the encoder matmul limit.

    python benchmarks/train_step.py --store runs/demo/activations.zarr
    python benchmarks/train_step.py --store runs/demo/activations.zarr --autocast bfloat16

One step = read a batch (reader thread), scale it, forward, backward, decoder-gradient projection,
Adam, decoder normalisation: what the trainer does per step, without its logging. The limit is
one bare matmul of the encoder's shape [batch, d_in] @ [d_in, d_sae] in the same dtype, measured
in the same run; a TopK step can approach it because its backward and decode are sparse (k of
d_sae latents), a ReLU step cannot (its backward is dense: about 3 such matmuls).
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
from saeworks.sae.base import TrainContext
from saeworks.sae.config import SAEConfig
from saeworks.sae.limits import matmul_seconds
from saeworks.sae.registry import ARCHITECTURES, create_sae
from saeworks.train.schedule import sparsity_coefficient


def step_seconds(cfg: SAEConfig, reader: ActivationReader, scale: float, steps: int,
                 autocast: torch.dtype | None) -> float:
    """Median time of a full training step of one SAE (after 2 warm-up steps)."""
    torch.manual_seed(0)
    sae = create_sae(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 * (2**14 / sae.d_sae) ** 0.5)
    context = TrainContext(sparsity_coefficient(cfg), None)
    batches, times = iter(reader), []
    for step in range(steps + 2):
        start = time.perf_counter()
        x = next(batches).activations.float() * scale
        with torch.autocast("cpu", dtype=autocast) if autocast else nullcontext():
            out = sae.training_forward(x, context)
        out.loss.backward()
        sae.project_decoder_grad()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--hook", default=None)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--d-sae", type=int, default=9216)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--autocast", choices=["none", "bfloat16"], default="none")
    args = parser.parse_args()
    store = ActivationStore.open(args.store)
    hook = args.hook or store.hooks[0]
    reader = ActivationReader(store, hook, ReaderConfig(batch_size=args.batch_size))
    sample = next(iter(reader)).activations.float()
    scale = float((store.d(hook) / sample.pow(2).sum(dim=1).mean()) ** 0.5)  # mean ||x||^2 = d_in
    autocast = torch.bfloat16 if args.autocast == "bfloat16" else None
    limit = matmul_seconds(args.batch_size, store.d(hook), args.d_sae, autocast or torch.float32)
    for architecture in ("topk", "relu"):
        if architecture not in ARCHITECTURES:
            continue
        cfg = SAEConfig(architecture=architecture, k=args.k, d_sae=args.d_sae).resolved(store.d(hook))
        seconds = step_seconds(cfg, reader, scale, args.steps, autocast)
        print(f"train step {architecture}: {args.batch_size / seconds:,.0f} tok/s (d_in {cfg.d_in}, "
              f"d_sae {cfg.d_sae}, k {cfg.k}, batch {args.batch_size}, {args.autocast}) | encoder "
              f"matmul limit {args.batch_size / limit:,.0f} tok/s | step time / limit "
              f"{seconds / limit:.2f}", flush=True)


if __name__ == "__main__":
    main()
