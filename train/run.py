"""`train(job)`: build the collaborators of a training run, run the loop, save the SAEs.

    data (store reader or on-the-fly model) -> plan -> SAEs (fresh, or from a checkpoint)
        -> Trainer.fit(source, metrics log, checkpoint writer, SIGTERM flag) -> save_sae

Distributed: every process runs this function; `sae.distributed` says which rank it is. Each
rank reads its own partition; the trainer averages gradients; rank 0 alone writes checkpoints,
metrics, wandb and SAEs.

Stopping: SIGTERM (SLURM's warning before a time limit, torchrun forwarding its own) sets a flag
that is averaged with the gradients, so every rank stops after the same step; a checkpoint is
written there and `TrainingInterrupted` is raised (`saeworks train` exits with status 143).
`train.resume=true` continues from it with weights identical to an uninterrupted run. A kill -9
loses at most the steps since the last checkpoint (`train.checkpoint_every_tokens`).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import torch

from saeworks.sae.atomic import clean_directory
from saeworks.sae.distributed import RankInfo, all_gather_objects, barrier, rank_info
from saeworks.sae.io import save_sae
from saeworks.sae.locks import exclusive_writer
from saeworks.sae.precision import AutocastName, autocast_dtype
from saeworks.sae.registry import create_sae
from saeworks.sae.version import package_version
from saeworks.train.checkpoint import (
    Checkpoint,
    check_fingerprint,
    fingerprint,
    latest_checkpoint,
    read_checkpoint,
    restore_rng,
    rng_state,
    write_checkpoint,
)
from saeworks.train.config import TrainJob
from saeworks.train.data import (
    BatchSource,
    SourceInfo,
    initial_b_dec,
    initial_sample,
    input_scale,
    open_store,
    store_reader,
)
from saeworks.train.errors import CheckpointError
from saeworks.train.metrics import MetricsLog
from saeworks.train.plan import TrainPlan, make_plan
from saeworks.train.trainer import StopFlag, Trainer

log = logging.getLogger(__name__)


class SAEResult(NamedTuple):
    """One trained SAE."""

    name: str
    path: Path | None
    """Its directory under `<run_dir>/saes/` (None when this invocation stopped early)."""
    fvu: float
    """Fraction of variance unexplained on the last logged batch."""
    l0: float
    """Mean active latents per token on the last logged batch."""


class TrainResult(NamedTuple):
    """What a call to `train` did (the same on every rank)."""

    saes: list[SAEResult]
    steps: int
    tokens: int
    finished: bool
    """False when stop_after_tokens ended this invocation before total_tokens."""
    checkpoint: Path
    """The last checkpoint written."""
    rank: int
    world_size: int


def train(cfg: TrainJob, source: BatchSource | None = None) -> TrainResult:
    """Train the SAEs of `cfg.train`; `source` replaces this rank's store reader (tests).

    The run holds the writer lock of its checkpoint directory throughout (sae/locks.py): a second
    `train` into the same run_dir is refused, naming this one."""
    rank = rank_info(cfg.train.device)
    with exclusive_writer(cfg.layout.checkpoints, "train", rank.is_main, collective=True):
        if rank.is_main:
            _clean_leftovers(cfg)
        return _train(cfg, source, rank)


def _clean_leftovers(cfg: TrainJob) -> None:
    """Scratch that killed runs left in the checkpoint and SAE directories (the lock is held, so
    none of it is being written), including scratch named before it carried its writer's PID."""
    clean_directory(cfg.layout.checkpoints, any_owner=True, legacy=(".tmp-*",))
    clean_directory(cfg.layout.sae("x").parent, any_owner=True, legacy=(".*-*",))


def _train(cfg: TrainJob, source: BatchSource | None, rank: RankInfo) -> TrainResult:
    cfg = _with_resolved_autocast(cfg, rank)
    data, info = _open_data(cfg, rank)
    plan = make_plan(cfg.train, info.d_in, info.name, rank.world_size)
    resume_from = _resume_point(cfg, plan, info)
    if source is None:
        source = _make_source(cfg, data, info, plan, rank)
    _seed_everything(cfg.train.seed)
    saes = [create_sae(sae_cfg).to(rank.device) for sae_cfg in plan.saes]
    if resume_from is None:
        trainer = _fresh_trainer(cfg, plan, saes, source, rank)
    else:
        trainer = _resumed_trainer(cfg, plan, saes, source, rank, resume_from)
    metrics = MetricsLog(cfg, cfg.layout, plan.stop_step * plan.batch_size, trainer.tokens, rank.is_main)
    checkpoints: list[Path] = [resume_from.path] if resume_from else []

    def checkpoint(trainer: Trainer, source: BatchSource) -> Path:
        checkpoints.append(_write_checkpoint(cfg, plan, info, trainer, source, rank))
        return checkpoints[-1]

    with _sigterm_stops() as stop:
        try:
            trainer.fit(source, metrics, checkpoint, stop)
        finally:
            metrics.close()
    finished = trainer.step >= plan.total_steps
    results = _save_saes(cfg, plan, info, trainer, rank, finished)
    return TrainResult(results, trainer.step, trainer.tokens, finished, checkpoints[-1], rank.rank,
                       rank.world_size)


def _with_resolved_autocast(cfg: TrainJob, rank: RankInfo) -> TrainJob:
    """`train.autocast=auto` decided once (rank 0 probes, every rank takes its answer), so the
    trainer, the checkpoint fingerprint and the saved SAE all see the concrete value."""
    if cfg.train.autocast != "auto":
        return cfg
    mine = autocast_dtype("auto", rank.device) if rank.is_main else None
    resolved = cast(AutocastName, all_gather_objects(mine)[0])
    return replace(cfg, train=replace(cfg.train, autocast=resolved))


