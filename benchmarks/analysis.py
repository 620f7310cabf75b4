"""Feature-analysis throughput on a store, against the SAE encoder matmul limit.

    python benchmarks/analysis.py --store runs/demo/activations.zarr --sae runs/demo/saes/NAME
    python benchmarks/analysis.py --store STORE --sae SAE --max-tokens 65536 --model   # + logit effects

The analysis (eval/analysis.py) makes two passes over the same rows: pass 1 (count, sum, max,
top-N with contexts), pass 2 (histograms, band samples with contexts). Each pass covers every row
of the windows it reads, excluded rows included. Pass 2 replays pass 1's non-zero activations up
to `--replay-bytes` (default 1 GiB) and encodes only the rest again, so the SAE encodes each row
between once and twice: `encode passes` in the output. Then weight-only work: decoder neighbours,
and logit effects when `--model` loads the store's model. Tokens/s counts the analysed (kept)
rows over all of that. The limit is one bare [batch, d_in] @ [d_in, d_sae] float32 matmul per
batch of rows, timed after every batch of both passes (the median; the probes' time is taken out
of the analysis' time: a shared VM's speed drifts by 30% within minutes, so a limit taken before
and after is not the limit the batches ran under; the next batch's read, which starts after each
encode, may overlap a probe's first milliseconds): the analysis cannot beat rows / matmul time /
encode passes. On a GPU the probes run before and after instead (a probe between the batches
would make the host wait for the device, which the analysis never does). Prints one line per run;
with `--repeat N`, then the median ratio of the N runs (a shared VM's runs differ by several
percent, more than most changes to the analysis). Where
the encodes took the refined selection (sae/refined_selection.py: a TopK SAE's product in bfloat16,
measured faster on CPUs with fast bfloat16 matmuls) the float32 limit can be beaten; a last line
then gives the bfloat16 product's limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from saeworks.activations.model import load_model, model_config_of_store
from saeworks.activations.rows import RowSelection
from saeworks.activations.store import ActivationStore
from saeworks.eval.analysis import REPLAY_BYTES, analyze_features, encode_batch, window_batches
from saeworks.eval.config import AnalyzeConfig
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.io import load_sae, read_cfg
from saeworks.sae.limits import MatmulProbe, synchronize
from saeworks.sae.refined_selection import chosen_for
from saeworks.sae.topk import encodes_top_k


def encode_seconds(sae: SparseAutoencoder, store: ActivationStore, hook: str, rows: int) -> float:
    """Median time of the analysis' own encode of one batch of the store's rows (`encode_batch`:
    the widening, the matmul, the top-k, the entries; what each pass pays a batch before its
    bookkeeping). `sae.encode`, the dense [rows, d_sae] result, is not what the analysis runs."""
    selection = RowSelection.of_store(store, rows)
    windows = max(1, rows // store.context_size)
    batch = next(window_batches(store, hook, selection, windows)).to(sae.W_enc.device)
    times = []
    for _ in range(8):
        synchronize(sae.W_enc.device)
        start = time.perf_counter()
        encode_batch(sae, batch, store.context_size)
        synchronize(sae.W_enc.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--sae", required=True, help="SAE directory")
    parser.add_argument("--hook", default=None, help="default: the SAE's metadata.hook_name, else the first")
    parser.add_argument("--max-tokens", type=int, default=AnalyzeConfig.max_tokens)
    parser.add_argument("--batch-size", type=int, default=AnalyzeConfig.batch_size)
    parser.add_argument("--model", action="store_true", help="load the store's model for logit effects")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--replay-bytes", type=int, default=REPLAY_BYTES,
                        help="pass 1 activations held for pass 2 (0: encode every row twice)")
    parser.add_argument("--repeat", type=int, default=1, help="runs, then their median ratio")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    store = ActivationStore.open(args.store)
    hook = args.hook or read_cfg(args.sae).get("metadata", {}).get("hook_name") or store.hooks[0]
    sae = load_sae(args.sae, args.device)
    cfg = dataclasses.replace(AnalyzeConfig(), max_tokens=args.max_tokens, batch_size=args.batch_size,
                              device=args.device)
    model = None
    if args.model:
        model_cfg = dataclasses.replace(model_config_of_store(store.attrs.get("identity", {})),
                                        device=args.device)
        model = load_model(model_cfg, args.device)
    batch = max(1, cfg.batch_size // store.context_size) * store.context_size
    probe = MatmulProbe(batch, sae.d_in, sae.d_sae, sae.W_enc.dtype, args.device)  # on the analysis' device
    ratios = [run_once(sae, store, hook, cfg, model, args, batch, probe) for _ in range(args.repeat)]
    if args.repeat > 1:
        print(f"analysis: median ratio {statistics.median(ratios):.2f} of the encoder matmul limit over "
              f"{args.repeat} runs ({min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    if encodes_top_k(sae) and chosen_for(batch, sae.d_in, sae.d_sae, sae.cfg.k):
        product = MatmulProbe(batch, sae.d_in, sae.d_sae, torch.bfloat16, args.device)
        product_limit = statistics.median(product() for _ in range(5))
        print(f"analysis: the encodes took the refined selection (their product in bfloat16): that "
              f"product's limit is {batch / product_limit:,.0f} tok/s per encode", flush=True)


def run_once(sae: SparseAutoencoder, store: ActivationStore, hook: str, cfg: AnalyzeConfig,
             model: torch.nn.Module | None, args: argparse.Namespace, batch: int, probe: MatmulProbe
             ) -> float:
    """One analysis with its limit probed between the batches; prints its line, returns its ratio."""
    probes: list[float] = []  # each probe's matmul time
    probing: list[float] = []  # and the wall time of each call

    def probe_after_batch() -> None:
        start = time.perf_counter()
        probes.append(probe())
        probing.append(time.perf_counter() - start)

    on_cpu = torch.device(args.device).type == "cpu"
    if not on_cpu:  # a probe between the batches would wait for the device each time: before and after
        probes.extend(probe() for _ in range(5))
    analysis = analyze_features(sae, store, hook, cfg, model, args.device, progress=False,
                                replay_bytes=args.replay_bytes,
                                after_batch=probe_after_batch if on_cpu else None)
    if not on_cpu:
        probes.extend(probe() for _ in range(5))
    info = analysis.info
    limit = batch / statistics.median(probes)  # rows/s of one encode (between the batches on a CPU)
    encode_rate = batch / encode_seconds(sae, store, hook, batch)
    passes = info["encode_passes"]
    half = len(probing) // 2  # both passes go through the same batches (none off the CPU)
    tokens_per_s = info["n_tokens"] / (info["seconds"] - sum(probing))  # the analysis' own time
    per_pass = [info["n_tokens"] / (info["pass1_seconds"] - sum(probing[:half])),
                info["n_tokens"] / (info["pass2_seconds"] - sum(probing[half:]))]
    seconds = info["seconds"] - sum(probing)
    ratio = tokens_per_s / (limit / passes)
    print(f"analysis: {tokens_per_s:,.0f} tok/s, {sae.d_sae / seconds:,.1f} features/s over "
          f"{info['n_tokens']:,} tokens (d_in {sae.d_in}, d_sae {sae.d_sae}, batch {batch}; "
          f"{info['rows_per_pass']:,} rows per pass, {passes:.2f} encode passes) | encoder matmul limit "
          f"{limit:,.0f} tok/s per encode, {limit / passes:,.0f} for {passes:.2f} | ratio "
          f"{ratio:.2f} of that limit | pass 1 {per_pass[0]:,.0f} tok/s "
          f"({per_pass[0] / limit:.2f} of one matmul; its encode alone {encode_rate:,.0f} tok/s, "
          f"{encode_rate / limit:.2f}), pass 2 {per_pass[1]:,.0f} tok/s | neighbours "
          f"{info['neighbour_seconds']:.1f} s, logit effects {info['logit_seconds']:.1f} s "
          f"({info['logit_effects']})", flush=True)
    return ratio


if __name__ == "__main__":
    main()
