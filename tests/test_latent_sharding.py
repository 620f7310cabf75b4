"""Latent-sharded training (train.latent_shards): each process holds a slice of every SAE's latents.

Identities checked, with real gloo processes started by torchrun:
- one step: a shard's loss, mse, AuxK loss, l0, gradients (after the trainer's reductions) and
  encodings equal the slices of one process's full SAE, for TopK and BatchTopK (float32, 1e-5);
- training: 2 processes, latents split 2 ways and both reading the same batches, give the weights
  of one process training the whole SAEs on those batches (TopK and BatchTopK, AuxK active);
- a run killed (SIGKILL) mid-step after sharded checkpoints (one file per shard) and resumed in
  new processes ends with those same weights;
- 4 processes as a 2 x 2 mesh (data x latent) give the weights of one process reading both
  replicas' batches side by side (TopK: it selects per row, so splitting the batch changes
  nothing; AuxK off, as in data-parallel training's own test).

Run directly as a script, this file is the worker that torchrun starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from saeworks.activations.config import ReaderConfig
from saeworks.activations.reader import ActivationReader
from saeworks.activations.store import ActivationStore
from saeworks.sae.configio import ConfigError
from tests.train_helpers import (
    HOOK,
    REPO,
    TORCHRUN,
    Concatenated,
    Recording,
    config,
    make_store,
    sae_tensors,
)

STEPS, BATCH = 24, 256
CHECKPOINT_STEPS, KILL_AT = 4, 14
"""The killed run checkpoints at steps 4, 8 and 12 and dies reading the batch of step 14."""
SAES = "[{k: 4, d_sae: 256}, {architecture: batchtopk, k: 4, d_sae: 256}]"
NAMES = ("topk-k4-256", "batchtopk-k4-256")
RECIPE = {"train.saes": SAES, "train.total_tokens": STEPS * BATCH, "train.init_sample_rows": BATCH,
          "train.dead_after_tokens": BATCH, "train.log_every_steps": 4,
          "train.b_dec_init": "geometric_median"}
"""AuxK needs dead latents: here a latent silent for one step is dead (dozens are, each step)."""


def data_parallel_recipe(saes: str) -> dict[str, object]:
    """Several replicas: AuxK off, since its loss divides by the variance of each replica's own
    batch, which no single-process batch reproduces (as in tests/test_train_distributed.py)."""
    return {"train.saes": saes, "train.dead_after_tokens": 10**9}


def reader(store: Path, rank: int = 0, world: int = 1) -> ActivationReader:
    return ActivationReader(ActivationStore.open(str(store)), HOOK,
                            ReaderConfig(batch_size=BATCH // world, buffer_chunks=4), rank, world)


# ---------------------------------------------------------------------------------------------
# The worker (torchrun runs this file)


def check_one_step(out: Path) -> None:
    """A shard's step equals the slice of one process's step on the whole SAE."""
    from saeworks.sae.base import TrainContext
    from saeworks.sae.config import SAEConfig
    from saeworks.sae.distributed import all_reduce_mean_, latent_mesh, rank_info
    from saeworks.sae.registry import create_sae
    from saeworks.sae.sharded import (
        SHARDED_KEYS,
        clip_sharded_grad_norm_,
        shard_of,
        shard_slice,
        sharded_encode,
        sharded_training_forward,
    )

    rank_info("cpu")  # joins the gloo group torchrun described
    mesh = latent_mesh(2)
    report = {}
    for architecture in ("topk", "batchtopk"):
        torch.manual_seed(0)
        cfg = SAEConfig(architecture=architecture, k=6, d_sae=96, aux_k=5).resolved(24)
        full = create_sae(cfg)
        with torch.no_grad():
            full.b_dec.normal_()
            full.b_enc.normal_(std=0.1)
        x = torch.randn(64, 24) * 2 + 0.5
        dead = torch.zeros(96, dtype=torch.bool)
        dead[torch.randperm(96)[:20]] = True  # AuxK on, dead latents on both shards
        shard = shard_of(full, mesh)
        part = shard_slice(96, mesh)

        want = full.training_forward(x, TrainContext(0.0, dead))
        want.loss.backward()
        got = sharded_training_forward(shard, x, TrainContext(0.0, dead[part]), mesh)
        got.loss.backward()
        assert shard.b_dec.grad is not None and full.W_dec.grad is not None
        all_reduce_mean_([shard.b_dec.grad])  # the trainer's reduction of the replicated bias
        for name in ("loss", "mse", "aux", "l0"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)
        assert float(want.aux) > 0  # AuxK really ran
        torch.testing.assert_close(got.x_hat, want.x_hat, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.fired, want.fired[part])
        for key in SHARDED_KEYS:
            dim = 1 if key == "W_enc" else 0
            expected = getattr(full, key).grad.narrow(dim, part.start, part.stop - part.start)
            torch.testing.assert_close(getattr(shard, key).grad, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(shard.b_dec.grad, full.b_dec.grad, rtol=1e-5, atol=1e-6)
        if architecture == "batchtopk":
            torch.testing.assert_close(shard.threshold, full.threshold)
        torch.testing.assert_close(sharded_encode(shard, x, mesh), full.encode(x)[:, part])
        # clipping: the norm over the whole SAE
        torch.nn.utils.clip_grad_norm_(full.parameters(), 0.01)
        clip_sharded_grad_norm_(shard, 0.01, mesh)
        torch.testing.assert_close(shard.W_dec.grad, full.W_dec.grad[part], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(shard.b_dec.grad, full.b_dec.grad, rtol=1e-5, atol=1e-7)
        report[architecture] = {"aux": float(got.aux), "l0": float(got.l0)}
    (out / f"step-rank{mesh.shard}.json").write_text(json.dumps(report))


def train_worker(out: Path, store: Path, phase: str) -> None:
    """Train latent-sharded: `full` runs to the end; `kill` checkpoints every CHECKPOINT_STEPS and
    rank 0 is killed (SIGKILL) while reading batch KILL_AT; `resume` finishes what `kill` left."""
    from saeworks.api import train_saes

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    replicas = world // 2
    kill = (lambda: os.kill(os.getpid(), signal.SIGKILL)) if phase == "kill" and rank == 0 else None
    # the shards of a replica read alike
    source = Recording(reader(store, rank // 2, replicas), after=KILL_AT, action=kill)
    extra: dict[str, object] = {"train.latent_shards": 2}
    if phase != "full":
        extra["train.checkpoint_every_tokens"] = CHECKPOINT_STEPS * BATCH
    if phase == "resume":
        extra["train.resume"] = "true"
    result = train_saes(config(out, store, **RECIPE, **extra), source=source)
    assert phase != "kill", "rank 0 should have been killed"
    assert (result.world_size, result.rank) == (world, rank)
    np.save(out / f"rows-{phase}-rank{rank}.npy", torch.stack(source.rows).numpy())


# ---------------------------------------------------------------------------------------------
# The tests


def _torchrun(*args: str, processes: int = 2, killed: bool = False) -> None:
    launcher = [*TORCHRUN[:-1], str(processes)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, __file__, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    if killed:
        assert result.returncode != 0 and "Signal 9 (SIGKILL)" in result.stderr, result.stderr[-4000:]
    else:
        assert result.returncode == 0, result.stderr[-4000:]


def _one_process(run_dir: Path, store: Path, sources: list[ActivationReader], **extra: object) -> None:
    from saeworks.api import train_saes

    source = Concatenated(sources) if len(sources) > 1 else sources[0]
    train_saes(config(run_dir, store, **{**RECIPE, **extra}), source=source)


def _assert_same_saes(got_dir: Path, want_dir: Path, names: tuple[str, ...] = NAMES) -> None:
    for name in names:
        got, want = sae_tensors(got_dir / "saes" / name), sae_tensors(want_dir / "saes" / name)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=f"{name} {key}")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_latent_shards_equal_one_process_and_resume_exactly(tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    make_store(store)
    sharded, killed = tmp_path / "sharded", tmp_path / "killed"
    _torchrun("train", str(sharded), str(store), "full", "--step", str(tmp_path))
    _torchrun("train", str(killed), str(store), "kill", killed=True)
    # the kill left the checkpoint of step 12 complete, one file per shard, and nothing newer
    checkpoints = sorted((killed / "checkpoints").glob("tokens-*"))
    assert [c.name for c in checkpoints] == [f"tokens-{12 * BATCH:012d}"]
    files = sorted(p.name for p in checkpoints[0].iterdir())
    assert files == ["state-shard-000-of-002.safetensors", "state-shard-001-of-002.safetensors",
                     "state.json"]
    assert not (killed / "saes").exists() or not any((killed / "saes").iterdir())
    _torchrun("train", str(killed), str(store), "resume")
    one = tmp_path / "one"
    _one_process(one, store, [reader(store)])

    # one step: both shards saw the whole SAE's loss (l0 and AuxK over both shards)
    steps = [json.loads((tmp_path / f"step-rank{r}.json").read_text()) for r in (0, 1)]
    assert steps[0] == steps[1]
    # both shards read the same rows, every step
    rows = [np.load(sharded / f"rows-full-rank{r}.npy") for r in (0, 1)]
    assert rows[0].shape == (STEPS, BATCH)
    np.testing.assert_array_equal(rows[0], rows[1])
    # the saved SAEs are whole, ordinary SAEs equal to one process's
    for name in NAMES:
        cfg = json.loads((sharded / "saes" / name / "cfg.json").read_text())
        assert cfg["d_sae"] == 256
        assert sae_tensors(sharded / "saes" / name)["W_dec"].shape == (256, 32)
    _assert_same_saes(sharded, one)
    metrics = [json.loads(line) for line in (sharded / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any(row["aux"] > 0 for row in metrics)  # AuxK ran across the shards
    assert max(row["dead"] for row in metrics) > 0

    # killed and resumed in new processes, it ends with the same SAEs, having gone on from step 12
    _assert_same_saes(killed, one)
    resumed = np.load(killed / "rows-resume-rank0.npy")
    np.testing.assert_array_equal(resumed, rows[0][12:])


@pytest.mark.slow
@pytest.mark.distributed
def test_four_processes_as_two_replicas_of_two_shards_equal_one_process(tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    make_store(store)
    mesh = tmp_path / "mesh"
    topk = "[{k: 8, d_sae: 64}]"  # as data-parallel training's own test (tests/test_train_distributed.py)
    _torchrun("train", str(mesh), str(store), "full", "--data-parallel", topk, processes=4)
    one = tmp_path / "one"
    _one_process(one, store, [reader(store, 0, 2), reader(store, 1, 2)], **data_parallel_recipe(topk))
    rows = [np.load(mesh / f"rows-full-rank{r}.npy") for r in range(4)]
    np.testing.assert_array_equal(rows[0], rows[1])  # replica 0's two shards
    np.testing.assert_array_equal(rows[2], rows[3])  # replica 1's two shards
    assert not set(rows[0].ravel()) & set(rows[2].ravel())  # the replicas read different rows
    _assert_same_saes(mesh, one, ("topk-k8-64",))


def test_latent_shards_refuse_what_cannot_be_split(tmp_path: Path) -> None:
    from saeworks.train.data import SourceInfo
    from saeworks.train.plan import make_hooks_plan

    def plan(saes: str, shards: int, world: int = 2):  # type: ignore[no-untyped-def]
        cfg = config(tmp_path, tmp_path / "store", **{"train.saes": saes,
                                                      "train.latent_shards": shards}).train
        return make_hooks_plan(cfg, [SourceInfo(HOOK, 32, "the store", {}, {})], world)

    assert plan("[{k: 8, d_sae: 64}]", 2).local_batch == 256  # both shards read the whole batch
    assert plan("[{k: 8, d_sae: 64}]", 2, world=4).local_batch == 128
    with pytest.raises(ConfigError, match="architecture 'relu' cannot be latent-sharded"):
        plan("[{architecture: relu, d_sae: 64}]", 2)
    with pytest.raises(ConfigError, match="d_sae=60 does not divide into 8 latent shards"):
        plan("[{k: 4, d_sae: 60}]", 8, world=8)
    with pytest.raises(ConfigError, match="k=40 is more than the 32 latents"):
        plan("[{k: 40, d_sae: 64}]", 2)
    with pytest.raises(ConfigError, match="3 does not divide the 2 processes"):
        plan("[{k: 8, d_sae: 64}]", 3)
    with pytest.raises(ConfigError, match="latent_shards"):
        config(tmp_path, tmp_path / "store", **{"train.latent_shards": 0})


if __name__ == "__main__":
    target, store, phase = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    if "--step" in sys.argv:
        check_one_step(Path(sys.argv[sys.argv.index("--step") + 1]))
    if "--data-parallel" in sys.argv:
        RECIPE.update(data_parallel_recipe(sys.argv[sys.argv.index("--data-parallel") + 1]))
    train_worker(target, store, phase)
