"""Every path the project writes, built in this one place: the run layout and the cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

ACTIVATIONS_DIR = "activations.zarr"
SAES_DIR = "saes"
DICTIONARIES_DIR = "dictionaries"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
METRICS_FILE = "metrics.jsonl"


def cache_root() -> Path:
    """saeworks' cache (converted models, prepared corpora): $SAEWORKS_CACHE or the user cache dir."""
    override = os.environ.get("SAEWORKS_CACHE")
    return Path(override) if override else Path(platformdirs.user_cache_dir("saeworks"))


@dataclass(frozen=True)
class RunLayout:
    """The fixed layout under a run's `run_dir`."""

    root: Path

    @property
    def activations(self) -> Path:
        return self.root / ACTIVATIONS_DIR

    def sae(self, name: str) -> Path:
        return self.root / SAES_DIR / name

    def dictionary(self, name: str) -> Path:
        return self.root / DICTIONARIES_DIR / name

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def metrics(self) -> Path:
        return self.logs / METRICS_FILE
