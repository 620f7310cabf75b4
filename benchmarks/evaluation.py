"""`saeworks evaluate` throughput on held-out documents, against the bare model forwards it needs.

    python benchmarks/evaluation.py --sae runs/demo/saes/topk-k32-9216
    python benchmarks/evaluation.py --sae runs/demo/saes/topk-k32-9216 evaluate.held_out_tokens=2048
    python benchmarks/evaluation.py --sae ... --full-forwards   # the old path: 4 full forwards per batch

Runs the real `saeworks.eval.evaluate.evaluate(sae_dir, ...)` (config plus key=value overrides) end to end:
loading the SAE, the tokenizer and the held-out windows, the model; pass 1, the prefix forward cut
short at the SAE's hook, scoring the SAE on the captured rows and keeping the suffix's input;
pass 2, four suffix forwards per batch (the blocks after the hook, final norm, head: clean, SAE
spliced, zero-ablated, mean-ablated) for CE and KL. Its loaders and forwards are wrapped with
timers (the module's own names, restored afterwards), so its time splits into setup (SAE,
tokenizer and windows, model), pass 1 (forwards; SAE and metrics) and pass 2 (forwards; CE/KL
scoring: once one window's logits match the head, the suffix forwards stop at the output head's
input and the head's product runs chunk by chunk inside the scoring, eval/head.py). With
--full-forwards the suffix
path is refused, so evaluate runs its fallback (four full forwards per batch, as before the shared
prefix) in the same process, for a before/after.

The limit, measured in the same run on the same held-out windows (tokenised here, checked equal to
evaluate's), batch size, dtype and device, on one model loaded once (loading not timed), with bare
HF forwards only: t_trunc, one pass of `activations.hooks.capture_activations` at the SAE's hook
(the real forward abandoned once the hook fires), and t_full, one bare `model(input_ids).logits`
pass with no hooks; each the median of 2 passes over all the windows before evaluate and 2 after
it (alternated). The work evaluation cannot avoid is one prefix and four suffixes per window, so
limit time = t_trunc + 4 (t_full - t_trunc); the old limit (t_trunc + 4 t_full, one capture and four
full forwards) is printed beside it. Tokens/s on both sides count windows x context. Prints one line.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import numpy as np
import torch

import saeworks.eval.evaluate as evaluate_module
from saeworks.activations.hooks import capture_activations
from saeworks.activations.model import load_model, load_tokenizer
from saeworks.activations.suffix import SuffixError
from saeworks.activations.text import iter_windows
from saeworks.eval.evaluate import EvalReport, SAEMetadata, evaluate, evaluation_device
from saeworks.run_config import RunConfig
from saeworks.sae.configio import load_config

PASSES = 2
"""Passes of each bare forward over all the windows before evaluate, and again after it."""
TIMED = ("load_sae", "load_tokenizer", "iter_windows", "load_model", "capture_activations",
         "_downstream", "suffix_logits", "suffix_head_input", "_logits")
"""eval.evaluate's names wrapped with timers: setup, pass 1's forwards, pass 2 and its forwards."""


@contextmanager
def timed_evaluate(seconds: dict[str, float], captured: dict[str, Any]) -> Iterator[None]:
    """Wrap evaluate's loaders and forwards with timers; keep the windows it tokenised."""
    originals = {name: getattr(evaluate_module, name) for name in TIMED}

    def timer(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            if name == "iter_windows":  # a lazy generator: tokenising happens as it is consumed
                result = captured["windows"] = list(result)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            return result

        return wrapped

    for name, fn in originals.items():
        setattr(evaluate_module, name, timer(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(evaluate_module, name, fn)


def held_out_windows(sae_dir: str, cfg: RunConfig) -> torch.Tensor:
    """[windows, context] ids of the held-out windows evaluate will cut (checked against its own)."""
    meta = SAEMetadata.read(sae_dir)
    context = meta.context_size or cfg.data.context_size
    data = replace(cfg.data, context_size=context, exclude_first_positions=meta.first_kept,
                   prepend_bos=cfg.data.prepend_bos if meta.prepend_bos is None else meta.prepend_bos)
    windows = iter_windows(load_tokenizer(cfg.model), data, cfg.evaluate.held_out_tokens // context,
                           held_out=True)
    return torch.from_numpy(np.stack(list(windows))).long()


@contextmanager
def full_forwards() -> Iterator[None]:
    """evaluate refused the suffix path: it falls back to four full forwards per batch."""
    original = evaluate_module.suffix_logits

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise SuffixError("--full-forwards")

    evaluate_module.suffix_logits = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        evaluate_module.suffix_logits = original


def run_evaluate(sae_dir: str, cfg: RunConfig, windows: torch.Tensor,
                 full: bool = False) -> tuple[EvalReport, dict[str, float]]:
    """evaluate's report and its time split (seconds)."""
    seconds = dict.fromkeys(TIMED, 0.0)
    captured: dict[str, Any] = {}
    with timed_evaluate(seconds, captured), full_forwards() if full else nullcontext():
        report = evaluate(sae_dir, cfg.evaluate, model=cfg.model, data=cfg.data)
    if not torch.equal(torch.from_numpy(np.stack(captured["windows"])).long(), windows):
        raise SystemExit("evaluate cut other held-out windows than this benchmark: update "
                         "held_out_windows() to match eval/evaluate.py")
    total, pass2 = report.info["seconds"], seconds["_downstream"]
    windows_s = seconds["load_tokenizer"] + seconds["iter_windows"]
    setup = seconds["load_sae"] + windows_s + seconds["load_model"]
    return report, {"total": total, "setup": setup, "sae": seconds["load_sae"], "windows": windows_s,
                    "model": seconds["load_model"], "pass1": total - setup - pass2,
                    "pass1_forwards": seconds["capture_activations"], "pass2": pass2,
                    "pass2_forwards": seconds["suffix_logits"] + seconds["suffix_head_input"]
                    + seconds["_logits"]}


@torch.no_grad()
def bare_forwards(model: Any, batches: list[torch.Tensor], hook: str) -> tuple[list[float], list[float]]:
    """Seconds of PASSES capture passes to `hook` and PASSES full no-hook logits passes over all
    `batches`, alternated."""
    trunc, full = [], []
    for _ in range(PASSES):
        start = time.perf_counter()
        for ids in batches:
            capture_activations(model, ids, [hook])
        trunc.append(time.perf_counter() - start)
        start = time.perf_counter()
        for ids in batches:
            model(input_ids=ids, use_cache=False).logits  # noqa: B018 (the work being timed)
        full.append(time.perf_counter() - start)
    return trunc, full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae", required=True, help="SAE directory")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=1, help="evaluate runs, each between limit passes")
    parser.add_argument("--full-forwards", action="store_true",
                        help="evaluate with four full forwards per batch (the path before the shared prefix)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides, e.g. evaluate.held_out_tokens=2048")
    args = parser.parse_args()
    cfg = load_config(RunConfig, args.config, args.overrides)
    hook = SAEMetadata.read(args.sae).hook
    windows = held_out_windows(args.sae, cfg)
    device = evaluation_device(cfg.evaluate.device)
    model = load_model(cfg.model, device)  # fresh; loading not timed
    batches = [batch.to(device) for batch in windows.split(cfg.evaluate.batch_size)]
    splits, trunc, full, report = [], [], [], None
    for _ in range(args.repeats):  # the limit before and after each evaluate: the machine is noisy
        before = bare_forwards(model, batches, hook)
        report, split = run_evaluate(args.sae, cfg, windows, args.full_forwards)
        splits.append(split)
        for passes in (before, bare_forwards(model, batches, hook)):
            trunc += passes[0]
            full += passes[1]
    assert report is not None
    split = {key: statistics.median(s[key] for s in splits) for key in splits[0]}
    t_trunc, t_full = statistics.median(trunc), statistics.median(full)
    t_suffix = t_full - t_trunc
    limit_time, old_limit_time = t_trunc + 4 * t_suffix, t_trunc + 4 * t_full
    n_windows, context = windows.shape
    tokens = n_windows * context
    rate, limit = tokens / split["total"], tokens / limit_time
    info, metrics = report.info, report.metrics
    print(f"evaluation{' (--full-forwards)' if args.full_forwards else ''}: {rate:,.0f} tok/s "
          f"({info['sae_name']} at {hook}, {cfg.model.dtype}, "
          f"{info['device']}, {n_windows} windows x {context} = {tokens:,} tokens, batch "
          f"{cfg.evaluate.batch_size}; {info['n_tokens']:,} scored rows, {info['n_predictions']:,} "
          f"predictions) in {split['total']:.1f} s = setup {split['setup']:.1f} s (SAE {split['sae']:.1f}, "
          f"tokenizer+windows {split['windows']:.1f}, model {split['model']:.1f}) + pass 1 "
          f"{split['pass1']:.1f} s (forwards {split['pass1_forwards']:.1f}, SAE+metrics "
          f"{split['pass1'] - split['pass1_forwards']:.1f}) + pass 2 {split['pass2']:.1f} s (forwards "
          f"{split['pass2_forwards']:.1f}, CE/KL scoring {split['pass2'] - split['pass2_forwards']:.1f}) | "
          f"limit {limit:,.0f} tok/s (t_trunc {t_trunc:.2f} s + 4 x t_suffix {t_suffix:.2f} s = "
          f"{limit_time:.1f} s; t_full {t_full:.2f} s) | ratio {rate / limit:.3f} end to end, "
          f"{limit_time / (split['pass1'] + split['pass2']):.3f} of the two passes; forwards alone: "
          f"{limit_time / (split['pass1_forwards'] + split['pass2_forwards']):.2f} | old limit (capture + "
          f"4 full) {tokens / old_limit_time:,.0f} tok/s, ratio {old_limit_time / split['total']:.3f} | fvu "
          f"{metrics['fvu']:.4f}, ce_recovered {metrics['ce_recovered']:.4f}, kl {metrics['kl']:.4f} "
          f"(repeats {args.repeats}, limit passes {len(full)})", flush=True)


if __name__ == "__main__":
    main()
