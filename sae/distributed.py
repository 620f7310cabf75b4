"""All rank logic in one place: who am I, how many are we, wait for everyone.

Backed by Accelerate's `PartialState`, so `torchrun` and `accelerate launch` both work (gloo on the
CPU, NCCL on GPUs). Outside a distributed launch every call is a cheap no-op for one process.
Nothing else in the package talks to `torch.distributed` directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes shared metadata, logs and final artifacts."""
        return self.rank == 0


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@lru_cache(maxsize=1)
def _state(cpu: bool):  # type: ignore[no-untyped-def]
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def rank_info(device: str = "auto") -> RankInfo:
    """Start (once) the process group if launched with several processes and describe this rank.

    `device` is the config value: "auto" takes this rank's GPU when there is one, else the CPU.
    """
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if not _launched_distributed():
        chosen = torch.device("cpu") if cpu else _resolve_single(device)
        return RankInfo(rank=0, world_size=1, local_rank=0, device=chosen)
    state = _state(cpu)
    chosen = torch.device("cpu") if cpu else state.device
    return RankInfo(state.process_index, state.num_processes, state.local_process_index, chosen)


def _resolve_single(device: str) -> torch.device:
    return torch.device("cuda" if device == "auto" else device)


def barrier() -> None:
    """Wait until every rank reaches this point (no-op in one process)."""
    if _launched_distributed() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place and return it (identity in one process)."""
    if _launched_distributed() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def _active() -> bool:
    return _launched_distributed() and torch.distributed.is_initialized()


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average every tensor over ranks in place, through ONE flattened buffer (no-op in one process).

    One collective per call however many tensors: the trainer passes every SAE's gradients plus the
    step's small statistics, so a step costs one all-reduce.
    """
    if not _active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])  # [sum of numels]
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `[rows, ...]` tensor (same shape on all ranks) in rank order."""
    if not _active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's JSON-able object, in rank order (a one-element list in one process)."""
    if not _active():
        return [obj]
    gathered: list[object] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
