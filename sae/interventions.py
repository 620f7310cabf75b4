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
    device, cast back to the activation's dtype and device; `SparseAutoencoder.reconstruct`, so
    without autograd a TopK SAE decodes its k active latents only)."""
    sae_device = sae.W_dec.device

    def reconstruct(kept: torch.Tensor) -> torch.Tensor:  # [batch, pos - first_kept, d]
        return sae.reconstruct(kept.to(sae_device, torch.float32)).to(kept.device, kept.dtype)

    return replace_from(first_kept, reconstruct)


def ablate_zero(first_kept: int) -> HookFn:
    """Replace positions >= first_kept by zeros."""
    return replace_from(first_kept, torch.zeros_like)


def ablate_mean(mean: torch.Tensor, first_kept: int) -> HookFn:
    """Replace positions >= first_kept by `mean` [d] (the mean activation of the evaluated rows)."""

    def fill(kept: torch.Tensor) -> torch.Tensor:  # [batch, pos - first_kept, d]
        return mean.to(kept.device, kept.dtype).expand_as(kept)

    return replace_from(first_kept, fill)


# Edits of one activation along a direction or in a dictionary's latent space. Each takes the
# activation `h` [..., d] (float32) and returns the edited one; positions are chosen by the caller.


def add_direction(h: torch.Tensor, direction: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Activation addition: h + c·v (`direction` [d] in raw activation space)."""
    return h + coefficient * direction


def cap_projection(h: torch.Tensor, unit: torch.Tensor, cap: float) -> torch.Tensor:
    """Neuronpedia's PROJECTION_CAP steering method: where the projection ⟨h, u⟩ on the unit
    direction `unit` exceeds `cap`, remove the excess (h − (⟨h, u⟩ − cap)·u); elsewhere h is
    returned exactly. A cap above every projection changes nothing."""
    excess = (h @ unit - cap).clamp_min(0.0)  # [...]
    return h - excess.unsqueeze(-1) * unit


def scale_projection(h: torch.Tensor, unit: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Neuronpedia's ORTHOGONAL_DECOMP steering method: (I − P)h + c·Ph with P = u uᵀ, computed
    as h + (c − 1)·⟨h, u⟩·u so that c = 1 returns h exactly and c = 0 removes the direction."""
    return h + (coefficient - 1.0) * (h @ unit).unsqueeze(-1) * unit


def set_latents(sae: SparseAutoencoder, h: torch.Tensor, features: torch.Tensor,
                new_values: torch.Tensor, old_values: torch.Tensor) -> torch.Tensor:
    """Error-preserving feature edit (Anthropic's feature clamping): SAE(h with latents
    `features` [n] set to `new_values` [..., n]) + (h − SAE(h)). The decoder is linear, so this is
    h + (new − old)·W_dec[features]: other latents and the SAE's error term are untouched, and
    where new == old the activation comes back exactly. `old_values` [..., n] is sae.encode(h)
    at `features` (passed in, so one encode serves every edit of the same SAE)."""
    return h + (new_values - old_values) @ sae.W_dec[features]
