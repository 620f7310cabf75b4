"""The figures of a feature dictionary and of a run: PNG files drawn with matplotlib's Agg renderer.

Every function takes plain data and a path, writes one PNG and returns the path, so the files
and their names are the same on any machine (no display, no interactive backend).

Figures are built as matplotlib.figure.Figure objects, never through pyplot, and the backend is
never set: importing this module in a notebook leaves the notebook's backend (inline, widget) as
it was, and no figure lingers in pyplot's registry. `fig.savefig(..., format="png")` renders with
Agg whatever the backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from saeworks.eval.features import FeatureAnalysis

DENSITY_PLOT = "density_histogram.png"
ACTIVATIONS_PLOT = "activation_histograms.png"
FRONTIER_PLOT = "l0_fvu_frontier.png"
DPI = 100


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def density_histogram(density: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """Histogram of log10 feature density; dead features (density 0) are counted in the title."""
    values = np.asarray(torch.as_tensor(density).double().cpu())
    alive = values[values > 0]
    dead = int((values <= 0).sum())
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    if alive.size:
        ax.hist(np.log10(alive), bins=50, color="#3b6ea8")
    ax.set_xlabel("log10(feature density)")
    ax.set_ylabel("features")
    ax.set_title(f"Feature density: {alive.size} alive, {dead} dead of {values.size}")
    fig.tight_layout()
    return _save(fig, path)


def activation_histograms(analysis: FeatureAnalysis, ids: Sequence[int], path: str | Path,
                          labels: Mapping[int, str] | None = None) -> Path:
    """Small multiples: the activation histogram (over (0, max]) of each feature in `ids`."""
    ids = list(ids) or [0]
    cols = min(4, len(ids))
    rows = math.ceil(len(ids) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    bins = int(analysis.histogram.shape[1])
    for ax, feature in zip(axes.flat, ids, strict=False):
        counts = analysis.histogram[feature].double().numpy()
        top = float(analysis.max[feature])
        edges = np.linspace(0.0, top if top > 0 else 1.0, bins + 1)
        ax.stairs(counts, edges, fill=True, color="#3b6ea8")
        title = f"#{feature}" + (f" {labels[feature]}" if labels and feature in labels else "")
        ax.set_title(title[:40], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("activation", fontsize=7)
    for ax in list(axes.flat)[len(ids):]:
        ax.axis("off")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1, top=0.92, wspace=0.3, hspace=0.6)
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The points no other point beats on both L0 and FVU (lower is better), by increasing L0."""
    front: list[tuple[str, float, float]] = []
    for point in sorted(points, key=lambda p: (p[1], p[2])):
        if not front or point[2] < front[-1][2]:
            front.append(point)
    return front


def frontier(points: Sequence[tuple[str, float, float]], path: str | Path) -> Path:
    """The L0–FVU frontier of a sweep: each SAE `(name, l0, fvu)` as a labelled point, the Pareto
    line through the best ones, L0 on a log axis."""
    finite = [p for p in points if math.isfinite(p[1]) and math.isfinite(p[2]) and p[1] > 0]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    if finite:
        ax.scatter([p[1] for p in finite], [p[2] for p in finite], color="#3b6ea8", zorder=3)
        for name, l0, fvu in finite:
            ax.annotate(name, (l0, fvu), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_front(finite)
        ax.plot([p[1] for p in front], [p[2] for p in front], color="#c0504d", label="Pareto front")
        ax.legend(fontsize=8)
        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title(f"L0–FVU frontier ({len(finite)} SAE{'s' if len(finite) != 1 else ''})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
