"""Training progress on rank 0: a progress bar, `<run_dir>/logs/metrics.jsonl`, and wandb.

Every rank builds a `MetricsLog`; on ranks other than 0 it does nothing, so the loop never asks
which rank it is on.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from saeworks.sae.configio import to_dict
from saeworks.sae.paths import RunLayout
from saeworks.train.config import TrainJob

log = logging.getLogger(__name__)


class MetricsLog:
    """One JSON object per SAE per logged step; bar postfix with loss, L0 and FVU of each SAE."""

    def __init__(self, cfg: TrainJob, layout: RunLayout, total_tokens: int, done_tokens: int,
                 is_main: bool) -> None:
        self.every = cfg.train.log_every_steps
        self.is_main = is_main
        self.bar = tqdm(total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True,
                        desc="train", disable=not is_main, smoothing=0.1)
        self.path: Path = layout.metrics
        self.wandb: Any = None
        self._last = (time.perf_counter(), done_tokens)
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if cfg.train.wandb and cfg.train.wandb_mode != "disabled":
                self.wandb = _start_wandb(cfg, layout)

    def advance(self, tokens: int) -> None:
        self.bar.update(tokens)

    def write(self, step: int, tokens: int, rows: list[dict[str, Any]]) -> None:
        if not self.is_main:
            return
        now = time.perf_counter()
        rate = (tokens - self._last[1]) / max(now - self._last[0], 1e-9)
        self._last = (now, tokens)
        with self.path.open("a") as out:
            for row in rows:
                out.write(json.dumps({**row, "tokens_per_s": rate}) + "\n")
        self.bar.set_postfix_str(" | ".join(
            f"{r['sae']}: loss {r['loss']:.4g} L0 {r['l0']:.1f} FVU {r['fvu']:.3f}" for r in rows))
        if self.wandb is not None:
            self.wandb.log({f"{r['sae']}/{key}": value for r in rows for key, value in r.items()
                            if key not in ("sae", "hook", "step", "tokens")}
                           | {"tokens": tokens, "tokens_per_s": rate}, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(cfg: TrainJob, layout: RunLayout) -> Any:
    import wandb

    directory = layout.logs
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=cfg.train.wandb_project, dir=str(directory), mode=cfg.train.wandb_mode,
                     name=cfg.layout.root.resolve().name, config=_logged_config(cfg))
    log.info("wandb (%s) logs under %s", cfg.train.wandb_mode, directory / "wandb")
    return run


def _logged_config(cfg: TrainJob) -> dict[str, Any]:
    """The sections that decide a training run, as wandb's run config."""
    return {"run_dir": str(cfg.layout.root), "store": cfg.train.store or cfg.store_url,
            **{name: to_dict(getattr(cfg, name)) for name in ("train", "model", "data", "harvest")}}
