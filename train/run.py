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

import contextlib
import logging
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import torch

from saeworks.sae.atomic import clean_directory
from saeworks.sae.distributed import (
    LatentMesh,
    RankInfo,
    all_gather_objects,
    barrier,
    gather_objects,
    latent_mesh,
    rank_info,
)
from saeworks.sae.heap import return_free_heap
from saeworks.sae.io import save_sae
from saeworks.sae.locks import exclusive_writer
from saeworks.sae.precision import AutocastName, autocast_dtype
from saeworks.sae.registry import create_sae
from saeworks.sae.sharded import assemble, shard_of
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
    write_sharded_checkpoint,
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
from saeworks.train.plan import TrainPlan, make_hooks_plan
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


class TrainSeconds(NamedTuple):
    """Where a call to `train` spent its wall time on this rank: the parts sum to the whole."""

    setup: float = 0.0
    """Opening the data, making the SAEs, the initial sample (input scale, b_dec) or the resume."""
    steps: float = 0.0
    """The training steps, with their reads, metrics and logs; checkpoints not included."""
    checkpoints: float = 0.0
    """Writing checkpoints (rank 0) or waiting for them (other ranks), the last one included."""
    save: float = 0.0
    """Writing the trained SAEs."""

    @property
    def total(self) -> float:
        return self.setup + self.steps + self.checkpoints + self.save

    def describe(self) -> str:
        """One line for a log: the whole and its parts."""
        return (f"{self.total:.1f} s: setup {self.setup:.1f} s, steps {self.steps:.1f} s, "
                f"checkpoints {self.checkpoints:.1f} s, saving {self.save:.1f} s")


class TrainResult(NamedTuple):
    """What a call to `train` did (the same on every rank, but `rank`, `held` and `seconds`)."""

    saes: list[SAEResult]
    steps: int
    tokens: int
    finished: bool
    """False when stop_after_tokens ended this invocation before total_tokens."""
    checkpoint: Path
    """The last checkpoint written."""
    rank: int
    world_size: int
    held: tuple[str, ...] = ()
    """The SAEs this rank trained: all of them, except under train.distribute_hooks (its hooks')."""
    seconds: TrainSeconds = TrainSeconds()
    """This rank's wall time, by part (benchmarks/training.py prints them)."""


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
    started = time.perf_counter()
    dynamo = _import_dynamo_aside()
    cfg = _with_resolved_autocast(cfg, rank)
    data, info = _open_data(cfg, rank)  # one SourceInfo per hook
    plan = make_hooks_plan(cfg.train, info, rank.world_size)
    held = plan.for_rank(rank.rank)  # what this rank trains (all of it unless distribute_hooks)
    mesh = latent_mesh(plan.latent_shards) if plan.latent_shards > 1 else None
    resume_from = _resume_point(cfg, plan, info, mesh)
    if source is None:
        source = _make_source(cfg, data, info, plan, _data_rank(rank, mesh))
    _seed_everything(cfg.train.seed)
    if mesh is None:
        saes = _create_saes(held, cfg.train.seed, rank.device)
    else:  # every rank draws the whole SAE in host memory (one process's init), keeps its slice
        saes = [shard_of(create_sae(sae_cfg), mesh).to(rank.device) for sae_cfg in plan.saes]
    if resume_from is None:
        trainer, source = _fresh_trainer(cfg, held, saes, source, rank, mesh, dynamo)
    else:
        dynamo.join()
        trainer = _resumed_trainer(cfg, held, saes, source, rank, resume_from, mesh)
    metrics = MetricsLog(cfg, cfg.layout, plan.stop_step * plan.batch_size, trainer.tokens, rank.is_main)
    checkpoints: list[Path] = [resume_from.path] if resume_from else []
    checkpoint_seconds = 0.0

    def checkpoint(trainer: Trainer, source: BatchSource) -> Path:
        nonlocal checkpoint_seconds
        start = time.perf_counter()
        checkpoints.append(_write_checkpoint(cfg, plan, info, trainer, source, rank))
        checkpoint_seconds += time.perf_counter() - start
        return checkpoints[-1]

    fitting = time.perf_counter()
    with _sigterm_stops() as stop:
        try:
            trainer.fit(source, metrics, checkpoint, stop)
        finally:
            metrics.close()
    saving = time.perf_counter()
    finished = trainer.step >= plan.total_steps
    results = _save_saes(cfg, plan, info, trainer, rank, finished)
    seconds = TrainSeconds(setup=fitting - started, steps=saving - fitting - checkpoint_seconds,
                           checkpoints=checkpoint_seconds, save=time.perf_counter() - saving)
    return TrainResult(results, trainer.step, trainer.tokens, finished, checkpoints[-1], rank.rank,
                       rank.world_size, tuple(held.names), seconds)


