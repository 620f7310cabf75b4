"""This machine's limits for an SAE's shapes, measured where the benchmarks need a ratio."""

from __future__ import annotations

import statistics
import time

import torch


def matmul_seconds(batch: int, d_in: int, d_sae: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Median time of one bare [batch, d_in] @ [d_in, d_sae] matmul (the encoder's forward), into
    an output allocated once: the machine's limit for that product. (A fresh output per call adds
    the page faults of a new [batch, d_sae] allocation: measured 391 ms against 317 ms for
    [4096 x 576] @ [576 x 9216] float32 on 2 cores. Code that allocates afresh each step pays that
    on top of the limit.)"""
    x, w = torch.randn(batch, d_in, dtype=dtype), torch.randn(d_in, d_sae, dtype=dtype)
    out = torch.mm(x, w)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(x, w, out=out)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
