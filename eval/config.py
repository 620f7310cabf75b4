"""The `evaluate:` and `analyze:` sections of a run config."""

from __future__ import annotations

from dataclasses import dataclass, field

from saeworks.sae.configio import require


@dataclass
class EvaluateConfig:
    """How a trained SAE is measured: on held-out documents of the dataset, or on a store's rows."""

    held_out_tokens: int = 16_384
    """Tokens (whole windows) of held-out documents (`data.holdout_fraction`) to evaluate on when
    the target is a config; with a store, the number of its windows whose text is run through the
    model for the downstream metrics."""
    max_rows: int | None = None
    """With a store: at most this many of its kept rows for reconstruction and sparsity (None: all)."""
    batch_size: int = 16
    """Windows per model forward (the figures do not depend on it)."""
    row_batch_size: int = 8192
    """Rows per SAE forward when reading a store."""
    dense_threshold: float = 0.1
    """A latent active on more than this fraction of evaluated tokens counts as dense."""
    downstream: bool = True
    """Also run the model to measure next-token cross-entropy with the SAE spliced in, zero- and
    mean-ablated (CE-loss recovered, KL). Off: reconstruction and sparsity only, no model needed."""
    device: str = "auto"
    """`auto` (a GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`."""

    def __post_init__(self) -> None:
        require(self.held_out_tokens > 0, "held_out_tokens", f"must be positive, got {self.held_out_tokens}")
        require(self.max_rows is None or self.max_rows > 0, "max_rows", "must be positive or null")
        require(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        require(self.row_batch_size > 0, "row_batch_size", f"must be positive, got {self.row_batch_size}")
        require(0 < self.dense_threshold <= 1, "dense_threshold",
                f"must be in (0, 1], got {self.dense_threshold}")


@dataclass
class AnalyzeConfig:
    """The feature-analysis pass over a store that builds a feature dictionary."""

    max_tokens: int | None = 262_144
    """Rows of the store analysed (the first ones, excluded positions skipped); None: all."""
    batch_size: int = 4096
    """Rows encoded at once (memory: batch_size x d_sae floats)."""
    top_n: int = 20
    """Top activating contexts kept per feature."""
    bands: int = 4
    """Activation bands below the top, equal slices of (0, max activation], sampled uniformly."""
    samples_per_band: int = 5
    """Contexts sampled per band."""
    context_before: int = 24
    """Tokens shown before the activating token (within its window)."""
    context_after: int = 8
    """Tokens shown after the activating token (within its window)."""
    histogram_bins: int = 32
    """Bins of each feature's activation histogram, over (0, its max activation]."""
    quantiles: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    """Quantiles of each feature's non-zero activations."""
    logit_tokens: int = 10
    """Top positive and negative tokens of each feature's logit effect."""
    neighbours: int = 10
    """Nearest features by decoder cosine."""
    device: str = "auto"
    """`auto` (a GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`."""

    def __post_init__(self) -> None:
        require(self.max_tokens is None or self.max_tokens > 0, "max_tokens", "must be positive or null")
        for name in ("batch_size", "top_n", "bands", "samples_per_band", "histogram_bins",
                     "logit_tokens", "neighbours"):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(self.context_before >= 0 and self.context_after >= 0, "context_before",
                "context_before and context_after must be non-negative")
        require(all(0 < q < 1 for q in self.quantiles), "quantiles", "every quantile must be in (0, 1)")
