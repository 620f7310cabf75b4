"""BatchTopK SAE (Bussmann et al. 2024): the k * batch largest pre-activations of the whole batch.

A token may use more or fewer than k latents; the batch averages k. Inference cannot see a batch,
so training keeps a running `threshold` (EMA of the smallest selected activation, as SAELens
does) and `encode` is a JumpReLU with that one threshold; the SAE is saved as SAELens "jumprelu"
with `threshold` [d_sae] all equal to it.

Training reuses the TopK sparse kernels: row b's selected latents are its own c_b largest
pre-activations (c_b = how many of the batch's top k * batch fell in row b), so each row takes its
top max_b(c_b) latents and the unselected tail is masked to zero (zero value, zero gradient).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from saeworks.sae.auxk import auxk_loss
from saeworks.sae.base import TrainContext, TrainOutput, mse_per_row
from saeworks.sae.config import SAEConfig
from saeworks.sae.jumprelu import jumprelu
from saeworks.sae.sparse import active_latent_counts, dense_pre_activations, sparse_decode
from saeworks.sae.topk import TopKSAE

THRESHOLD_EMA = 0.01
"""Weight of each batch's smallest selected activation in the running threshold (SAELens' default
topk_threshold_lr); the first batch sets it outright."""


class BatchSelection(NamedTuple):
    """Per-row candidates of a batch-level top-k selection."""

    indices: torch.Tensor
    """[batch, width] latent ids, each row's largest pre-activations first."""
    keep: torch.Tensor
    """[batch, width] bool: the candidate is among the batch's k * batch largest."""


def batch_topk(pre: torch.Tensor, k: int) -> BatchSelection:
    """The k * batch largest entries of `pre` [batch, d_sae], as per-row padded indices.

    The candidates are each row's `width` largest (from 4k); the batch's top k * batch among them
    are its top k * batch overall unless some row has all its candidates chosen, in which case the
    width doubles and the selection runs again. Much cheaper than one top-k over batch * d_sae.
    """
    batch, d_sae = pre.shape
    width = min(4 * k, d_sae)
    while True:
        values, indices = pre.topk(width, dim=1, sorted=True)  # [batch, width], largest first
        chosen = values.flatten().topk(k * batch, sorted=False).indices
        counts = torch.bincount(chosen // width, minlength=batch)  # [batch] selected per row
        most = int(counts.max())  # one host sync: the padded width
        if most < width or width == d_sae:
            break
        width = min(2 * width, d_sae)
    keep = torch.arange(most, device=pre.device) < counts[:, None]
    return BatchSelection(indices[:, :most].contiguous(), keep)


def smallest_selected(values: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Scalar: the smallest of `values` where `active` (inf where none is)."""
    return torch.where(active, values, torch.inf).min()


class BatchTopKSAE(TopKSAE):
    """k active latents per token on average over a batch; per-token threshold at inference."""

    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.threshold: torch.Tensor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return jumprelu(self.pre_activations(x), self.threshold)

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        x_centred = self.centred(x)
        with torch.no_grad():
            pre = dense_pre_activations(self, x_centred)  # [batch, d_sae], no graph
            indices, keep = batch_topk(pre, self.cfg.k)
        values = self.active_values(pre, x_centred, indices) * keep  # [batch, width]
        x_hat, mse, reconstruction = self.reconstruction(x, indices, values)
        aux = auxk_loss(self, pre, x_centred, x, x_hat, ctx.dead_mask)
        active = values.detach() > 0
        self.update_threshold(values.detach(), active)
        fired = active_latent_counts(indices, active, self.d_sae)
        return TrainOutput(x_hat, reconstruction + self.cfg.aux_coefficient * aux, mse, x.new_zeros(()),
                           aux, active.sum(dim=1).float().mean(), fired)

    def reconstruction(self, x: torch.Tensor, indices: torch.Tensor,
                       values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat, mse, reconstruction loss) of the selected latents."""
        x_hat = sparse_decode(indices, values, self.W_dec) + self.b_dec
        mse = mse_per_row(x, x_hat)
        return x_hat, mse, mse

    @torch.no_grad()
    def update_threshold(self, values: torch.Tensor, active: torch.Tensor) -> None:
        """EMA of the smallest positive selected activation (no host sync)."""
        self.update_threshold_to(smallest_selected(values, active))

    @torch.no_grad()
    def update_threshold_to(self, smallest: torch.Tensor) -> None:
        """One EMA step towards `smallest` (a scalar; inf when nothing was active: no change)."""
        smallest = smallest.to(self.threshold.dtype)
        updated = torch.where(self.threshold == 0, smallest, self.threshold.lerp(smallest, THRESHOLD_EMA))
        self.threshold.copy_(torch.where(smallest.isfinite(), updated, self.threshold))

    def dense_training_latents(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        indices, keep = batch_topk(pre.detach(), self.cfg.k)
        mask = torch.zeros(pre.shape, dtype=torch.bool, device=pre.device).scatter_(1, indices, keep)
        return pre.relu() * mask

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {name: p.detach() for name, p in self.named_parameters()}
        return {**tensors, "threshold": self.threshold.detach().expand(self.d_sae).clone()}

    def inference_cfg(self) -> dict[str, Any]:
        return {"architecture": "jumprelu"}
