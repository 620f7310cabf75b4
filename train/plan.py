"""Everything a training run derives from its config, the data's width and the world size, once."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from saeworks.sae.config import SAEConfig
from saeworks.sae.configio import ConfigError, require
from saeworks.sae.registry import UnknownArchitectureError, architecture_class
from saeworks.sae.sharded import sharding_problem
from saeworks.train.config import TrainConfig
from saeworks.train.data import SourceInfo
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
    latent_shards: int
    """Processes that split each SAE's latents (1: every process holds whole SAEs)."""
    local_batch: int
    """Rows each process reads per step (the shards of one replica read the same rows)."""
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
    hooks: list[str] = field(default_factory=list)
    """Every hook point the run trains, in order (the same on every rank)."""
    sae_hooks: list[str] = field(default_factory=list)
    """The hook each SAE of `saes` reads."""
    sae_ids: list[int] = field(default_factory=list)
    """Each SAE's index among all SAEs of the run (checkpoint keys, metrics order): 0, 1, ... unless
    `for_rank` kept only some."""
    hook_owners: list[int] | None = None
    """train.distribute_hooks: the rank that trains each hook's SAEs (hook i on rank i mod W);
    None: every rank trains every SAE."""
    sweep_size: int = 1
    """SAEs per hook (len(train.saes)): SAE j of the run is sweep entry j % sweep_size of hook
    j // sweep_size."""

    def for_rank(self, rank: int) -> TrainPlan:
        """The plan of what `rank` trains: under distribute_hooks only the SAEs of its hooks
        (possibly none), else all of them."""
        if self.hook_owners is None:
            return self
        owned = [i for i, hook in enumerate(self.sae_hooks)
                 if self.hook_owners[self.hooks.index(hook)] == rank]
        return replace(self, saes=[self.saes[i] for i in owned], names=[self.names[i] for i in owned],
                       lrs=[self.lrs[i] for i in owned], sae_hooks=[self.sae_hooks[i] for i in owned],
                       sae_ids=[self.sae_ids[i] for i in owned])

    def owner(self, hook: str) -> int | None:
        """The rank that trains `hook`'s SAEs under distribute_hooks (None: every rank)."""
        return None if self.hook_owners is None else self.hook_owners[self.hooks.index(hook)]

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.batch_size

    @property
    def replicas(self) -> int:
        """Data-parallel groups: processes that read different rows."""
        return self.world_size // self.latent_shards


def _make_plan(cfg: TrainConfig, d_in: int, source_name: str, world_size: int) -> TrainPlan:
    """Resolve and check the SAEs against the data width `d_in` of `source_name`; derive the rest
    (one hook's plan: `make_hooks_plan` fills in the hooks, and is what callers use)."""
    shards = cfg.latent_shards
    require(world_size % shards == 0, "train.latent_shards",
            f"{shards} does not divide the {world_size} processes; launch a multiple of it")
    replicas = world_size // shards
    require(cfg.batch_size % replicas == 0, "train.batch_size",
            f"{cfg.batch_size} rows cannot be split evenly over {replicas} data-parallel "
            f"{'processes' if shards == 1 else 'replicas'}")
    saes = [_resolved(sae, i, d_in, source_name) for i, sae in enumerate(cfg.saes)]
    if shards > 1:
        for i, sae in enumerate(saes):
            problem = sharding_problem(sae.architecture, int(sae.d_sae or 0), sae.k, shards)
            require(problem is None, f"train.saes[{i}]", f"{problem} (train.latent_shards)")
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
        world_size=world_size, latent_shards=shards, local_batch=cfg.batch_size // replicas,
        batch_size=cfg.batch_size,
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


HOOK_SEPARATOR = "--"
"""Between the hook and the SAE name in a multi-hook run's SAE names: `<hook>--<name>`."""


def make_hooks_plan(cfg: TrainConfig, infos: Sequence[SourceInfo], world_size: int) -> TrainPlan:
    """The plan of a run over the hooks of `infos`: every SAE of `train.saes` on each hook, hook by
    hook. With one hook the SAEs keep their names; with several, `<hook>--<name>`."""
    plans = [_make_plan(cfg, info.d_in, info.name, world_size) for info in infos]
    several = len(infos) > 1
    hooks = [info.hook for info in infos]
    return replace(
        plans[0],
        saes=[sae for plan in plans for sae in plan.saes],
        names=[f"{hook}{HOOK_SEPARATOR}{name}" if several else name
               for hook, plan in zip(hooks, plans, strict=True) for name in plan.names],
        lrs=[lr for plan in plans for lr in plan.lrs],
        hooks=hooks,
        sae_hooks=[hook for hook, plan in zip(hooks, plans, strict=True) for _ in plan.saes],
        sae_ids=list(range(sum(len(plan.saes) for plan in plans))),
        hook_owners=[i % world_size for i in range(len(hooks))] if cfg.distribute_hooks else None,
        sweep_size=len(cfg.saes),
    )