def _open_data(cfg: TrainJob, rank: RankInfo) -> tuple[Any, SourceInfo]:
    if cfg.train.source == "model":
        from saeworks.train.model_source import open_model

        return open_model(cfg, rank)
    return open_store(cfg)


def _make_source(cfg: TrainJob, data: Any, info: SourceInfo, plan: TrainPlan, rank: RankInfo
                 ) -> BatchSource:
    if cfg.train.source == "model":
        from saeworks.train.model_source import ModelSource

        return ModelSource(data, info, cfg, plan.local_batch, rank)
    return store_reader(data, info, cfg, plan.local_batch, rank)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _resume_point(cfg: TrainJob, plan: TrainPlan, info: SourceInfo) -> Checkpoint | None:
    """The checkpoint to continue from, or None; refuses one from another config."""
    root = cfg.layout.checkpoints
    found = latest_checkpoint(root)
    if found is None:
        if cfg.train.resume:
            log.info("train.resume: no checkpoint under %s yet, starting from scratch", root)
        return None
    if not cfg.train.resume:
        raise CheckpointError(f"{found} exists: set train.resume=true to continue that run, or use "
                              "another run_dir (or delete the checkpoints) to start over")
    loaded = read_checkpoint(found)
    check_fingerprint(found, loaded.state["fingerprint"], fingerprint(cfg.train, plan, info))
    return loaded


def _fresh_trainer(cfg: TrainJob, plan: TrainPlan, saes: list[Any], source: BatchSource,
                   rank: RankInfo) -> Trainer:
    """Input scale and b_dec from the first global batches (the same rows on every rank)."""
    needs_sample = cfg.train.normalize_inputs or cfg.train.b_dec_init != "zeros"
    sample = initial_sample(source, plan.sample_batches, rank.device) if needs_sample else None
    scale = input_scale(sample) if sample is not None and cfg.train.normalize_inputs else 1.0
    if sample is not None and cfg.train.b_dec_init != "zeros":
        b_dec = initial_b_dec(sample * scale, cfg.train.b_dec_init)
        with torch.no_grad():
            for sae in saes:
                sae.b_dec.copy_(b_dec)
    return Trainer(saes, plan, cfg.train, scale, rank.device)


def _resumed_trainer(cfg: TrainJob, plan: TrainPlan, saes: list[Any], source: BatchSource,
                     rank: RankInfo, checkpoint: Checkpoint) -> Trainer:
    state = checkpoint.state
    trainer = Trainer(saes, plan, cfg.train, float(state["input_scale"]), rank.device)
    trainer.load_state_tensors(checkpoint.tensors, int(state["step"]))
    mine = state["ranks"][rank.rank]
    source.load_state_dict(mine["source"])
    restore_rng(mine["rng"], rank.device)
    log.info("resuming from %s at step %d (%d tokens)", checkpoint.path, trainer.step, trainer.tokens)
    return trainer


def _write_checkpoint(cfg: TrainJob, plan: TrainPlan, info: SourceInfo, trainer: Trainer,
                      source: BatchSource, rank: RankInfo) -> Path:
    """Gather every rank's source position and RNG state; rank 0 writes; all wait for it."""
    trainer.check_weights()
    ranks = all_gather_objects({"source": source.state_dict(), "rng": rng_state(rank.device)})
    root = cfg.layout.checkpoints
    path = root / f"tokens-{trainer.tokens:012d}"
    if rank.is_main:
        state = {"step": trainer.step, "tokens": trainer.tokens, "input_scale": trainer.input_scale,
                 "fingerprint": fingerprint(cfg.train, plan, info), "ranks": ranks,
                 "saeworks_version": package_version()}
        path = write_checkpoint(root, trainer.tokens, trainer.state_tensors(), state)
    barrier()
    return path


def _save_saes(cfg: TrainJob, plan: TrainPlan, info: SourceInfo, trainer: Trainer, rank: RankInfo,
               finished: bool) -> list[SAEResult]:
    """Rank 0 saves each SAE (input scale folded in) with SAELens metadata, once training is done."""
    results = []
    for i, (name, sae) in enumerate(zip(plan.names, trainer.saes, strict=True)):
        last = trainer.last_metrics[i] if trainer.last_metrics else {}
        path = cfg.layout.sae(name) if finished else None
        if path is not None and rank.is_main:
            training = {"tokens": trainer.tokens, "steps": trainer.step, "batch_size": plan.batch_size,
                        "lr": plan.lrs[i], "world_size": plan.world_size, "input_scale": trainer.input_scale,
                        "autocast": trainer.autocast_name,  # `auto` as resolved on this machine
                        "final_metrics": last, "saeworks_version": package_version()}
            save_sae(sae, path, trainer.input_scale, {**info.metadata, "saeworks_training": training})
        results.append(SAEResult(name, path, float(last.get("fvu", float("nan"))),
                                 float(last.get("l0", float("nan")))))
    barrier()
    return results


@contextmanager
def _sigterm_stops() -> Iterator[StopFlag]:
    """While training, SIGTERM only sets a flag: the loop checkpoints at the next step boundary."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def request(signum: int, frame: Any) -> None:
        flag.requested = True

    previous = signal.signal(signal.SIGTERM, request)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
