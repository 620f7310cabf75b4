"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

f(x) = pre * H(pre - threshold) with one learned threshold per latent, trained against
mse + sparsity_coefficient * L0. H has no gradient, so the threshold learns through
straight-through estimators with a rectangle kernel K of width `jumprelu_bandwidth` (eps):

    d JumpReLU / d threshold = -(threshold / eps) * K((pre - threshold) / eps)   (paper, eq. 11)
    d H(pre - threshold) / d threshold = -(1 / eps) * K((pre - threshold) / eps)  (eq. 12)

and the pre-activations get the plain gradient H(pre - threshold) (no estimator on that side).
The threshold is stored as its logarithm (positive by construction, as in the paper's
pseudo-code and SAELens); the saved tensor is SAELens' `threshold` [d_sae].
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from saeworks.sae.base import SparseAutoencoder, TrainContext, TrainOutput, mse_per_row
from saeworks.sae.config import SAEConfig


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Inference JumpReLU as SAELens computes it: relu(pre) * (pre > threshold)."""
    return pre.relu() * (pre > threshold)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - threshold); straight-through threshold gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        kernel = _rectangle((pre - threshold) / eps)
        grad_threshold = (-(threshold / eps) * kernel * grad).sum(dim=0)
        return grad_pre, grad_threshold.to(threshold.dtype), None


class _Step(torch.autograd.Function):
    """H(pre - threshold); gradient only to the threshold (the L0 penalty's estimator)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (-(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad).sum(dim=0)
        return None, grad_threshold.to(threshold.dtype), None


class JumpReLUSAE(SparseAutoencoder):
    """Per-latent learned thresholds; L0 penalty; unit-norm decoder rows."""

    architecture = "jumprelu"
    sparsity_coefficient_field = "l0_coefficient"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        init = math.log(cfg.jumprelu_init_threshold)
        self.log_threshold = nn.Parameter(torch.full((self.d_sae,), init))

    @property
    def threshold(self) -> torch.Tensor:
        """[d_sae] thresholds, exp(log_threshold)."""
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return jumprelu(self.pre_activations(x), self.threshold)

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        pre = self.pre_activations(x)  # [batch, d_sae], dense: every latent may cross its threshold
        threshold, eps = self.threshold, self.cfg.jumprelu_bandwidth
        latents = _JumpReLU.apply(pre, threshold, eps)
        x_hat = self.decode(latents)
        mse = mse_per_row(x, x_hat)
        l0 = _Step.apply(pre, threshold, eps).sum(dim=-1).mean()  # forward: mean count of pre > threshold
        active = pre.detach() > threshold.detach()
        return TrainOutput(x_hat, mse + ctx.sparsity_coefficient * l0, mse, l0, x.new_zeros(()),
                           l0.detach(), active.sum(dim=0, dtype=torch.float32))

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {name: p.detach() for name, p in self.named_parameters() if name != "log_threshold"}
        return {**tensors, "threshold": self.threshold.detach()}

    @torch.no_grad()
    def load_inference_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        # A threshold <= 0 acts as 0 in relu(pre) * (pre > threshold); log(0) = -inf gives exactly 0.
        log_threshold = tensors["threshold"].double().clamp_min(0).log()
        names = [name for name in self.state_dict() if name != "log_threshold"]
        self.load_state_dict({**{name: tensors[name] for name in names}, "log_threshold": log_threshold})

    def inference_cfg(self) -> dict[str, Any]:
        return {"architecture": "jumprelu"}
