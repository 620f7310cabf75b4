"""All rank logic in one place: who am I, how many are we, wait for everyone.

Backed by Accelerate's `PartialState`, so `torchrun` and `accelerate launch` both work (gloo on the
CPU, NCCL on GPUs). Outside a distributed launch every call is a cheap no-op for one process.
Nothing else in the package talks to `torch.distributed` directly.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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

    state = PartialState(cpu=cpu)
    atexit.register(_end_process_group)
    return state


def _end_process_group() -> None:
    """Destroy the process group before the interpreter exits (registered when it starts). Left to
    teardown, gloo's threads were once destroyed while still joinable: "terminate called without an
    active exception", SIGABRT, and a launch that had done all its work reported as failed."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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


def all_reduce_mean_(tensors: list[torch.Tensor], group: Any = None) -> None:
    """Average every tensor over ranks in place, through ONE flattened buffer (no-op in one process).

    One collective per call however many tensors: the trainer passes every SAE's gradients plus the
    step's small statistics, so a step costs one all-reduce. `group`: a process group of a
    `LatentMesh` (default: every rank).
    """
    if not _active() or not tensors or _group_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])  # [sum of numels]
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
    flat /= _group_size(group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_gather_rows(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's `[rows, ...]` tensor (same shape on all ranks) in rank order
    (over `group`'s ranks when given)."""
    if not _active() or _group_size(group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(_group_size(group))]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def _group_size(group: Any) -> int:
    if not _active():
        return 1
    return int(torch.distributed.get_world_size(group))


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's JSON-able object, in rank order (a one-element list in one process)."""
    if not _active():
        return [obj]
    gathered: list[object] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


@dataclass(frozen=True)
class LatentMesh:
    """The 2-D process mesh of latent-sharded training: `replicas` (data parallel) x `shards`.

    Rank r holds latent shard r % shards of replica r // shards: the shards of one replica are
    adjacent ranks (on a GPU cluster, one node's fast interconnect), read the same batch and
    exchange top-k candidates and partial reconstructions every step; the replicas read different
    batches and average the gradients of the shard they hold, as data parallelism does.
    """

    shards: int
    """Processes that split one SAE's latents (the latent group's size)."""
    shard: int
    """Which slice of the latents this rank holds."""
    replicas: int
    """Data-parallel groups (world size / shards)."""
    replica: int
    """Which batch partition this rank reads."""
    latent_group: Any = None
    """The process group of this rank's replica (None in one process)."""
    data_group: Any = None
    """The process group of the ranks holding this rank's shard (None in one process)."""

    def gather_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """[shards, *tensor.shape]: every shard's tensor of this replica, in shard order."""
        if self.shards == 1:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(self.shards)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=self.latent_group)
        return torch.stack(parts)

    def sum_over_shards_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over this replica's shards, in place."""
        if self.shards > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM,
                                         group=self.latent_group)
        return tensor

    def min_over_all_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Minimum over every rank of the mesh, in place."""
        if _active():
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return tensor

    def mean_over_replicas_(self, tensors: list[torch.Tensor]) -> None:
        """Average over the ranks holding this shard (one flattened all-reduce)."""
        if self.replicas > 1:
            all_reduce_mean_(tensors, self.data_group)


def latent_mesh(shards: int) -> LatentMesh:
    """Build the mesh (collective: every rank calls it, creating every group in the same order)."""
    world = torch.distributed.get_world_size() if _active() else 1
    rank = torch.distributed.get_rank() if _active() else 0
    if shards < 1 or world % shards:
        raise ValueError(f"train.latent_shards={shards} does not divide the {world} processes; "
                         "launch a multiple of it")
    replicas = world // shards
    latent_group = data_group = None
    if world > 1:
        for replica in range(replicas):
            group = torch.distributed.new_group([replica * shards + s for s in range(shards)])
            if replica == rank // shards:
                latent_group = group
        for shard in range(shards):
            group = torch.distributed.new_group([r * shards + shard for r in range(replicas)])
            if shard == rank % shards:
                data_group = group
    return LatentMesh(shards, rank % shards, replicas, rank // shards, latent_group, data_group)


def gather_rows(tensor: torch.Tensor, dst: int) -> torch.Tensor | None:
    """Every rank's `[rows, ...]` tensor (same shape on all ranks) concatenated in rank order on
    rank `dst`, None on the others (the tensor itself in one process). A collective: every rank
    calls it, in the same order, whether or not it is `dst`."""
    if not _active():
        return tensor
    mine = tensor.contiguous()
    parts = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())] \
        if torch.distributed.get_rank() == dst else None
    torch.distributed.gather(mine, parts, dst=dst)
    return torch.cat(parts) if parts is not None else None


def gather_objects(obj: object, dst: int = 0) -> list[object] | None:
    """Every rank's picklable object in rank order on rank `dst`, None elsewhere (collective)."""
    if not _active():
        return [obj]
    gathered: list[object] | None = [None] * torch.distributed.get_world_size() \
        if torch.distributed.get_rank() == dst else None
    torch.distributed.gather_object(obj, gathered, dst=dst)
    return gathered
