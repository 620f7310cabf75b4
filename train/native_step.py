"""The optimiser step of one SAE on the CPU in two native passes (sae/kernels/adam_step.c): the
decoder-gradient projection with every gradient's squares, then Adam with the clip coefficient
and the unit-norm decoder rows. The same step as the torch ops of `Trainer.optimizer_step`
(project_decoder_grad, clip_grad_norm_, torch.optim.Adam, zero_grad, normalize_decoder) within
float rounding, in about half their time (measured on the demo SAE, 10.6M parameters:
benchmarks/train_step.py).

The gradients are dropped afterwards (None, as zero_grad(set_to_none=True)): the next backward
then hands its gradients over instead of adding them to zeros (a read of 84 MB and a write of
42 MB on the demo SAE), and Adam writes no zeros. The sparse TopK backward writes W_enc's gradient
in W_enc's own layout, so nothing is copied into layout either (an in-process A/B on the demo
step, 2 threads: backward 26.8 -> 21.6 ms, 0.70 -> 0.72 of the encoder-matmul limit).

Adam's state stays in the torch.optim.Adam that the trainer holds, under torch's own keys (step,
exp_avg, exp_avg_sq), so checkpoints, resumption and the torch path read and continue it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from saeworks.sae import native
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.distributed import LatentMesh
from saeworks.sae.native_sparse import threads
from saeworks.sae.sharded import SHARDED_KEYS


def native_step_applies(sae: SparseAutoencoder, group: dict[str, Any], optimizer: torch.optim.Adam) -> bool:
    """Whether `native_sae_step` can step `sae`: not where a tensor is off the CPU or not float32,
    where Adam has an option the kernel lacks, without a C compiler, or with SAEWORKS_NATIVE=0."""
    return _library(sae, group, optimizer) is not None


def native_sae_step(sae: SparseAutoencoder, group: dict[str, Any], optimizer: torch.optim.Adam,
                    clip_norm: float | None, mesh: LatentMesh | None = None) -> None:
    """One step of `sae`, whose parameters are `group`'s (with the group's lr, betas and eps),
    where `native_step_applies`. `mesh`: latent sharding, `sae` being this rank's shard (the
    clip's norm is then over every shard)."""
    lib = _library(sae, group, optimizer)
    if lib is None:
        raise RuntimeError("native_sae_step does not apply here; check native_step_applies first")
    named = [(name, p, p.grad) for name, p in sae.named_parameters() if p.grad is not None]
    project = sae.unit_norm_decoder
    steps_W_dec = sae.W_dec.grad is not None  # (the loop drops the gradients)
    squares = {name: _row_squares(lib, p, grad, project and name == "W_dec") for name, p, grad in named}
    factor = 1.0 if clip_norm is None else _clip_factor(squares, clip_norm, mesh)
    beta1, beta2 = group["betas"]
    for name, p, grad in named:
        state = optimizer.state[p]
        if not state:  # as torch.optim.Adam starts it (fused: a float32 step on the parameter's device)
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        rows, cols = _rows(p)
        lib.adam_rows(p.data_ptr(), grad.data_ptr(), state["exp_avg"].data_ptr(),
                      state["exp_avg_sq"].data_ptr(), rows, cols, factor, beta1, beta2,
                      group["lr"] / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step), group["eps"],
                      int(project and name == "W_dec"), threads())
        torch.autograd.graph.increment_version(p)  # written through its pointer: say so, as an in-place op
        p.grad = None
    if project and not steps_W_dec:  # no step of W_dec's; its rows still get their norm
        sae.normalize_decoder()


def _library(sae: SparseAutoencoder, group: dict[str, Any], optimizer: torch.optim.Adam) -> Any:
    """sae/kernels/adam_step.c where it applies to this SAE and optimizer, else None."""
    defaults = optimizer.defaults
    options = ("weight_decay", "decoupled_weight_decay", "amsgrad", "maximize", "differentiable",
               "capturable")  # Adam options the kernel does not have
    if type(optimizer) is not torch.optim.Adam or not isinstance(group["lr"], float | int) \
            or any(defaults.get(key) or group.get(key) for key in options):
        return None
    params = list(sae.parameters())
    if [id(p) for p in params] != [id(p) for p in group["params"]]:
        return None
    for p in params:
        state = optimizer.state.get(p, {})
        tensors = [p, *([p.grad] if p.grad is not None else []),
                   *(state[key] for key in ("exp_avg", "exp_avg_sq") if key in state)]
        if any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
               or t.shape != p.shape for t in tensors):
            return None
    return native.library("adam_step")


def _rows(p: torch.Tensor) -> tuple[int, int]:
    """A parameter as rows for the kernels: a matrix's own, any other tensor as one row."""
    return (p.shape[0], p.shape[1]) if p.dim() == 2 else (1, p.numel())


def _row_squares(lib: Any, p: torch.Tensor, grad: torch.Tensor, project: bool) -> float:
    """The sum of squares of p's gradient `grad`, after projecting each of its rows off p's row where
    `project` (the unit-norm decoder's); summed row by row in order (the same for any thread count)."""
    rows, cols = _rows(p)
    per_row = torch.empty(rows, dtype=torch.float64)  # [rows]
    lib.row_squares(p.data_ptr(), grad.data_ptr(), rows, cols, int(project), per_row.data_ptr(), threads())
    return math.fsum(per_row.tolist())


def _clip_factor(squares: dict[str, float], clip_norm: float, mesh: LatentMesh | None) -> float:
    """torch.nn.utils.clip_grad_norm_'s coefficient, min(1, clip / (norm + 1e-6)); under latent
    sharding the norm is over every shard's gradients and the replicated ones once."""
    if mesh is None:
        total = math.fsum(squares.values())
    else:
        sharded = torch.tensor([math.fsum(v for key, v in squares.items() if key in SHARDED_KEYS)],
                               dtype=torch.float32)  # as clip_sharded_grad_norm_ sends it
        total = float(mesh.sum_over_shards_(sharded)) \
            + math.fsum(v for key, v in squares.items() if key not in SHARDED_KEYS)
    return min(1.0, clip_norm / (math.sqrt(total) + 1e-6))
