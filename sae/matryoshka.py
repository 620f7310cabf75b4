"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

Latents are ordered: each prefix 0..m of the dictionary (m in `matryoshka_prefixes`, ascending,
the last d_sae) must reconstruct x on its own. The selection is BatchTopK's over all latents; prefix
m keeps the selected latents with index < m (plus b_dec), as in the paper (SAELens instead re-runs
BatchTopK inside each prefix). Loss = the MEAN over prefixes of their mse, + AuxK. The paper sums;
the mean differs by a constant factor that Adam ignores, and keeps `loss` on the scale of one mse,
so the learning rate, the AuxK coefficient and the logged loss mean what they mean for the other
architectures. `mse` is the full dictionary's. Inference and the saved form are BatchTopK's.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from saeworks.sae.base import mse_per_row
from saeworks.sae.batchtopk import BatchTopKSAE
from saeworks.sae.config import SAEConfig
from saeworks.sae.configio import require
from saeworks.sae.sparse import sparse_decode


def matryoshka_prefixes(requested: list[int] | None, d_sae: int) -> list[int]:
    """The nested sizes: `requested`, or d_sae/16, d_sae/4, d_sae when None (validated)."""
    prefixes = requested or sorted({max(1, d_sae // 16), max(1, d_sae // 4), d_sae})
    require(all(a < b for a, b in pairwise(prefixes)) and prefixes[0] > 0,
            "matryoshka_prefixes", f"must be positive and strictly ascending, got {prefixes}")
    require(prefixes[-1] == d_sae, "matryoshka_prefixes",
            f"the last prefix must be d_sae={d_sae}, got {prefixes[-1]}")
    return list(prefixes)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK whose nested prefixes each reconstruct the input."""

    architecture = "matryoshka_batchtopk"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.prefixes = matryoshka_prefixes(cfg.matryoshka_prefixes, self.d_sae)

    def reconstruction(self, x: torch.Tensor, indices: torch.Tensor,
                       values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inner = [mse_per_row(x, sparse_decode(indices, values * (indices < m), self.W_dec) + self.b_dec)
                 for m in self.prefixes[:-1]]
        x_hat, mse, _ = super().reconstruction(x, indices, values)
        return x_hat, mse, torch.stack([*inner, mse]).mean()
