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


class AdamProbe:
    """One bare Adam step (torch.optim.Adam with fused=True: torch's fastest) over float32
    parameters of the given shapes, each holding a gradient: the machine's floor for updating every
    parameter once. It is memory bound (each element's parameter, gradient and two moments read,
    three written: 28 bytes), so where a fast matmul makes the product short, as bfloat16 on AMX or
    any GPU, an SAE's update alone can cost a large part of the product's time: a training step
    takes at least product + update. Call it to time one step."""

    def __init__(self, shapes: list[tuple[int, ...]], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.parameters = [torch.nn.Parameter(torch.randn(shape, device=self.device) * 0.01)
                           for shape in shapes]
        for parameter in self.parameters:
            parameter.grad = torch.randn_like(parameter) * 1e-3
        self.optimizer = torch.optim.Adam(self.parameters, lr=1e-4, fused=True)
        self.optimizer.step()  # the moments exist from here on, as in training after the first step

    @property
    def elements(self) -> int:
        """Parameters updated by one step."""
        return sum(p.numel() for p in self.parameters)

    def __call__(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        self.optimizer.step()
        synchronize(self.device)
        return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on a CPU, whose work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
