"""The run config: one YAML file holds every stage's section, mapped onto these dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from saeworks.activations.config import DataConfig, HarvestConfig, ModelConfig
from saeworks.eval.config import AnalyzeConfig, EvaluateConfig
from saeworks.sae.configio import require
from saeworks.sae.paths import RunLayout
from saeworks.train.config import TrainConfig, TrainJob


@dataclass
class RunConfig:
    """A whole run: where it writes, the model, the text, and each stage's settings."""

    run_dir: str = "runs/demo"
    """Directory every artifact of the run is written under (layout in sae/paths.py)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The language model whose activations are read (every stage that runs it)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The text that is tokenised and packed into windows, and its held-out split."""
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    """What `saeworks harvest` records from the model, how much, and how it is stored."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The SAEs `saeworks train` trains side by side, on which activations, with which recipe."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """How `saeworks evaluate` measures a trained SAE."""
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    """The feature-analysis pass of `saeworks analyze` that builds a feature dictionary."""

    def __post_init__(self) -> None:
        require(bool(self.run_dir), "run_dir", "must be a directory path")

    @property
    def layout(self) -> RunLayout:
        return RunLayout(Path(self.run_dir))

    @property
    def store_url(self) -> str:
        """The activation store: `harvest.store` if given, else `<run_dir>/activations.zarr`."""
        return self.harvest.store or str(self.layout.activations)

    def train_job(self) -> TrainJob:
        """The sections training reads (the trainer never sees the whole run config)."""
        return TrainJob(self.train, self.layout, self.store_url, self.model, self.data, self.harvest)
