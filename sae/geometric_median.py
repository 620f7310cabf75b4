"""Geometric median by Weiszfeld's algorithm: where b_dec starts (Bricken et al. 2023; SAELens).

The point minimising the summed Euclidean distance to a sample of activations; unlike the mean it
is not dragged by the rare rows of huge norm that residual streams have (e.g. at BOS).
"""

from __future__ import annotations

import torch


def geometric_median(points: torch.Tensor, tol: float = 1e-5, max_iter: int = 100,
                     eps: float = 1e-8) -> torch.Tensor:
    """[d] geometric median of `points` [n, d], in their dtype (computed in float64).

    Weiszfeld: m <- sum_i w_i p_i / sum_i w_i with w_i = 1 / ||p_i - m||, from the mean, until a
    step moves m by less than `tol` times the sample's RMS distance to the mean, or `max_iter`
    steps. Distances are clamped at `eps` (times that scale) so a point on m cannot divide by 0.
    """
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"geometric_median needs a non-empty [n, d] sample, got shape {tuple(points.shape)}")
    x = points.double()
    median = x.mean(dim=0)
    scale = float((x - median).pow(2).sum(dim=1).mean().sqrt()) or 1.0
    for _ in range(max_iter):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(eps * scale)  # [n]
        step = (weights[:, None] * x).sum(dim=0) / weights.sum() - median
        median = median + step
        if float(step.norm()) <= tol * scale:
            break
    return median.to(points.dtype)
