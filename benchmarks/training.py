"""End-to-end SAE training on stored activations: throughput, then quality on held-out text.

    python benchmarks/training.py --store runs/demo/activations.zarr            # TopK k=32, 9216, fp32
    python benchmarks/training.py --store runs/demo/activations.zarr train.autocast=bfloat16

Runs `saeworks train` (one pass over the store) through the real trainer, then evaluates the saved
SAE on windows the store does not hold (later windows of the same seeded text stream):
- FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over kept rows, in raw activation space;
- CE-loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), next-token cross-entropy with the
  SAE's reconstruction spliced in at its hook (clean activations kept at the excluded positions,
  which training never saw), versus the hook zero-ablated at the same positions;
- dead latents: silent for `train.dead_after_tokens` training tokens at the end (the trainer's
  counter), and never active on the held-out rows (a small sample: rare latents look dead there).
The limit is the encoder matmul [batch, d_in] @ [d_in, d_sae] in float32 on this machine,
measured in the same run. One line of figures at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from activations.hooks import hooks_attached
from activations.model import load_model, load_tokenizer
from activations.store import ActivationStore
from activations.text import iter_windows
from sae.base import SparseAutoencoder
from sae.configio import load_config
from sae.io import load_sae
from sae.limits import matmul_seconds
from sae.run_config import RunConfig
from train.run import train


def held_out_windows(cfg: RunConfig, skip: int, count: int) -> torch.Tensor:
    """[count, context_size] windows after the first `skip` of the configured stream."""
    windows = iter_windows(load_tokenizer(cfg.model), cfg.data, skip + count)
    return torch.from_numpy(np.stack(list(windows)[skip:])).long()


def next_token_ce(model: torch.nn.Module, windows: torch.Tensor, hook: str,
                  replace: Callable[[torch.Tensor], torch.Tensor] | None) -> float:
    """Mean next-token cross-entropy over the windows (positions 1.. predicted)."""
    losses = []
    for batch in windows.split(16):
        fns = {hook: replace} if replace else {}
        with torch.no_grad(), hooks_attached(model, fns):
            logits = model(input_ids=batch, use_cache=False).logits
        losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="none"))
    return float(torch.cat(losses).mean())


def splice(sae: SparseAutoencoder | None, first_kept: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Replace activations [batch, pos, d] from position `first_kept` on (zeros when sae is None)."""
    def replace(activations: torch.Tensor) -> torch.Tensor:
        out = activations.clone()
        kept = activations[:, first_kept:]
        out[:, first_kept:] = torch.zeros_like(kept) if sae is None else sae(kept.float()).to(kept.dtype)
        return out
    return replace


def quality(cfg: RunConfig, sae: SparseAutoencoder, hook: str, skip: int, count: int) -> dict[str, float]:
    """Held-out FVU, L0, dead fraction and CE-loss recovered of one saved SAE."""
    model = load_model(cfg.model, "cpu")
    windows = held_out_windows(cfg, skip, count)
    first = cfg.data.exclude_first_positions
    captured: dict[str, torch.Tensor] = {}
    def record(activations: torch.Tensor) -> None:
        captured.setdefault("rows", []).append(activations[:, first:].reshape(-1, activations.shape[-1]))  # type: ignore[attr-defined]
    for batch in windows.split(16):
        with torch.no_grad(), hooks_attached(model, {hook: record}):
            model(input_ids=batch, use_cache=False)
    x = torch.cat(captured["rows"]).float()  # type: ignore[arg-type]
    with torch.no_grad():
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    clean = next_token_ce(model, windows, hook, None)
    spliced = next_token_ce(model, windows, hook, splice(sae, first))
    zero = next_token_ce(model, windows, hook, splice(None, first))
    return {"fvu": fvu, "l0": float((latents > 0).sum(1).float().mean()),
            "dead": float((latents > 0).sum(0).eq(0).float().mean()),
            "ce_clean": clean, "ce_sae": spliced, "ce_zero": zero,
            "ce_recovered": (zero - spliced) / (zero - clean)}


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
        start = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - start
        sae_cfg = cfg.train.saes[0].resolved(store.d(store.hooks[0]))
        sae = load_sae(cfg.layout.sae(sae_cfg.display_name))
        hook = cfg.train.hook or store.hooks[0]
        scores = quality(cfg, sae, hook, store.geometry.n_windows, args.held_out_windows)
        last = json.loads(cfg.layout.metrics.read_text().splitlines()[-1])
        trained_dead = last["dead"] / sae.d_sae  # silent for train.dead_after_tokens tokens
    limit = cfg.train.batch_size / matmul_seconds(cfg.train.batch_size, sae.d_in, sae.d_sae, torch.float32)
    rate = store.n_tokens / seconds
    print(f"train: {rate:,.0f} tok/s end to end ({sae_cfg.display_name}, {store.n_tokens:,} tokens, one "
          f"pass, {cfg.train.autocast}, {torch.get_num_threads()} threads) | encoder matmul limit "
          f"{limit:,.0f} tok/s | ratio {rate / limit:.2f} | held-out FVU {scores['fvu']:.3f}, L0 "
          f"{scores['l0']:.1f}, dead {trained_dead:.2%} (training) {scores['dead']:.2%} (held-out rows), "
          f"CE recovered {scores['ce_recovered']:.3f} "
          f"(clean {scores['ce_clean']:.3f}, SAE {scores['ce_sae']:.3f}, zero {scores['ce_zero']:.3f})")


if __name__ == "__main__":
    main()
