"""The evaluate and analyze stages, and `run`: harvest → train → evaluate → analyze from one config.

A stage's input can be an artifact made elsewhere: `evaluate`/`analyze` take an SAE directory and
either a run config (held-out documents of its dataset, the run's store) or a store URL (its rows,
and the model it was harvested with).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from saeworks.activations.model import load_model, load_tokenizer, model_config_of_store
from saeworks.activations.store import ActivationStore
from saeworks.eval.evaluate import METRICS_FILE, EvalReport, SAEMetadata, check_same_model, evaluate
from saeworks.run_config import RunConfig
from saeworks.sae.atomic import clean_leftovers, glob_escape
from saeworks.sae.io import SAEFormatError, read_cfg
from saeworks.sae.locks import exclusive_writer
from saeworks.sae.oserrors import require_writable_dir

log = logging.getLogger(__name__)


def sae_name(sae_dir: Path) -> str:
    """The name an SAE's artifacts go under: its directory name."""
    return Path(sae_dir).resolve().name


def evaluate_sae(sae_dir: Path, cfg: RunConfig, store_url: str | None = None,
                 out: Path | None = None) -> tuple[EvalReport, Path]:
    """Evaluate one SAE and write its metrics.json (default: inside the SAE directory); the
    output's directory is checked writable before the evaluation starts."""
    path = Path(out or Path(sae_dir) / METRICS_FILE)
    if out is not None or path.parent.is_dir():  # a missing SAE directory: evaluate says so
        require_writable_dir(path.parent, "--out" if out else "the SAE directory")
    if store_url is not None:
        report = evaluate(sae_dir, cfg.evaluate, store_url=store_url)
    else:
        report = evaluate(sae_dir, cfg.evaluate, model=cfg.model, data=cfg.data)
    report.write(path)
    return report, path


def default_dictionary_dir(sae_dir: Path, cfg: RunConfig | None) -> Path:
    """`<run_dir>/dictionaries/<name>` of the config's run, or of the run the SAE sits in."""
    name = sae_name(sae_dir)
    if cfg is not None:
        return cfg.layout.dictionary(name)
    sae_dir = Path(sae_dir).resolve()
    if sae_dir.parent.name == "saes":
        return sae_dir.parent.parent / "dictionaries" / name
    return sae_dir.parent / f"{name}-dictionary"


@dataclass
class DictionaryBuild:
    """What `analyze` made."""

    directory: Path
    metrics: dict[str, Any]
    seconds: float
    """Seconds of the analysis pass (not the evaluation or the writing)."""
    tokens_per_s: float
    summary: list[str] = field(default_factory=list)


def build_dictionary(sae_dir: Path, cfg: RunConfig, store_url: str | None = None,
                     out: Path | None = None) -> DictionaryBuild:
    """Analyse every feature of an SAE over a store and write its feature dictionary.

    The store is `store_url`, else the config's run store; the model (for logit effects and for
    reading new text later) is the one that store was harvested with. Metrics come from the SAE's
    metrics.json when it exists, else an evaluation runs first on the same target.
    """
    from saeworks.eval.analysis import analyze_features
    from saeworks.eval.dictionary import dictionary_summary
    from saeworks.eval.dictionary_build import write_dictionary
    from saeworks.sae.distributed import rank_info
    from saeworks.sae.io import load_sae

    sae_dir = Path(sae_dir)
    hook = sae_hook(sae_dir)  # an SAE directory first: its error is the one a typo deserves
    url = store_url or cfg.store_url
    store = ActivationStore.open(url)
    check_same_model(sae_dir, SAEMetadata.read(sae_dir), store.attrs.get("model"), f"store {url!r}",
                     "analyze it over a store harvested from that model")
    model_cfg = model_config_of_store(store.attrs.get("identity", {}))
    directory = Path(out or default_dictionary_dir(sae_dir, cfg if store_url is None else None))
    with exclusive_writer(directory, "analyze", setting="the dictionary directory (--out)"):
        clean_leftovers(directory, any_owner=True, legacy=(f".{glob_escape(directory.name)}-building-*",
                                                            f".{glob_escape(directory.name)}-old-*"))
        metrics_path = sae_dir / METRICS_FILE
        if metrics_path.is_file():
            metrics: dict[str, Any] = json.loads(metrics_path.read_text())
        else:
            metrics = evaluate_sae(sae_dir, cfg, store_url)[0].to_json()
        device = rank_info(cfg.analyze.device).device
        sae = load_sae(sae_dir, device)
        model = load_model(replace(model_cfg, device=cfg.analyze.device), device)
        start = time.perf_counter()
        analysis = analyze_features(sae, store, hook, cfg.analyze, model, device)
        seconds = time.perf_counter() - start
        write_dictionary(directory, analysis, sae_dir, load_tokenizer(model_cfg), model_cfg, hook,
                         metrics, {"store": url})
    return DictionaryBuild(directory, metrics, seconds, analysis.n_tokens / max(seconds, 1e-9),
                           dictionary_summary(directory))


def sae_hook(sae_dir: Path) -> str:
    """The hook point an SAE reads (its SAELens metadata), or an SAEFormatError."""
    hook = read_cfg(sae_dir).get("metadata", {}).get("hook_name")
    if not hook:
        raise SAEFormatError(f"{sae_dir}/cfg.json names no metadata.hook_name: cannot tell which "
                             "hook point the SAE reads")
    return str(hook)


@dataclass
class StageTime:
    stage: str
    seconds: float


@dataclass
class RunSummary:
    """Everything `saeworks run` made, for printing."""

    store: str
    saes: list[Path]
    metrics: dict[str, dict[str, Any]]
    """Per SAE name: its metrics.json content."""
    dictionaries: list[Path]
    report: Path | None
    times: list[StageTime]
    is_main: bool


def run_pipeline(cfg: RunConfig) -> RunSummary:
    """harvest → train → evaluate (held-out documents) → analyze, then the run's report.

    Harvest and train use every process launched; evaluation and analysis run on rank 0 while
    the others finish. A complete store with the same identity is reused, not harvested again.
    """
    from saeworks.activations.harvest import harvest
    from saeworks.eval.report import run_report
    from saeworks.train.run import train

    times: list[StageTime] = []
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times.append(StageTime(stage, now - clock))
        clock = now

    harvested = harvest(cfg.model, cfg.data, cfg.harvest, cfg.store_url)
    lap("harvest")
    trained = train(cfg.train_job())
    lap("train")
    log.info("trained to %d tokens in %s", trained.tokens, trained.seconds.describe())
    saes = [result.path for result in trained.saes if result.path is not None]
    if trained.rank != 0:
        return RunSummary(harvested.store_url, saes, {}, [], None, times, is_main=False)
    metrics: dict[str, dict[str, Any]] = {}
    for path in saes:
        metrics[sae_name(path)] = evaluate_sae(path, cfg)[0].to_json()
    lap("evaluate")
    dictionaries = [build_dictionary(path, cfg).directory for path in saes]
    lap("analyze")
    report = run_report(Path(cfg.run_dir))
    lap("report")
    return RunSummary(harvested.store_url, saes, metrics, dictionaries, report, times, is_main=True)
