"""The shared base of every SAE architecture: parameters, encode/decode, typed training output.

Tensor vocabulary: `x` [batch, d_in] inputs; `latents` [batch, d_sae]; W_enc [d_in, d_sae],
b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] are bare parameters, so the state-dict keys are
the SAELens file keys. An architecture module subclasses `SparseAutoencoder`, implements
`encode` and `training_forward`, and registers itself in sae/registry.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from saeworks.sae.config import SAEConfig


class TrainContext(NamedTuple):
    """What a training step tells the SAE beyond its input."""

    sparsity_coefficient: float
    """The L1/L0 coefficient after its warm-up (ignored by the TopK family)."""
    dead_mask: torch.Tensor | None
    """[d_sae] bool: latents that have not fired for the configured number of tokens (AuxK)."""


class TrainOutput(NamedTuple):
    """One training forward; every architecture returns all fields (zeros where unused)."""

    x_hat: torch.Tensor
    """[batch, d_in] reconstruction."""
    loss: torch.Tensor
    """Scalar to minimise: mse + sparsity_coefficient * sparsity + aux_coefficient * aux."""
    mse: torch.Tensor
    """Scalar: squared error summed over d_in, averaged over rows."""
    sparsity: torch.Tensor
    """Scalar sparsity penalty before its coefficient (0 for the TopK family)."""
    aux: torch.Tensor
    """Scalar auxiliary loss before its coefficient (AuxK; 0 where unused)."""
    l0: torch.Tensor
    """Scalar: mean number of active latents per row."""
    fired: torch.Tensor
    """[d_sae] float32: on how many rows of the batch each latent was active in this forward (> 0:
    it fired). The dead-latent counters read whether, the metrics log how often."""


class SparseAutoencoder(nn.Module, ABC):
    """Encoder, sparsifying nonlinearity, linear decoder. Subclasses define the nonlinearity."""

    architecture: ClassVar[str]
    sparsity_coefficient_field: ClassVar[str | None] = None
    """SAEConfig field weighting this architecture's sparsity penalty (None: no penalty, TopK family)."""
    unit_norm_decoder: ClassVar[bool] = True
    """Keep decoder rows at unit norm (projected gradients); the relu recipe leaves them free."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.d_in is None or cfg.d_sae is None:
            raise ValueError("SAEConfig must be resolved (d_in, d_sae set) before building an SAE")
        self.cfg = cfg
        self.d_in, self.d_sae = cfg.d_in, cfg.d_sae
        W_dec = torch.randn(self.d_sae, self.d_in)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec * self.initial_decoder_norm())
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone().contiguous())  # tied init (Gao et al. 2.2)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    def initial_decoder_norm(self) -> float:
        """Norm of every decoder row at initialisation."""
        return 1.0

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] encoder pre-activations."""
        return self.centred(x) @ self.W_enc + self.b_enc

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae] latent activations, per token (inference)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] -> [..., d_in]."""
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_in]: `forward`'s reconstruction, by the fastest way the
        architecture has where no gradient is asked for (a TopK SAE's k active latents); the same
        numbers to float rounding."""
        return self(x)

    @abstractmethod
    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        """Reconstruction and losses of one batch `[batch, d_in]`."""

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (after each optimiser step, where the recipe asks)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component that would change decoder-row norms (before the step)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            W_dec, grad = self.W_dec.detach(), self.W_dec.grad  # [d_sae, d_in]
            parallel = torch.linalg.vecdot(grad, W_dec).unsqueeze(1)  # [d_sae, 1], no product temporary
            grad.addcmul_(parallel, W_dec, value=-1)

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors saved for inference (SAELens names); architectures add e.g. `threshold`."""
        return {name: p.detach() for name, p in self.named_parameters()}

    @torch.no_grad()
    def load_inference_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the weights from tensors named as `inference_tensors` names them (the inverse)."""
        self.load_state_dict({name: tensors[name] for name in self.state_dict()})

    def inference_cfg(self) -> dict[str, Any]:
        """SAELens cfg keys of the saved SAE (architecture and its knobs)."""
        return {"architecture": self.architecture}


def mse_per_row(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over d_in, averaged over rows (scalar)."""
    return _MsePerRow.apply(x, x_hat)


class _MsePerRow(torch.autograd.Function):
    """`mse_per_row` with a backward of one product, 2 (x_hat - x) * grad / rows, from the error the
    forward keeps: autograd's chain (mean, sum, pow and sub backwards) made four passes over
    [rows, d_in]."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        error = x_hat - x  # [rows, d_in]
        ctx.save_for_backward(error)
        ctx.dtypes = x.dtype, x_hat.dtype
        # the mean over rows of row sums = the total / rows: one dot in the error's dtype, with no
        # squares temporary (pow + sum took 2.1 ms over [4096, 576])
        flat = error.reshape(-1)
        with torch.autocast(error.device.type, enabled=False):
            return torch.dot(flat, flat) / error.shape[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (error,) = ctx.saved_tensors
        grad_x_hat = error * (grad * (2.0 / error.shape[0]))  # [rows, d_in]
        x_dtype, x_hat_dtype = ctx.dtypes
        return (-grad_x_hat.to(x_dtype) if ctx.needs_input_grad[0] else None,
                grad_x_hat.to(x_hat_dtype) if ctx.needs_input_grad[1] else None)
