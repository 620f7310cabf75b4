"""`accelerate launch --config_file launch/accelerate_cpu.yaml`: two CPU processes in one gloo group
that harvest the store one process writes and train the SAE one process trains on the same batches.

The config's `distributed_type: MULTI_GPU` is accelerate's torchrun launcher, which starts the
processes whatever the device; saeworks then forms a gloo group on the CPU. accelerate's own CPU
launcher (`--cpu`, or `distributed_type: MULTI_CPU`) starts one process unless run under mpirun,
and the first test checks that the config does not fall into it. The SLURM script goes through the
same launcher; benchmarks/launch_check.sh runs it on a local one-node Slurm.

Run directly as a script, this file is the probe that accelerate starts: each rank records what it
saw (its environment, the group's backend, an all-reduce) in OUT/rank{RANK}.json.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from saeworks.activations.config import ReaderConfig
from saeworks.activations.reader import ActivationReader
from saeworks.activations.store import ActivationStore
from saeworks.cli import main
from tests.helpers import DEMO_CONFIG, REPO, shards_printed, small_harvest_overrides
from tests.train_helpers import HOOK, Concatenated, config, make_store, sae_tensors, train_overrides

ACCELERATE = Path(sys.executable).parent / "accelerate"  # the console script of this environment
CONFIG = REPO / "launch" / "accelerate_cpu.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.skipif(not ACCELERATE.is_file(), reason=f"no `accelerate` command next to {sys.executable}"
                       " (accelerate is a dependency: pip install -e . puts it there)"),
]


def accelerate_launch(*args: str) -> subprocess.CompletedProcess:
    command = [str(ACCELERATE), "launch", "--config_file", str(CONFIG), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def probe(out: Path) -> None:
    """One launched rank: what saeworks' rank logic makes of this process, and one all-reduce; at
    exit, after saeworks' own exit handler (handlers run last registered first), whether the group
    is still up."""
    from saeworks.sae.distributed import all_reduce_sum, rank_info

    atexit.register(lambda: (out / f"exit{os.environ['RANK']}.json").write_text(
        json.dumps({"group_at_exit": torch.distributed.is_initialized()})))
    info = rank_info("cpu")
    total = all_reduce_sum(torch.tensor([float(info.rank + 1)]))
    seen = {"pid": os.getpid(), "rank": info.rank, "world_size": info.world_size,
            "device": str(info.device), "group": torch.distributed.is_initialized(),
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "all_reduce_sum_of_rank_plus_1": total.item(),
            "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}}
    (out / f"rank{info.rank}.json").write_text(json.dumps(seen))


def test_the_config_starts_two_cpu_processes_in_one_gloo_group(tmp_path: Path) -> None:
    result = accelerate_launch(__file__, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    seen = {int(p.stem[4:]): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    assert sorted(seen) == [0, 1], result.stderr[-3000:]
    assert seen[0]["pid"] != seen[1]["pid"]
    for rank, rank_seen in seen.items():
        assert rank_seen["env"]["RANK"] == str(rank) and rank_seen["env"]["LOCAL_RANK"] == str(rank)
        assert rank_seen["env"]["WORLD_SIZE"] == "2" and rank_seen["world_size"] == 2
        assert rank_seen["group"] and rank_seen["backend"] == "gloo" and rank_seen["device"] == "cpu"
        assert rank_seen["all_reduce_sum_of_rank_plus_1"] == 3.0  # 1 + 2: both ranks took part
    assert seen[0]["env"]["MASTER_PORT"] == seen[1]["env"]["MASTER_PORT"] != "0"  # a free port, chosen once
    for rank in (0, 1):  # each rank destroyed its group before exiting
        assert json.loads((tmp_path / f"exit{rank}.json").read_text()) == {"group_at_exit": False}


def test_two_process_harvest_writes_the_one_process_store(tmp_path: Path) -> None:
    two, one = tmp_path / "two", tmp_path / "one"
    result = accelerate_launch("-m", "saeworks.activations", str(DEMO_CONFIG), *small_harvest_overrides(two))
    assert result.returncode == 0, result.stderr[-3000:]
    assert shards_printed(result.stdout) == {"rank 0/2": [0, 2], "rank 1/2": [1, 3]}  # 4 shards, split
    assert main(["harvest", str(DEMO_CONFIG), *small_harvest_overrides(one)]) == 0
    assert main(["verify", str(two / "activations.zarr")]) == 0

    a, b = (zarr.open_group(str(d / "activations.zarr"), mode="r") for d in (one, two))
    arrays_a, arrays_b = dict(a.arrays()), dict(b.arrays())
    assert sorted(arrays_a) == sorted(arrays_b)
    assert len(arrays_a) == 6  # 2 hooks, token_ids, window, position, shard_done
    for name, array in arrays_a.items():
        np.testing.assert_array_equal(np.asarray(array[:]), np.asarray(arrays_b[name][:]), err_msg=name)
    assert dict(a.attrs) == dict(b.attrs)  # identity, chunk checksums, n_tokens_complete, complete
    assert a.attrs["complete"] and a.attrs["n_tokens_complete"] == 16 * 64


def test_two_process_training_matches_one_process_on_the_same_global_batches(tmp_path: Path) -> None:
    """As tests/test_train_distributed.py, through the CLI that accelerate starts: the one-process
    run reads rank 0's and rank 1's reader batches side by side, i.e. the same global batches."""
    steps, batch, name = 20, 256, "topk-k8-64"
    recipe = {"train.saes": "[{k: 8, d_sae: 64}]", "train.total_tokens": steps * batch,
              "train.init_sample_rows": batch}
    store = tmp_path / "store.zarr"
    make_store(store)
    two, one = tmp_path / "two", tmp_path / "one"
    result = accelerate_launch("-m", "saeworks.train", *train_overrides(two, store, **recipe))
    assert result.returncode == 0, result.stderr[-3000:]

    from saeworks.api import train_saes

    readers = [ActivationReader(ActivationStore.open(str(store)), HOOK,
                                ReaderConfig(batch_size=batch // 2, buffer_chunks=4), rank, 2)
               for rank in (0, 1)]
    train_saes(config(one, store, **recipe), source=Concatenated(readers))
    got, want = sae_tensors(two / "saes" / name), sae_tensors(one / "saes" / name)
    for key in want:  # float32 summation order alone differs (see tests/test_train_distributed.py)
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
    state = json.loads(next((two / "checkpoints").glob("*/state.json")).read_text())
    assert state["fingerprint"]["world_size"] == 2 and len(state["ranks"]) == 2
    assert state["tokens"] == steps * batch


if __name__ == "__main__":
    probe(Path(sys.argv[1]))
