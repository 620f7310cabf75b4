"""Everything a training run derives from its config, the data's width and the world size, once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from saeworks.sae.config import SAEConfig
from saeworks.sae.configio import ConfigError, require
from saeworks.sae.registry import UnknownArchitectureError, architecture_class
from saeworks.train.config import TrainConfig
from saeworks.train.schedule import Schedule, default_lr


@dataclass(frozen=True)
class TrainPlan:
    """Derived values of one run (the config itself is never mutated)."""

    saes: list[SAEConfig]
    """Resolved SAE configs (d_in, d_sae set), in config order."""
    names: list[str]
    """Each SAE's directory name under `<run_dir>/saes/` (distinct)."""
    lrs: list[float]
    """Peak learning rate of each SAE."""
    world_size: int
    local_batch: int
    """Rows each process reads per step."""
    batch_size: int
    """Rows per step over all processes."""
    total_steps: int
    stop_step: int
    """Step after which this invocation ends: total_steps, or earlier with stop_after_tokens."""
    checkpoint_every_steps: int | None
    sample_batches: int
    """Global batches read at the start for the input scale and b_dec (then the stream rewinds)."""
    dead_after_tokens: int
    schedule: Schedule

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.batch_size


def make_plan(cfg: TrainConfig, d_in: int, source_name: str, world_size: int) -> TrainPlan:
    """Resolve and check the SAEs against the data width `d_in` of `source_name`; derive the rest."""
    require(cfg.batch_size % world_size == 0, "train.batch_size",
            f"{cfg.batch_size} rows cannot be split evenly over {world_size} processes")
    saes = [_resolved(sae, i, d_in, source_name) for i, sae in enumerate(cfg.saes)]
    names = [sae.display_name for sae in saes]
    twice = sorted({name for name in names if names.count(name) > 1})
    require(not twice, "train.saes", f"several SAEs would be saved as {', '.join(twice)}; give "
            "them distinct `name`s")
    steps = cfg.total_tokens // cfg.batch_size
    stop = steps if cfg.stop_after_tokens is None else min(steps, cfg.stop_after_tokens // cfg.batch_size)
    require(stop > 0, "train.stop_after_tokens", f"{cfg.stop_after_tokens} is less than one batch")
    every = cfg.checkpoint_every_tokens
    schedule = Schedule(steps, cfg.lr_warmup_tokens // cfg.batch_size, cfg.lr_decay,
                        cfg.lr_final_fraction, cfg.sparsity_warmup_tokens // cfg.batch_size)
    return TrainPlan(
        saes=saes, names=names,
        lrs=[cfg.lr if cfg.lr is not None else default_lr(int(sae.d_sae or 0)) for sae in saes],
        world_size=world_size, local_batch=cfg.batch_size // world_size, batch_size=cfg.batch_size,
        total_steps=steps, stop_step=stop,
        checkpoint_every_steps=None if every is None else max(1, every // cfg.batch_size),
        sample_batches=math.ceil(cfg.init_sample_rows / cfg.batch_size),
        dead_after_tokens=cfg.dead_after_tokens, schedule=schedule,
    )


def _resolved(sae: SAEConfig, index: int, d_in: int, source_name: str) -> SAEConfig:
    field = f"train.saes[{index}]"
    try:
        architecture_class(sae.architecture)
    except UnknownArchitectureError as err:  # it lists the registry
        raise UnknownArchitectureError(f"{field}.architecture: {err}") from None
    require(sae.d_in is None or sae.d_in == d_in, f"{field}.d_in",
            f"{sae.d_in} does not match the width d={d_in} of {source_name}; leave it unset")
    try:
        return sae.resolved(d_in)
    except ConfigError as err:
        raise ConfigError(f"{field}.{err}") from None