def _with_resolved_autocast(cfg: TrainJob, rank: RankInfo) -> TrainJob:
    """`train.autocast=auto` decided once (rank 0 probes, every rank takes its answer), so the
    trainer, the checkpoint fingerprint and the saved SAE all see the concrete value."""
    if cfg.train.autocast != "auto":
        return cfg
    mine = autocast_dtype("auto", rank.device) if rank.is_main else None
    resolved = cast(AutocastName, all_gather_objects(mine)[0])
    return replace(cfg, train=replace(cfg.train, autocast=resolved))


def _open_data(cfg: TrainJob, rank: RankInfo) -> tuple[Any, list[SourceInfo]]:
    if cfg.train.source == "model":
        from saeworks.train.model_source import open_model

        return open_model(cfg, rank)
    return open_store(cfg)


def _make_source(cfg: TrainJob, data: Any, info: list[SourceInfo], plan: TrainPlan, rank: RankInfo
                 ) -> BatchSource:
    if cfg.train.source == "model":
        from saeworks.train.model_source import ModelSource

        return ModelSource(data, info[0], cfg, plan.local_batch, rank)
    return store_reader(data, info, cfg, plan.local_batch, rank)


def _data_rank(rank: RankInfo, mesh: LatentMesh | None) -> RankInfo:
    """The partition this rank reads: its replica's (the shards of a replica read the same rows)."""
    return rank if mesh is None else replace(rank, rank=mesh.replica, world_size=mesh.replicas)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _create_saes(plan: TrainPlan, seed: int, device: torch.device) -> list[Any]:
    """The SAEs of `plan`, hook by hook, each hook's drawn from `seed` afresh: an SAE starts from
    the weights a run over its hook alone would draw, whichever rank holds it."""
    saes = []
    for hook in plan.hooks:
        if hook in plan.sae_hooks:
            torch.manual_seed(seed)
            saes += [create_sae(sae_cfg).to(device)
                     for sae_cfg, sae_hook in zip(plan.saes, plan.sae_hooks, strict=True) if sae_hook == hook]
    return saes


def _resume_point(cfg: TrainJob, plan: TrainPlan, info: list[SourceInfo],
                  mesh: LatentMesh | None) -> Checkpoint | None:
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
    loaded = read_checkpoint(found, 0 if mesh is None else mesh.shard)
    check_fingerprint(found, loaded.state["fingerprint"], fingerprint(cfg.train, plan, info))
    return loaded


def _import_dynamo_aside() -> threading.Thread:
    """Import torch._dynamo on a side thread, started now. torch.optim builds its first optimizer
    through torch._disable_dynamo, which imports torch._dynamo there and then (1.3-2.0 s of Python
    on 2 cores) before the first step. Imported while this thread reads the first batches and
    sets b_dec (zarr, numpy and torch release the GIL, but not all of the time), the demo trainer's
    setup took 1.8-2.1 s instead of 2.2-2.5. Join before making the optimizer. An import that
    fails here fails again, with its traceback, where the optimizer imports it."""
    def run() -> None:
        with contextlib.suppress(Exception):
            import torch._dynamo  # noqa: F401

    thread = threading.Thread(target=run, name="saeworks-import-dynamo", daemon=True)
    thread.start()
    return thread


def _fresh_trainer(cfg: TrainJob, plan: TrainPlan, saes: list[Any], source: BatchSource,
                   rank: RankInfo, mesh: LatentMesh | None, dynamo: threading.Thread
                   ) -> tuple[Trainer, BatchSource]:
    """Input scale and b_dec from the first global batches (the same rows on every rank); and the
    source to train from (the same stream, its first batches not read twice: `ReplayedStart`)."""
    needs_sample = cfg.train.normalize_inputs or cfg.train.b_dec_init != "zeros"
    if not needs_sample:
        dynamo.join()
        return Trainer(saes, plan, cfg.train, {hook: 1.0 for hook in plan.hooks}, rank.device, mesh), source
    group = None if mesh is None else mesh.data_group  # one copy of each replica's rows
    samples, replayed = initial_sample(source, plan.sample_batches, rank.device, plan.hooks,
                                       group)  # per hook, every hook on every rank
    try:
        scales = {hook: input_scale(samples[hook]) if cfg.train.normalize_inputs else 1.0
                  for hook in plan.hooks}
        if cfg.train.b_dec_init != "zeros":
            for hook in dict.fromkeys(plan.sae_hooks):  # the hooks of the SAEs this rank holds
                b_dec = initial_b_dec(samples[hook] * scales[hook], cfg.train.b_dec_init)
                with torch.no_grad():
                    for sae, sae_hook in zip(saes, plan.sae_hooks, strict=True):
                        if sae_hook == hook:
                            sae.b_dec.copy_(b_dec)
        del samples
        return_free_heap()  # what glibc would keep of the sample (38 MB, demo)
        dynamo.join()
        return Trainer(saes, plan, cfg.train, scales, rank.device, mesh), replayed
    except BaseException:
        replayed.close()
        raise


