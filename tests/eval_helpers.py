"""A tiny real run shared by the evaluation, analysis and dictionary tests.

The embedded model's early layer over a few windows of the embedded text, a small TopK SAE
trained on that store: real activations, real tokens, a real SAE, in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saeworks.eval.evaluate import EvalReport, evaluate
from saeworks.run_config import RunConfig
from saeworks.sae.configio import load_config

TINY_HOOK = "blocks.3.hook_resid_post"
TINY_CONTEXT = 32
TINY_WINDOWS = 96
TINY_SAE_NAME = "topk-k8-256"


def tiny_overrides(run_dir: Path, **extra: object) -> list[str]:
    """Config overrides of the tiny run: 96 windows of 32 tokens, layer 3, a 256-latent TopK."""
    settings: dict[str, object] = {
        "run_dir": run_dir,
        "model.device": "cpu",
        "data.context_size": TINY_CONTEXT,
        "harvest.hooks": f"[{TINY_HOOK}]",
        "harvest.max_tokens": TINY_WINDOWS * TINY_CONTEXT,
        "harvest.batch_size": 16,
        "harvest.chunk_tokens": 256,
        "harvest.chunks_per_shard": 4,
        "harvest.store_dtype": "float32",
        "train.saes": "[{k: 8, d_sae: 256}]",
        "train.total_tokens": 256 * 60,
        "train.batch_size": 256,
        "train.lr": 3e-3,
        "train.init_sample_rows": 512,
        "train.wandb": "false",
        "train.device": "cpu",
        "train.reader.buffer_chunks": 4,
        "train.dead_after_tokens": 4096,
        "evaluate.held_out_tokens": 8 * TINY_CONTEXT,
        "evaluate.batch_size": 4,
        "evaluate.device": "cpu",
        "analyze.batch_size": 512,
        "analyze.top_n": 5,
        "analyze.bands": 2,
        "analyze.samples_per_band": 2,
        "analyze.context_before": 6,
        "analyze.context_after": 2,
        "analyze.device": "cpu",
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


@dataclass(frozen=True)
class TinyRun:
    cfg: RunConfig
    store_url: str
    sae_dir: Path


def build_tiny_run(run_dir: Path) -> TinyRun:
    """Harvest and train the tiny run under `run_dir` (about 15 s on 2 cores)."""
    from saeworks.api import harvest, train_saes

    cfg = load_config(RunConfig, None, tiny_overrides(run_dir))
    harvest(cfg)
    train_saes(cfg)
    return TinyRun(cfg, cfg.store_url, cfg.layout.sae(TINY_SAE_NAME))


def evaluate_run(sae_dir: Path, cfg: RunConfig, store_url: str | None = None) -> EvalReport:
    """Evaluate as `saeworks evaluate SAE_DIR CONFIG|STORE` does: the config's held-out documents,
    or the store's rows, with the config's `evaluate:` settings."""
    if store_url is not None:
        return evaluate(sae_dir, cfg.evaluate, store_url=store_url)
    return evaluate(sae_dir, cfg.evaluate, model=cfg.model, data=cfg.data)


LATE_HOOK = "blocks.24.hook_resid_post"
"""Late enough that a feature's direct logit effect predicts what adding it does to the output."""


def build_late_dictionary(run_dir: Path, model: Any, tokenizer: Any) -> Path:
    """A tiny run at LATE_HOOK (48 windows, a 256-latent TopK) analysed into a feature dictionary,
    without an evaluation (about 20 s on 2 cores)."""
    from saeworks.activations.store import ActivationStore
    from saeworks.api import harvest, train_saes
    from saeworks.eval.analysis import analyze_features
    from saeworks.eval.dictionary_build import write_dictionary
    from saeworks.sae.io import load_sae

    cfg = load_config(RunConfig, None, tiny_overrides(run_dir, **{"harvest.hooks": f"[{LATE_HOOK}]",
                                                                "harvest.max_tokens": 48 * TINY_CONTEXT}))
    harvest(cfg)
    train_saes(cfg)
    sae_dir = cfg.layout.sae(TINY_SAE_NAME)
    store = ActivationStore.open(cfg.store_url)
    analysis = analyze_features(load_sae(sae_dir), store, LATE_HOOK, cfg.analyze, model, "cpu",
                                progress=False)
    return write_dictionary(run_dir / "dictionary", analysis, sae_dir, tokenizer, cfg.model, LATE_HOOK)
