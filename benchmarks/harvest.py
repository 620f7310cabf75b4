"""Harvester throughput against its limit: a bare HF forward truncated at the same layer.

    python benchmarks/harvest.py                       # embedded SmolLM2, layer 15, fp32, bf16, auto
    python benchmarks/harvest.py --dtypes float32 --tokens 32768
    python benchmarks/harvest.py --dtypes bfloat16 --tokens 131072 --compile   # harvest.compile

Both sides run the same token windows with the same batch size in the same process, each on a
freshly loaded model (so both pay the same first-batch warm-up; loading is not timed). The limit is
the model's own base forward with its block list cut after the hooked layer (no hooks, no copies,
no disk); the harvester's figure is end to end: tokenising, the forward, the float16 conversion,
compressing and writing the Zarr store. Prints one line per dtype with the ratio; for `auto`, the
dtype this machine's probe resolved it to (sae/precision.py), beside the fixed figures.
`--compile` harvests with `harvest.compile` (activations/compiled.py) against the same eager limit,
so a ratio above 1 is the compiled forward's gain; the process's first harvest pays the compile
(each run's figure is printed).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from saeworks.activations.config import ModelConfig
from saeworks.activations.harvest import harvest
from saeworks.activations.model import load_model, load_tokenizer
from saeworks.activations.text import iter_windows
from saeworks.run_config import RunConfig
from saeworks.sae.configio import load_config
from saeworks.sae.heap import keep_freed_heap
from saeworks.sae.precision import resolve_dtype


def bare_truncated_forward(model: torch.nn.Module, windows: np.ndarray, last_layer: int,
                           batch_size: int) -> float:
    """Tokens/s of the base model running blocks 0..last_layer only, its freed temporaries kept for
    the next batch (sae/heap.py, as the harvester keeps them): without, glibc hands them back and the
    next batch page-faults them in again (62,000 faults a batch of 32 x 128 bfloat16 tokens; the
    forward 16-20% slower, measured on 2 cores)."""
    base = model.base_model
    all_layers = base.layers
    base.layers = all_layers[: last_layer + 1]
    try:
        start = time.perf_counter()
        with torch.no_grad(), keep_freed_heap():
            for i in range(0, len(windows), batch_size):
                base(input_ids=torch.from_numpy(windows[i:i + batch_size]).long(), use_cache=False)
        return windows.size / (time.perf_counter() - start)
    finally:
        base.layers = all_layers


def harvester(cfg: RunConfig) -> float:
    """Tokens/s of a full harvest into a fresh temporary store."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg.run_dir = run_dir
        result = harvest(cfg.model, cfg.data, cfg.harvest, cfg.store_url)
        return result.tokens_harvested / result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "auto"])
    parser.add_argument("--compile", action="store_true", help="harvest with harvest.compile=true")
    args = parser.parse_args()
    hook = f"blocks.{args.layer}.hook_resid_post"
    for dtype in args.dtypes:
        cfg = load_config(RunConfig, None, [
            f"model.dtype={dtype}", "model.device=cpu", f"harvest.hooks=[{hook}]",
            f"harvest.max_tokens={args.tokens}", f"harvest.batch_size={args.batch_size}",
            f"harvest.compile={str(args.compile).lower()}"])
        model_cfg = ModelConfig(dtype=dtype, device="cpu")
        windows = np.stack(list(iter_windows(load_tokenizer(model_cfg), cfg.data,
                                             args.tokens // cfg.data.context_size)))
        limits, ours = [], []
        for _ in range(args.repeats):  # interleaved: the machine is shared and noisy
            # Both sides start from a freshly loaded (cold) model, loading untimed.
            limits.append(bare_truncated_forward(load_model(model_cfg), windows, args.layer,
                                                 args.batch_size))
            ours.append(harvester(cfg))
        limit, rate = statistics.median(limits), statistics.median(ours)
        shown = f"auto -> {resolve_dtype(dtype, 'cpu')}" if dtype == "auto" else dtype
        runs = f" | compiled, each run: {', '.join(f'{r:,.0f}' for r in ours)} tok/s" if args.compile else ""
        print(f"harvest: {rate:,.0f} tok/s ({shown}, {hook}, ctx {cfg.data.context_size}, batch "
              f"{args.batch_size}, {args.tokens} tokens, float16 store) | bare truncated forward "
              f"{limit:,.0f} tok/s | ratio {rate / limit:.3f}{runs}", flush=True)


if __name__ == "__main__":
    main()
