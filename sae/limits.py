"""This machine's limits for an SAE's shapes, measured where the benchmarks need a ratio."""

from __future__ import annotations

import time

import torch


class MatmulProbe:
    """One bare [batch, d_in] @ [d_in, d_sae] matmul (the encoder's forward) into an output
    allocated once: the machine's limit for that product. Call it to time one product. (A fresh
    output per call adds the page faults of a new [batch, d_sae] allocation: measured 391 ms against
    317 ms for [4096 x 576] @ [576 x 9216] float32 on 2 cores. Code that allocates afresh each step
    pays that on top of the limit.) A benchmark can call it between the steps it times, so that the
    limit is measured under the same conditions as the work (a shared VM's speed drifts by 30%
    within minutes). On a GPU the product is timed from a synchronised start to its completion.
    """

    def __init__(self, batch: int, d_in: int, d_sae: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.x = torch.randn(batch, d_in, dtype=dtype, device=self.device)
        self.w = torch.randn(d_in, d_sae, dtype=dtype, device=self.device)
        self.out = torch.mm(self.x, self.w)

    def __call__(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        torch.mm(self.x, self.w, out=self.out)
        synchronize(self.device)
        return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on a CPU, whose work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
