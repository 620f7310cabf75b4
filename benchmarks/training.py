"""End-to-end SAE training on stored activations: throughput, then quality on held-out text.

    python benchmarks/training.py --store runs/demo/activations.zarr            # TopK k=32, 9216, fp32
    python benchmarks/training.py --store runs/demo/activations.zarr train.autocast=bfloat16

Runs `saeworks train` (one pass over the store) through the real trainer, then evaluates the saved
SAE with `eval.evaluate.evaluate` on held-out documents (`data.holdout_fraction`, which the store
never holds; formulas in eval/metrics.py):
- FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over kept rows, in raw activation space;
- CE-loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), next-token cross-entropy of the
  predictions from the first kept position on, with the SAE's reconstruction spliced in at its hook
  (clean activations kept at the excluded positions, which training never saw), versus the hook
  zero-ablated at the same positions;
- dead latents: silent for `train.dead_after_tokens` training tokens at the end (the trainer's
  counter), and never active on the held-out rows (a small sample: rare latents look dead there).
The limit is the encoder matmul [batch, d_in] @ [d_in, d_sae] on this machine in the dtype the
training multiplies in (bfloat16 where `train.autocast` resolves to it), timed 5 times just before
and 5 times just after the training (the median; their range is printed too: a shared VM's
matmul speed drifts by 30% within minutes, and benchmarks/train_step.py, which probes after every
step, is the steadier ratio of the step). One line of figures at the end, with the wall
time split as `train` reports it (setup: the data, the SAEs, the initial sample; the steps alone;
checkpoints; saving): a short run's fixed costs weigh more than a long run's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from saeworks.activations.store import ActivationStore
from saeworks.eval.evaluate import evaluate
from saeworks.run_config import RunConfig
from saeworks.sae.configio import load_config
from saeworks.sae.io import load_sae
from saeworks.sae.limits import MatmulProbe
from saeworks.sae.precision import autocast_dtype
from saeworks.train.run import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--held-out-windows", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    args = parser.parse_args()
    store = ActivationStore.open(args.store)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(RunConfig, args.config, [f"run_dir={run_dir}", f"train.store={args.store}",
                                                   f"train.total_tokens={store.n_tokens}",
                                                   "train.wandb=false", *args.overrides])
        device = cfg.train.device if cfg.train.device != "auto" else "cpu"  # the probe runs on the CPU
        autocast = autocast_dtype(cfg.train.autocast, device)
        sae_cfg = cfg.train.saes[0].resolved(store.d(store.hooks[0]))
        probe = MatmulProbe(cfg.train.batch_size, int(sae_cfg.d_in or 0), int(sae_cfg.d_sae or 0),
                            torch.bfloat16 if autocast == "bfloat16" else torch.float32)
        probes = [probe() for _ in range(5)]
        start = time.perf_counter()
        spent = train(cfg.train_job()).seconds
        seconds = time.perf_counter() - start
        probes += [probe() for _ in range(5)]
        sae_dir = cfg.layout.sae(sae_cfg.display_name)
        sae = load_sae(sae_dir)
        held_out = args.held_out_windows * store.context_size
        cfg = replace(cfg, evaluate=replace(cfg.evaluate, held_out_tokens=held_out))
        scores = evaluate(sae_dir, cfg.evaluate, model=cfg.model, data=cfg.data).metrics
        last = json.loads(cfg.layout.metrics.read_text().splitlines()[-1])
        trained_dead = last["dead"] / sae.d_sae  # silent for train.dead_after_tokens tokens
    limit = cfg.train.batch_size / statistics.median(probes)
    rate = store.n_tokens / seconds
    steps_rate = store.n_tokens / spent.steps  # the loop alone: reads, steps, metrics
    print(f"train: {rate:,.0f} tok/s end to end ({sae_cfg.display_name}, {store.n_tokens:,} tokens, one "
          f"pass, autocast {cfg.train.autocast} = {autocast}, {torch.get_num_threads()} threads) | "
          f"encoder matmul limit {limit:,.0f} tok/s ({probe.x.dtype}; its 10 probes "
          f"{cfg.train.batch_size / max(probes):,.0f}-{cfg.train.batch_size / min(probes):,.0f}) | "
          f"ratio {rate / limit:.2f} | "
          f"{seconds:.1f} s = setup {spent.setup:.1f} + steps {spent.steps:.1f} ({steps_rate:,.0f} tok/s, "
          f"{steps_rate / limit:.2f} of the limit) + checkpoints {spent.checkpoints:.1f} + save "
          f"{spent.save:.1f} (+ {seconds - spent.total:.1f} outside train) | "
          f"held-out FVU {scores['fvu']:.3f}, L0 "
          f"{scores['l0']:.1f}, dead {trained_dead:.2%} (training) {scores['dead_fraction']:.2%} "
          f"(held-out rows), CE recovered {scores['ce_recovered']:.3f} (clean {scores['ce_clean']:.3f}, "
          f"SAE {scores['ce_spliced']:.3f}, zero {scores['ce_zero']:.3f})")


if __name__ == "__main__":
    main()
