"""The Python API for notebooks and scripts: every stage without writing a YAML file.

    import saeworks
    cfg = saeworks.load_config("configs/demo.yaml", "harvest.max_tokens=20000", run_dir="/tmp/try")
    saeworks.harvest(cfg)                       # or saeworks.harvest("configs/demo.yaml", "k=v", ...)
    trained = saeworks.train_saes(cfg)          # `saeworks.train` is the training package itself
    report = saeworks.evaluate(trained.saes[0].path, model="embedded", text=["Some text.", ...])
    built = saeworks.analyze(trained.saes[0].path, cfg)
    with saeworks.open_dictionary(built.directory) as features:
        features.feature(0)

Each stage takes a `RunConfig`, a YAML path or None (the embedded demo's defaults), then
`key=value` overrides exactly as on the command line, and keyword overrides of top-level or dotted
fields (`run_dir="/tmp/x"`, `**{"harvest.max_tokens": 20000}`). Errors are `SaeworksError`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saeworks.activations.config import DataConfig, ModelConfig
from saeworks.activations.harvest import HarvestResult
from saeworks.eval.config import EvaluateConfig
from saeworks.eval.dictionary import FeatureDictionary
from saeworks.eval.evaluate import EvalReport
from saeworks.pipeline import DictionaryBuild, RunSummary, build_dictionary, run_pipeline
from saeworks.run_config import RunConfig
from saeworks.sae.configio import ConfigError, apply_override, from_dict, to_dict
from saeworks.sae.configio import load_config as _load_yaml
from saeworks.train.run import BatchSource, TrainResult

ConfigLike = RunConfig | str | Path | None
"""A run config: the object, a YAML file, or None for the defaults (the embedded demo)."""


def load_config(config: ConfigLike = None, *overrides: str, **fields: Any) -> RunConfig:
    """A `RunConfig` from an object, a YAML path or the defaults, with `key=value` overrides and
    keyword overrides applied in that order (`run_dir="x"`, `**{"train.total_tokens": 10_000}`)."""
    pairs = [*overrides, *(f"{key}={_yaml_scalar(value)}" for key, value in fields.items())]
    if isinstance(config, RunConfig):
        data = to_dict(config)
        for item in pairs:
            apply_override(data, item)
        return from_dict(RunConfig, data)
    if config is not None and not isinstance(config, str | Path):
        raise ConfigError(f"config: expected a RunConfig, a YAML path or None, got {type(config).__name__}")
    return _load_yaml(RunConfig, config, pairs)


def harvest(config: ConfigLike = None, *overrides: str, repair: bool = False,
            **fields: Any) -> HarvestResult:
    """Run the model over the dataset and fill (or resume) the run's activation store;
    `repair=True` first recomputes the shards that `verify_store` finds damaged."""
    from saeworks.activations.harvest import harvest as run_harvest

    cfg = load_config(config, *overrides, **fields)
    return run_harvest(cfg.model, cfg.data, cfg.harvest, cfg.store_url, repair=repair)


def train_saes(config: ConfigLike = None, *overrides: str, source: BatchSource | None = None,
               **fields: Any) -> TrainResult:
    """Train the SAEs of the `train:` section (saved under `<run_dir>/saes/<name>`); `source`
    replaces the store reader with any iterator of batches."""
    from saeworks.train.run import train

    return train(load_config(config, *overrides, **fields).train_job(), source=source)


def evaluate(sae: str | Path, *, model: str | ModelConfig | None = None,
             text: str | Sequence[str] | None = None, dataset: str | DataConfig | None = None,
             store: str | None = None, sae_id: str | None = None, **settings: Any) -> EvalReport:
    """Measure an SAE on exactly one target: `text` (a string or a list of them) or the held-out
    documents of `dataset` (a path or hub name, or a DataConfig), both run through `model` (a hub
    id, a local path, "embedded", or a ModelConfig: the model the SAE was trained on); or the rows
    of the activation `store` (its own model). `settings` are `EvaluateConfig` fields
    (`downstream=False`, `batch_size=4`, `held_out_tokens=8192`). Nothing is written: call
    `report.write(path)` to keep it."""
    from saeworks.eval.evaluate import evaluate as run_evaluate

    if text is None and dataset is None and store is None:
        raise ConfigError("evaluate: give one target: text=..., dataset=... or store=...")
    sae_dir = resolve_sae_dir(sae, sae_id)
    eval_cfg = from_dict(EvaluateConfig, settings, "evaluate.")
    model_cfg = None if text is None and dataset is None else _model_config(model)
    texts = None if text is None else [text] if isinstance(text, str) else list(text)
    data = dataset if isinstance(dataset, DataConfig | None) else DataConfig(path=dataset)
    return run_evaluate(sae_dir, eval_cfg, model=model_cfg, data=data, texts=texts, store_url=store)


def analyze(sae: str | Path, config: ConfigLike = None, *overrides: str, store: str | None = None,
            out: str | Path | None = None, sae_id: str | None = None, **fields: Any) -> DictionaryBuild:
    """Analyse every feature of an SAE over a store (`store`, else the config's run store) and write
    its feature dictionary (`out`, else `<run_dir>/dictionaries/<name>`)."""
    cfg = load_config(config, *overrides, **fields)
    return build_dictionary(resolve_sae_dir(sae, sae_id), cfg, store, Path(out) if out else None)


def run(config: ConfigLike = None, *overrides: str, **fields: Any) -> RunSummary:
    """harvest → train → evaluate → analyze → report, as `saeworks run` does."""
    return run_pipeline(load_config(config, *overrides, **fields))


def open_dictionary(path: str | Path) -> FeatureDictionary:
    """Open a feature dictionary directory (use it as a context manager, or call `close()`)."""
    return FeatureDictionary.open(path)


def resolve_sae_dir(sae: str | Path, sae_id: str | None = None) -> Path:
    """A local SAE directory: `sae` (joined with `sae_id`) when it exists, else a hub repo id whose
    `sae_id` folder is fetched into the HF cache (saeworks.hub.sae_directory)."""
    from saeworks.hub import sae_directory

    return sae_directory(sae, sae_id)


def _model_config(model: str | ModelConfig | None) -> ModelConfig:
    if model is None:
        raise ConfigError("evaluate: text and dataset targets run a model: pass model=... (a hub id, a "
                          "local path, or \"embedded\"), the one the SAE was trained on")
    return model if isinstance(model, ModelConfig) else ModelConfig(name=model)


def _yaml_scalar(value: Any) -> str:
    """A keyword override's value as the YAML text `apply_override` reads back."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()
