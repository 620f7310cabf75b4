"""Learning-rate and sparsity-coefficient schedules: pure functions of the step, so that a resumed
run needs no scheduler state beyond the step count it restores."""

from __future__ import annotations

import math
from dataclasses import dataclass

from saeworks.sae.config import SAEConfig
from saeworks.sae.registry import architecture_class


@dataclass(frozen=True)
class Schedule:
    """Warm-up and decay, in steps (tokens // batch size)."""

    total_steps: int
    lr_warmup_steps: int
    lr_decay: str
    """none, linear or cosine: from the end of the warm-up to `lr_final_fraction` at total_steps."""
    lr_final_fraction: float
    sparsity_warmup_steps: int

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate for the update made at `step` (0-based)."""
        if step < self.lr_warmup_steps:
            return (step + 1) / self.lr_warmup_steps
        if self.lr_decay == "none":
            return 1.0
        span = max(1, self.total_steps - self.lr_warmup_steps)
        progress = min(1.0, (step - self.lr_warmup_steps) / span)  # 0 at the peak, -> 1 at the end
        shape = 1 - progress if self.lr_decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr_final_fraction + (1 - self.lr_final_fraction) * shape

    def sparsity_factor(self, step: int) -> float:
        """Multiplier of each SAE's L1/L0 coefficient at `step`: a linear ramp from 0 to 1."""
        if step >= self.sparsity_warmup_steps:
            return 1.0
        return (step + 1) / self.sparsity_warmup_steps


def default_lr(d_sae: int) -> float:
    """2e-4 / sqrt(d_sae / 2**14): Gao et al. 2024 (section 2.4) scaling, as EleutherAI's sparsify."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def sparsity_coefficient(cfg: SAEConfig) -> float:
    """The configured weight of an architecture's sparsity penalty before its warm-up (0 for the
    TopK family, which has none); each architecture names its field."""
    field = architecture_class(cfg.architecture).sparsity_coefficient_field
    return float(getattr(cfg, field)) if field else 0.0
