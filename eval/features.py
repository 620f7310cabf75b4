"""What the feature analysis finds for every latent: the hand-off from analysis to the dictionary.

All tensors are on the CPU, indexed by feature id in their first dimension. A missing sample
(a feature with fewer activations than slots) has row -1, value 0 and all-zero context.
Context tensors have C = context_before + 1 + context_after slots; slot `context_before` is
the activating token; slots outside the token's window hold token id -1 and activation 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Contexts:
    """Sampled activations of every feature with the tokens around them."""

    values: torch.Tensor
    """[d_sae, n] float32: the feature's activation at the sampled row (descending for top-N)."""
    rows: torch.Tensor
    """[d_sae, n] int64: the store row of each sample (-1: no sample)."""
    token_ids: torch.Tensor
    """[d_sae, n, C] int32: the tokens around each sample, within its window (-1 outside)."""
    activations: torch.Tensor
    """[d_sae, n, C] float32: the same feature's activation on each of those tokens."""


@dataclass
class FeatureAnalysis:
    """Per-feature statistics of one SAE over `n_tokens` rows of a store, plus its weights' views."""

    n_tokens: int
    """Rows analysed (kept rows of the store: excluded positions and special tokens skipped)."""
    count: torch.Tensor
    """[d_sae] int64: rows where the feature is active (> 0)."""
    sum: torch.Tensor
    """[d_sae] float64: sum of its activations."""
    max: torch.Tensor
    """[d_sae] float32: its largest activation (0 if never active)."""
    quantile_levels: list[float]
    quantiles: torch.Tensor
    """[d_sae, len(quantile_levels)] float32: quantiles of the non-zero activations (0 if none)."""
    histogram: torch.Tensor
    """[d_sae, histogram_bins] int64: counts of non-zero activations in equal bins of (0, max]."""
    top: Contexts
    """Top-N activating rows, values descending."""
    band_edges: torch.Tensor
    """[bands + 1] float32: band boundaries as fractions of each feature's max, descending from 1."""
    bands: Contexts
    """Uniform samples from each band: n = bands * samples_per_band, band b in slots
    [b * samples_per_band, (b + 1) * samples_per_band), band 0 the highest."""
    logit_positive_ids: torch.Tensor
    """[d_sae, logit_tokens] int64: tokens the feature's decoder direction promotes most."""
    logit_positive_values: torch.Tensor
    """[d_sae, logit_tokens] float32: their logit effects (descending)."""
    logit_negative_ids: torch.Tensor
    """[d_sae, logit_tokens] int64: tokens it suppresses most."""
    logit_negative_values: torch.Tensor
    """[d_sae, logit_tokens] float32: their logit effects (ascending, most negative first)."""
    neighbour_ids: torch.Tensor
    """[d_sae, neighbours] int64: features with the most similar decoder directions (self excluded)."""
    neighbour_cosines: torch.Tensor
    """[d_sae, neighbours] float32: their cosine similarities (descending)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Where it came from: store URL, hook, model, analyze config, seconds, tokens/s."""

    @property
    def d_sae(self) -> int:
        return int(self.count.shape[0])

    @property
    def density(self) -> torch.Tensor:
        """[d_sae] float64: fraction of analysed rows where the feature is active."""
        return self.count.double() / max(self.n_tokens, 1)

    @property
    def mean_active(self) -> torch.Tensor:
        """[d_sae] float64: mean activation over the rows where it is active (0 if never)."""
        return self.sum / self.count.clamp(min=1).double()