def _resumed_trainer(cfg: TrainJob, plan: TrainPlan, saes: list[Any], source: BatchSource,
                     rank: RankInfo, checkpoint: Checkpoint, mesh: LatentMesh | None) -> Trainer:
    state = checkpoint.state
    scales = state.get("input_scales") or float(state["input_scale"])  # per hook; older: one
    trainer = Trainer(saes, plan, cfg.train, scales, rank.device, mesh)
    trainer.load_state_tensors(checkpoint.tensors, int(state["step"]))
    mine = state["ranks"][rank.rank]
    source.load_state_dict(mine["source"])
    restore_rng(mine["rng"], rank.device)
    log.info("resuming from %s at step %d (%d tokens)", checkpoint.path, trainer.step, trainer.tokens)
    return trainer


def _write_checkpoint(cfg: TrainJob, plan: TrainPlan, info: list[SourceInfo], trainer: Trainer,
                      source: BatchSource, rank: RankInfo) -> Path:
    """Gather every rank's source position and RNG state; rank 0 writes; all wait for it."""
    trainer.check_weights()
    ranks = all_gather_objects({"source": source.state_dict(), "rng": rng_state(rank.device)})
    root = cfg.layout.checkpoints
    path = root / f"tokens-{trainer.tokens:012d}"
    if trainer.mesh is not None:
        return write_sharded_checkpoint(root, trainer.tokens, trainer.state_tensors(),
                                        _checkpoint_state(cfg, plan, info, trainer, ranks)
                                        if rank.is_main else None, trainer.mesh)
    gathered = None
    if plan.hook_owners is not None:  # distribute_hooks: rank 0 writes every rank's SAEs
        parts = cast("list[dict[str, torch.Tensor]] | None", gather_objects(trainer.state_tensors()))
        gathered = {key: value for part in parts or [] for key, value in part.items()}
    if rank.is_main:
        state = _checkpoint_state(cfg, plan, info, trainer, ranks)
        tensors = trainer.state_tensors() if gathered is None else gathered
        path = write_checkpoint(root, trainer.tokens, tensors, state)
    barrier()
    return path


def _checkpoint_state(cfg: TrainJob, plan: TrainPlan, info: list[SourceInfo], trainer: Trainer,
                      ranks: list[object]) -> dict[str, Any]:
    return {"step": trainer.step, "tokens": trainer.tokens, "input_scale": trainer.input_scale,
            "input_scales": trainer.input_scales,
            "fingerprint": fingerprint(cfg.train, plan, info), "ranks": ranks,
            "saeworks_version": package_version()}


def _save_saes(cfg: TrainJob, plan: TrainPlan, info: list[SourceInfo], trainer: Trainer, rank: RankInfo,
               finished: bool) -> list[SAEResult]:
    """Rank 0 saves each SAE (its hook's input scale folded in) with SAELens metadata, once training
    is done; under distribute_hooks each rank saves the SAEs it holds."""
    results = []
    held = dict(zip(trainer.plan.sae_ids, trainer.saes, strict=True))
    metadata = {source.hook: source.metadata for source in info}
    for i, name in enumerate(plan.names):
        hook, sae = plan.sae_hooks[i], held.get(i)
        saver = rank.is_main if plan.hook_owners is None else plan.owner(hook) == rank.rank
        last = trainer.last_metrics[i] if trainer.last_metrics else {}
        path = cfg.layout.sae(name) if finished else None
        if path is not None and trainer.mesh is not None and sae is not None:  # collective: shards
            sae = assemble(sae, create_sae(plan.saes[i]).to(sae.W_dec.device), trainer.mesh)
        if path is not None and saver and sae is not None:
            scale = trainer.input_scales[hook]
            training = {"tokens": trainer.tokens, "steps": trainer.step, "batch_size": plan.batch_size,
                        "lr": plan.lrs[i], "world_size": plan.world_size, "input_scale": scale,
                        "autocast": trainer.autocast_name,  # `auto` as resolved on this machine
                        "final_metrics": last, "saeworks_version": package_version()}
            save_sae(sae, path, scale, {**metadata[hook], "saeworks_training": training})
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
