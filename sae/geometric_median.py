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

    Each step is two matrix-vector products over the centred points (||p - m||^2 expanded as
    ||p||^2 - 2 p.m + ||m||^2): no [n, d] temporary per step, which at the training sample's size
    (16,384 x 576 float64, 75 MB each) was most of the time.
    """
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"geometric_median needs a non-empty [n, d] sample, got shape {tuple(points.shape)}")
    x = points.double()
    mean = x.mean(dim=0)
    centred = x.sub_(mean) if x is not points else x - mean  # [n, d]; the median relative to the mean
    del x
    squares = centred.pow(2).sum(dim=1)  # [n] ||p_i - mean||^2
    scale = float(squares.mean().sqrt()) or 1.0
    floor = (eps * scale) ** 2
    median = torch.zeros_like(mean)  # relative to the mean
    for _ in range(max_iter):
        distances = (squares - 2.0 * (centred @ median) + median.dot(median)).clamp_min_(floor).sqrt_()
        weights = distances.reciprocal_()  # [n]
        step = (weights @ centred) / weights.sum() - median
        median = median + step
        if float(step.norm()) <= tol * scale:
            break
    return (median + mean).to(points.dtype)
