"""Data-parallel training: 2 processes (torchrun, gloo, CPU) give the weights of 1 process that
sees the same global batches, and the ranks read disjoint rows.

The 1-process run reads rank 0's and rank 1's reader batches (`ActivationReader(..., rank=r,
world_size=2)`) side by side, so its every batch is exactly the 2-process global batch, rows in
rank order; its initial sample (input scale, b_dec) is then the same rows in the same order too.
TopK selects per row, so splitting a batch does not change which latents are active; no latent is
dead in so few tokens, so AuxK (whose normaliser is a per-batch variance) stays off. Both top-k
paths: the dense float32 one, and the refined selection (forced on; every rank's every forward
counted), whose per-row certificate does not depend on the batch either.

Tolerance: the only difference is float32 summation order (two 128-row means averaged, against one
256-row mean), ~1e-7 relative per gradient; after 30 Adam steps the weights differ by at most
~2e-7 (measured), so
`atol=1e-5` (float32).

Run directly as a script, this file is the worker that torchrun starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from saeworks.activations.config import ReaderConfig
from saeworks.activations.reader import ActivationReader
from saeworks.activations.store import ActivationStore
from tests.train_helpers import HOOK, REPO, TORCHRUN, Concatenated, Recording, config, make_store, sae_tensors

STEPS, BATCH = 30, 256  # within the first epoch: each rank holds 31 batches of 128 rows
SAES = {"dense": ("topk-k8-64", "[{k: 8, d_sae: 64}]"),
        "refined": ("topk-k4-1024", "[{k: 4, d_sae: 1024}]")}
"""The SAE trained per selection path: the dense float32 top k, or the refined selection (a
bfloat16 product's candidates decided in float32, sae/refined_selection.py; it needs d_sae >= 128 k)."""


def recipe(path: str) -> dict[str, object]:
    return {"train.saes": SAES[path][1], "train.total_tokens": STEPS * BATCH, "train.init_sample_rows": BATCH}


class CountingSelections:
    """Counts the refined selection's calls in this process (each training forward makes one)."""

    def __init__(self) -> None:
        from saeworks.sae import refined_selection

        self.calls = 0
        self.select = refined_selection._select

        def counted(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return self.select(*args, **kwargs)  # type: ignore[arg-type]

        refined_selection._select = counted  # type: ignore[assignment]


def reader(store: Path, rank: int) -> ActivationReader:
    return ActivationReader(ActivationStore.open(str(store)), HOOK,
                            ReaderConfig(batch_size=BATCH // 2, buffer_chunks=4), rank, 2)


def worker(run_dir: Path, store: Path, path: str) -> None:
    """One torchrun rank: train with a reader that records the rows this rank consumed, and count
    its refined selections."""
    from saeworks.api import train_saes

    rank = int(os.environ["RANK"])
    source = Recording(reader(store, rank))
    selections = CountingSelections()
    result = train_saes(config(run_dir, store, **recipe(path)), source=source)
    assert result.world_size == 2 and result.rank == rank
    np.save(run_dir / f"rows-rank{rank}.npy", torch.stack(source.rows).numpy())  # [steps, 128]
    (run_dir / f"refined-rank{rank}.txt").write_text(str(selections.calls))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("path", ["dense", "refined"])
def test_two_processes_match_one_process_on_the_same_global_batches(tmp_path: Path, path: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from saeworks.api import train_saes

    selection = "on" if path == "refined" else "off"
    monkeypatch.setenv("SAEWORKS_REFINED_SELECTION", selection)
    store = tmp_path / "store.zarr"
    make_store(store)
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([*TORCHRUN, __file__, str(two), str(store), path], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    want_calls = STEPS if path == "refined" else 0  # one per training forward, on each rank
    assert [int((two / f"refined-rank{rank}.txt").read_text()) for rank in (0, 1)] == [want_calls] * 2

    one = tmp_path / "one"
    source = Recording(Concatenated([reader(store, 0), reader(store, 1)]))
    selections = CountingSelections()
    train_saes(config(one, store, **recipe(path)), source=source)
    assert selections.calls == want_calls

    rows = [np.load(two / f"rows-rank{rank}.npy") for rank in (0, 1)]  # [steps, 128] each
    assert rows[0].shape == rows[1].shape == (STEPS, BATCH // 2)
    assert not set(rows[0].ravel()) & set(rows[1].ravel())  # disjoint partitions
    one_rows = torch.stack(source.rows).numpy()  # [steps, 256]
    np.testing.assert_array_equal(one_rows, np.concatenate(rows, axis=1))  # same global batches
    assert len(set(one_rows.ravel())) == STEPS * BATCH

    name = SAES[path][0]
    got, want = sae_tensors(two / "saes" / name), sae_tensors(one / "saes" / name)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
    scales = [_input_scale(d / "saes" / name) for d in (one, two)]
    assert scales[0] == pytest.approx(scales[1], rel=1e-6)


def _input_scale(directory: Path) -> float:
    import json

    return float(json.loads((directory / "cfg.json").read_text())["saeworks"]["input_scale"])


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
