"""This machine's limits for an SAE's shapes, measured where the benchmarks need a ratio."""

from __future__ import annotations

import statistics
import time

import torch


def matmul_seconds(batch: int, d_in: int, d_sae: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Median time of one bare [batch, d_in] @ [d_in, d_sae] matmul (the encoder's forward)."""
    x, w = torch.randn(batch, d_in, dtype=dtype), torch.randn(d_in, d_sae, dtype=dtype)
    x @ w
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - start)
    return statistics.median(times)
