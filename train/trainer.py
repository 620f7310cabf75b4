"""The training loop: several SAEs, one batch stream, one all-reduce per step.

A step, for every SAE on the same batch x [local_batch, d_in]: training_forward -> backward; then
ONE all-reduce (mean over ranks) of every SAE's gradients plus the step's losses, fired flags
and the SIGTERM flag; loss check; decoder-gradient projection, clipping, Adam, decoder
normalisation; dead-latent counters. Every rank applies the same averaged gradients to the same
weights, so the SAEs stay identical on all ranks with no broadcast.

Collaborators are passed in: the batch source, the metrics log, the checkpoint writer and the stop
flag (train/run.py builds them), so this file is only the recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from saeworks.activations.reader import ReaderBatch
from saeworks.sae.base import SparseAutoencoder, TrainContext
from saeworks.sae.distributed import all_reduce_mean_
from saeworks.sae.precision import autocast_dtype
from saeworks.train.config import TrainConfig
from saeworks.train.data import BatchSource
from saeworks.train.dead import DeadLatents
from saeworks.train.errors import TrainingDivergedError, TrainingInterrupted
from saeworks.train.plan import TrainPlan
from saeworks.train.schedule import sparsity_coefficient

SCALARS = ("loss", "mse", "aux", "l0")


class StepStats(NamedTuple):
    """What one step's forwards report, averaged over ranks once `Trainer.reduce` ran."""

    scalars: torch.Tensor
    """[n_saes, 4] float32: loss, mse, aux, l0 of each SAE (SCALARS order)."""
    fired: list[torch.Tensor]
    """Per SAE [d_sae] float32: > 0 where the latent fired on some row of the global batch."""


class MetricsSink(Protocol):
    """Where the loop reports progress (train/metrics.py; rank 0 writes, other ranks ignore)."""

    every: int

    def advance(self, tokens: int) -> None: ...

    def write(self, step: int, tokens: int, rows: list[dict[str, Any]]) -> None: ...


@dataclass
class StopFlag:
    """Set by the SIGTERM handler; read at every step boundary."""

    requested: bool = False


CheckpointFn = Callable[["Trainer", BatchSource], Path]


