"""Hook functions that rewrite a hook point's activation: splice an SAE in, ablate to zero or mean.

Each returns a `HookFn` for `saeworks.activations.hooks.hooks_attached` (activation `[batch, pos, d]` in,
replacement out). Only positions from `first_kept` on are replaced; the earlier ones (BOS and the
attention sinks after it) stay clean, because the SAE never saw them in training and they carry
most of the residual norm. The input is never modified in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from saeworks.sae.base import SparseAutoencoder

HookFn = Callable[[torch.Tensor], torch.Tensor | None]
"""Receives the activation `[batch, pos, d]`; returning a tensor replaces it in the forward.
Defined here, in the SAE core, so interventions need no stage; the hook mapping uses the same type."""


def replace_from(first_kept: int, replacement: Callable[[torch.Tensor], torch.Tensor]) -> HookFn:
    """A hook fn writing `replacement(activation[:, first_kept:])` over those positions."""

    def hook(activation: torch.Tensor) -> torch.Tensor:  # [batch, pos, d]
        replaced = activation.clone()
        replaced[:, first_kept:] = replacement(activation[:, first_kept:])
        return replaced

    return hook


def splice_sae(sae: SparseAutoencoder, first_kept: int) -> HookFn:
    """Replace positions >= first_kept by the SAE's reconstruction (run in float32 on the SAE's
    device, cast back to the activation's dtype and device)."""
    sae_device = sae.W_dec.device

    def reconstruct(kept: torch.Tensor) -> torch.Tensor:  # [batch, pos - first_kept, d]
        return sae(kept.to(sae_device, torch.float32)).to(kept.device, kept.dtype)

    return replace_from(first_kept, reconstruct)


def ablate_zero(first_kept: int) -> HookFn:
    """Replace positions >= first_kept by zeros."""
    return replace_from(first_kept, torch.zeros_like)


def ablate_mean(mean: torch.Tensor, first_kept: int) -> HookFn:
    """Replace positions >= first_kept by `mean` [d] (the mean activation of the evaluated rows)."""

    def fill(kept: torch.Tensor) -> torch.Tensor:  # [batch, pos - first_kept, d]
        return mean.to(kept.device, kept.dtype).expand_as(kept)

    return replace_from(first_kept, fill)
