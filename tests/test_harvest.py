"""The harvester end to end: stored rows are the model's activations, kills resume exactly,
two processes write what one writes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from saeworks.activations.store import ActivationStore, StoreError
from saeworks.cli import main
from tests.helpers import DEMO_CONFIG, REPO, run_cli, shards_printed, small_harvest_overrides

HOOKS = ["blocks.2.hook_resid_post", "blocks.3.mlp.hook_post"]


def read_store(path: Path) -> dict[str, np.ndarray]:
    """Every array of a store, for whole-store comparisons."""
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][:]) for name in [*HOOKS, "token_ids", "window", "position"]}


def assert_same_store(a: Path, b: Path) -> None:
    arrays_a, arrays_b = read_store(a), read_store(b)
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process harvest that the other tests compare against."""
    run_dir = tmp_path_factory.mktemp("reference")
    assert main(["harvest", str(DEMO_CONFIG), *small_harvest_overrides(run_dir)]) == 0
    return run_dir / "activations.zarr"


def test_rows_equal_a_direct_forward(reference_store: Path, embedded_model) -> None:  # type: ignore[no-untyped-def]
    """Row i holds the activation a plain HF forward of its window gives at its position."""
    store = ActivationStore.open(str(reference_store))
    assert store.complete and store.n_tokens == 16 * 64
    token_ids = np.asarray(store.array("token_ids")[:]).reshape(16, 64)
    assert (token_ids[:, 0] == 1).all()  # every window opens with BOS
    assert store.attrs["excluded"] == {"first_positions": 2, "token_ids": [0, 1, 2]}
    with torch.no_grad():
        out = embedded_model(torch.from_numpy(token_ids).long(), output_hidden_states=True)
    expected_resid = out.hidden_states[3].reshape(-1, 576)  # blocks.2 output == hidden_states[3]
    stored_resid = store.read_rows("blocks.2.hook_resid_post", 0, store.n_tokens).float()
    torch.testing.assert_close(stored_resid, expected_resid.half().float(), rtol=0, atol=0)
    for row in (0, 1, 65, 700, store.n_tokens - 1):
        window, position = divmod(row, 64)
        assert int(store.array("window")[row]) == window
        assert int(store.array("position")[row]) == position
        assert int(store.array("token_ids")[row]) == token_ids[window, position]
    mlp = store.read_rows("blocks.3.mlp.hook_post", 0, store.n_tokens)
    assert mlp.shape == (store.n_tokens, 1536) and mlp.dtype == torch.float16


def test_rerun_of_a_complete_store_changes_nothing(reference_store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "activations.zarr"
    shutil.copytree(reference_store, copy)
    assert main(["harvest", str(DEMO_CONFIG), *small_harvest_overrides(tmp_path)]) == 0
    assert_same_store(reference_store, copy)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_store(tmp_path: Path) -> None:
    """Kill -9 after a known number of shards; rerunning ends with exactly the rows of an
    uninterrupted harvest with the same config. Batch size 1 (slow enough for the kill to land
    mid-harvest) on both sides: a CPU's forward need not be batch-size invariant (one float16 ulp
    in 0.4% of the elements between batch 1 and 4 on a CPU without AMX), so like is compared with like."""
    uninterrupted = tmp_path / "uninterrupted"
    assert main(["harvest", str(DEMO_CONFIG),
                 *small_harvest_overrides(uninterrupted, **{"harvest.batch_size": 1})]) == 0
    overrides = small_harvest_overrides(tmp_path, **{"harvest.batch_size": 1})
    command = [sys.executable, "-m", "saeworks", "harvest", str(DEMO_CONFIG), *overrides]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flags = tmp_path / "activations.zarr" / "shard_done" / "c"
    deadline = time.monotonic() + 300
    while len(list(flags.glob("*"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed = ActivationStore.open(str(tmp_path / "activations.zarr"))
    done = int(killed.shards_done().sum())
    assert 3 <= done < killed.geometry.n_shards, "the kill must land mid-harvest"
    assert not killed.complete
    with pytest.raises(StoreError, match="incomplete"):
        killed.require_complete()

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rewritten = shards_printed(resumed.stdout)["rank 0/1"]
    assert len(rewritten) == killed.geometry.n_shards - done  # finished shards are not redone
    assert ActivationStore.open(str(tmp_path / "activations.zarr")).complete
    assert_same_store(uninterrupted / "activations.zarr", tmp_path / "activations.zarr")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_harvest_writes_the_single_process_rows(reference_store: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo): disjoint shards per rank, the same store as 1 process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = run_cli([str(DEMO_CONFIG), *small_harvest_overrides(tmp_path)], launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    by_rank = {rank: set(shards) for rank, shards in shards_printed(result.stdout).items()}
    assert set(by_rank) == {"rank 0/2", "rank 1/2"}
    n_shards = ActivationStore.open(str(reference_store)).geometry.n_shards
    assert by_rank["rank 0/2"].isdisjoint(by_rank["rank 1/2"])
    assert by_rank["rank 0/2"] | by_rank["rank 1/2"] == set(range(n_shards))
    assert by_rank["rank 0/2"] == set(range(0, n_shards, 2))
    assert_same_store(reference_store, tmp_path / "activations.zarr")


def test_dataset_shorter_than_the_budget_is_trimmed(tmp_path: Path) -> None:
    data = tmp_path / "tiny.jsonl"
    data.write_text('{"text": "' + "The quick brown fox jumps over the lazy dog. " * 40 + '"}\n')
    overrides = small_harvest_overrides(tmp_path, **{"data.path": data, "harvest.max_tokens": 100_000})
    assert main(["harvest", str(DEMO_CONFIG), *overrides]) == 0
    store = ActivationStore.open(str(tmp_path / "activations.zarr"))
    assert store.complete
    assert store.n_tokens == store.array("token_ids").shape[0] == 6 * 64  # 401 tokens -> 6 windows
    assert store.array(HOOKS[0]).shape == (6 * 64, 576)


def test_bfloat16_store_round_trips(reference_store: Path, tmp_path: Path) -> None:
    """bfloat16 is stored as raw 16 bits and comes back as the same activations as float16."""
    overrides = small_harvest_overrides(tmp_path, **{"harvest.store_dtype": "bfloat16",
                                                     "harvest.max_tokens": 128})
    assert main(["harvest", str(DEMO_CONFIG), *overrides]) == 0
    store = ActivationStore.open(str(tmp_path / "activations.zarr"))
    assert store.array(HOOKS[0]).dtype == np.uint16 and store.array(HOOKS[0]).attrs["dtype"] == "bfloat16"
    rows = store.read_rows(HOOKS[0], 0, 128)
    assert rows.dtype == torch.bfloat16
    float16_rows = ActivationStore.open(str(reference_store)).read_rows(HOOKS[0], 0, 128).float()
    torch.testing.assert_close(rows.float(), float16_rows, rtol=1 / 128, atol=1e-2)