class Trainer:
    """The SAEs, their Adam state and dead counters, and the step that changes them."""

    def __init__(self, saes: list[SparseAutoencoder], plan: TrainPlan, cfg: TrainConfig,
                 input_scale: float, device: torch.device) -> None:
        self.saes, self.plan, self.input_scale, self.device = saes, plan, input_scale, device
        self.grad_clip_norm, self.dense_fraction = cfg.grad_clip_norm, cfg.dense_fraction
        # `auto` resolved for this device (train.run resolves it once for all ranks before this).
        self.autocast_name = autocast_dtype(cfg.autocast, device)
        self.autocast = torch.bfloat16 if self.autocast_name == "bfloat16" else None
        self.optimizer = torch.optim.Adam(
            [{"params": list(sae.parameters()), "lr": lr} for sae, lr in zip(saes, plan.lrs, strict=True)],
            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        self.dead = DeadLatents([sae.d_sae for sae in saes], plan.dead_after_tokens, device)
        self.coefficients = [sparsity_coefficient(cfg) for cfg in plan.saes]
        self.step = 0
        self.last_metrics: list[dict[str, Any]] = []

    @property
    def tokens(self) -> int:
        return self.step * self.plan.batch_size

    def fit(self, source: BatchSource, log: MetricsSink, checkpoint: CheckpointFn, stop: StopFlag) -> None:
        """Train from `self.step` to the plan's stop step; a checkpoint at the end (and as planned)."""
        batches = iter(source)
        try:
            while self.step < self.plan.stop_step:
                x = self.prepare(_next(batches))  # [local_batch, d_in] float32, scaled
                stats = self.forward_backward(x)
                stopping = self.reduce(stats, stop.requested)
                self.check_losses(stats)
                self.optimizer_step()
                self.dead.update(stats.fired, self.plan.batch_size)
                self.step += 1
                log.advance(self.plan.batch_size)
                last = self.step == self.plan.stop_step or stopping
                if self.step % log.every == 0 or last:
                    self.check_weights()
                    self.last_metrics = self.metrics(x, stats)
                    log.write(self.step, self.tokens, self.last_metrics)
                every = self.plan.checkpoint_every_steps
                if last or (every is not None and self.step % every == 0):
                    checkpoint(self, source)
                if stopping:
                    raise TrainingInterrupted(f"stopped by SIGTERM after step {self.step} "
                                              f"({self.tokens} tokens)")
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def prepare(self, activations: torch.Tensor) -> torch.Tensor:
        if activations.shape[0] != self.plan.local_batch:
            raise ValueError(f"batch source gave {activations.shape[0]} rows, the plan reads "
                             f"{self.plan.local_batch} per process")
        return activations.to(self.device, non_blocking=True).float() * self.input_scale

    def forward_backward(self, x: torch.Tensor) -> StepStats:
        """Forward and backward of every SAE on x; gradients accumulate into zeroed .grad."""
        factor = self.plan.schedule.sparsity_factor(self.step)
        scalars, fired = [], []
        for sae, coefficient, dead in zip(self.saes, self.coefficients, self.dead.masks(), strict=True):
            with torch.autocast(self.device.type, self.autocast) if self.autocast else nullcontext():
                out = sae.training_forward(x, TrainContext(coefficient * factor, dead))
            out.loss.backward()
            scalars.append(torch.stack([v.detach().float() for v in (out.loss, out.mse, out.aux, out.l0)]))
            fired.append(out.fired.float())
        return StepStats(torch.stack(scalars), fired)

    def reduce(self, stats: StepStats, stop_requested: bool) -> bool:
        """Average gradients, statistics and the stop flag over ranks in one all-reduce."""
        flag = torch.tensor([float(stop_requested)], device=self.device)
        grads = [p.grad for sae in self.saes for p in sae.parameters() if p.grad is not None]
        all_reduce_mean_([*grads, stats.scalars, *stats.fired, flag])
        return bool(flag.item() > 0)

    def check_losses(self, stats: StepStats) -> None:
        for name, (loss, *_) in zip(self.plan.names, stats.scalars.tolist(), strict=True):
            if not torch.isfinite(torch.tensor(loss)):
                raise self.diverged(name, f"the loss is {loss}")

    def check_weights(self) -> None:
        for name, sae in zip(self.plan.names, self.saes, strict=True):
            bad = [key for key, p in sae.state_dict().items() if not torch.isfinite(p).all()]
            if bad:
                raise self.diverged(name, f"{', '.join(bad)} hold NaN/Inf")

    def diverged(self, name: str, what: str) -> TrainingDivergedError:
        return TrainingDivergedError(
            f"SAE {name} diverged at step {self.step + 1} ({self.tokens} tokens done): {what}; "
            "no SAE was saved. Lower train.lr, set train.grad_clip_norm, or check the activations")

    def optimizer_step(self) -> None:
        factor = self.plan.schedule.lr_factor(self.step)
        for sae, group, lr in zip(self.saes, self.optimizer.param_groups, self.plan.lrs, strict=True):
            sae.project_decoder_grad()
            if self.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), self.grad_clip_norm)
            group["lr"] = lr * factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # same grad tensors every step: one buffer layout
        for sae in self.saes:
            sae.normalize_decoder()

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, stats: StepStats) -> list[dict[str, Any]]:
        """One row per SAE for the metrics log (mse and loss in the scaled units training sees)."""
        moments = torch.cat([x.double().sum(0), x.double().pow(2).sum().view(1)])  # [d_in + 1]
        counts = [(sae.encode(x) > 0).sum(0).double() for sae in self.saes]  # per SAE [d_sae]
        all_reduce_mean_([moments, *counts])
        n, world = self.plan.batch_size, self.plan.world_size
        mean = moments[:-1] * world / n
        variance = float(moments[-1] * world / n - mean.pow(2).sum())  # mean ||x - mean(x)||^2
        rows = []
        for i, (name, dead) in enumerate(zip(self.plan.names, self.dead.counts(), strict=True)):
            values = dict(zip(SCALARS, stats.scalars[i].tolist(), strict=True))
            dense = int((counts[i] * world / n > self.dense_fraction).sum())
            rows.append({"sae": name, "step": self.step, "tokens": self.tokens, **values,
                         "fvu": values["mse"] / max(variance, 1e-30), "dead": dead, "dense": dense,
                         "lr": self.optimizer.param_groups[i]["lr"]})
        return rows

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Weights, Adam moments and dead counters, under flat safetensors keys."""
        tensors = {f"sae.{i}.{key}": value.detach().cpu()
                   for i, sae in enumerate(self.saes) for key, value in sae.state_dict().items()}
        for index, state in self.optimizer.state_dict()["state"].items():
            tensors.update({f"adam.{index}.{key}": torch.as_tensor(value).cpu()
                            for key, value in state.items()})
        return {**tensors, **self.dead.state_tensors()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        for i, sae in enumerate(self.saes):
            sae.load_state_dict({key: tensors[f"sae.{i}.{key}"] for key in sae.state_dict()})
        optimizer = self.optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({**optimizer, "state": state})
        self.dead.load_state_tensors(tensors)
        self.step = step


def _next(batches: Iterator[ReaderBatch]) -> torch.Tensor:
    try:
        return next(batches).activations
    except StopIteration:
        raise RuntimeError("the batch source ended before training did") from None

