"""Checkpoints: everything a resumed run needs to continue exactly, written atomically.

    <run_dir>/checkpoints/tokens-000000409600/
        state.safetensors   SAE weights (unfolded, as trained), Adam moments and steps,
                            dead-latent counters
        state.json          format, step, tokens, input scale, the config fingerprint, and per
                            rank its batch-source position and its torch/numpy/python RNG states

With latent sharding (train.latent_shards = S > 1) the tensors are sharded: each rank of the first
replica writes its own `state-shard-<s>-of-<S>.safetensors` (its latents' weights, Adam moments
and dead counters, and the replicated b_dec) into the scratch directory rank 0 made, and rank 0
publishes the directory once every shard is in it; a resumed rank reads only its shard's file.

A checkpoint is written into a hidden scratch directory and renamed into place (sae/atomic.py), so
a directory named `tokens-*` is always complete; older ones are removed after the new one is in
place, and scratch left by a killed writer is removed by the next one.
Resuming compares the fingerprint (everything that shapes the trajectory: SAEs, data, batch size,
world size, recipe) and refuses a checkpoint made under another config, listing the differences.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from saeworks.sae.atomic import (
    atomic_directory,
    clean_directory,
    publish_directory,
    remove_directory,
    scratch_path,
)
from saeworks.sae.configio import to_dict
from saeworks.sae.distributed import LatentMesh, all_gather_objects, barrier
from saeworks.train.config import TrainConfig
from saeworks.train.data import SourceInfo
from saeworks.train.errors import CheckpointError
from saeworks.train.plan import TrainPlan

FORMAT_VERSION = 1
PREFIX = "tokens-"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
FREE_FIELDS = ("resume", "log_every_steps", "wandb", "wandb_mode", "wandb_project", "device",
               "checkpoint_every_tokens", "stop_after_tokens", "store", "saes", "reader.prefetch",
               "reader.batch_size")
"""Fields that may change between a run and its resumption: they do not change the trajectory
(`store` is compared by content, `saes` resolved, the reader's batch size is derived)."""


class Checkpoint(NamedTuple):
    """A checkpoint read back from disk."""

    path: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint with the most tokens under `root`, if any."""
    found = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir()) if root.is_dir() else []
    return found[-1] if found else None


def write_checkpoint(root: Path, tokens: int, tensors: dict[str, torch.Tensor],
                     state: dict[str, Any]) -> Path:
    """Write atomically under `root` (rank 0 only); remove older checkpoints once it is in place."""
    root.mkdir(parents=True, exist_ok=True)
    clean_directory(root)  # scratch of checkpoints whose writer was killed
    final = root / f"{PREFIX}{tokens:012d}"
    with atomic_directory(final) as scratch:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(scratch / STATE_TENSORS))
        (scratch / STATE_JSON).write_text(json.dumps({"format": FORMAT_VERSION, **state}))
    for older in root.glob(f"{PREFIX}*"):
        if older.name < final.name:
            remove_directory(older)
    return final


def shard_file(shard: int, shards: int) -> str:
    """The tensors file of one latent shard."""
    return f"state-shard-{shard:03d}-of-{shards:03d}.safetensors"


def write_sharded_checkpoint(root: Path, tokens: int, tensors: dict[str, torch.Tensor],
                             state: dict[str, Any] | None, mesh: LatentMesh) -> Path:
    """Collective over every rank: the first replica's shards write their tensors into one scratch
    directory that rank 0 made; rank 0 (`state` given only there) adds state.json and publishes it.
    A failure on any rank is raised on every rank and nothing is published."""
    final = root / f"{PREFIX}{tokens:012d}"
    scratch: Path | None = None
    problem = None
    if state is not None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            clean_directory(root)
            scratch = scratch_path(final)
            scratch.mkdir(mode=0o700)
        except OSError as err:
            problem = f"rank 0 could not make a scratch directory under {root}: {err}"
    shared = all_gather_objects([str(scratch) if scratch else None, problem])[0]
    assert isinstance(shared, list)
    where, problem = shared
    if problem is None and mesh.replica == 0:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      str(Path(where) / shard_file(mesh.shard, mesh.shards)))
        except OSError as err:
            problem = f"shard {mesh.shard} could not write its tensors into {where}: {err}"
    problems = [p for p in all_gather_objects(problem) if p]
    try:
        if problems:
            raise CheckpointError(f"checkpoint {final.name} was not written: {'; '.join(map(str, problems))}")
        if state is not None and scratch is not None:
            (scratch / STATE_JSON).write_text(json.dumps({"format": FORMAT_VERSION, **state,
                                                          "latent_shards": mesh.shards}))
            publish_directory(scratch, final)
            for older in root.glob(f"{PREFIX}*"):
                if older.name < final.name:
                    remove_directory(older)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    barrier()
    return final


def read_checkpoint(path: Path, shard: int = 0) -> Checkpoint:
    """Read a checkpoint; of a latent-sharded one, the tensors of `shard`."""
    state = json.loads((path / STATE_JSON).read_text())
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format')!r}; this "
                                      f"version reads format {FORMAT_VERSION}")
    shards = int(state.get("latent_shards", 1))
    tensors = path / (STATE_TENSORS if shards == 1 else shard_file(shard, shards))
    if not tensors.is_file():
        raise CheckpointError(f"checkpoint {path} has no {tensors.name}: it was written with "
                              f"train.latent_shards={shards}; resume with that many shards")
    return Checkpoint(path, load_file(str(tensors)), state)


def fingerprint(cfg: TrainConfig, plan: TrainPlan, infos: Sequence[SourceInfo]) -> dict[str, Any]:
    """Flat `{dotted field: value}` of everything a resumed run must share with the saved one
    (`infos`: the data of each hook trained)."""
    flat = _flatten({"train": to_dict(cfg)})
    free = tuple(f"train.{name}" for name in FREE_FIELDS)
    flat = {key: value for key, value in flat.items() if not key.startswith(free)}
    flat.update(_flatten({"train.saes": [to_dict(sae) for sae in plan.saes]}))
    data = infos[0].identity if len(infos) == 1 else {"hooks": [info.identity for info in infos]}
    flat.update(_flatten({"data": data, "world_size": plan.world_size}))
    return dict(json.loads(json.dumps(flat)))  # as it reads back from JSON (tuples -> lists)


def check_fingerprint(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint made under another config, listing every difference."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: {saved.get(k, '<unset>')!r} in the checkpoint, {current.get(k, '<unset>')!r} now"
             for k in keys if saved.get(k, "<unset>") != current.get(k, "<unset>")]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written under another config ({'; '.join(diffs)}); restore "
            "those values, use another run_dir, or delete the checkpoints to start over")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(tree, list | tuple) and any(isinstance(v, dict) for v in tree):
        out = {}
        for i, value in enumerate(tree):
            out.update(_flatten(value, f"{prefix}[{i}]"))
        return out | {f"{prefix}.count": len(tree)}
    return {prefix: tree}


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch (and CUDA), numpy and python RNG states, JSON-able."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [kind, np.asarray(keys).tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)
