"""Training SAEs on several hooks at once (`train.hooks`), and spreading the hooks over ranks
(`train.distribute_hooks`).

One process, two hooks: each SAE is the SAE a run over its hook alone gives (same rows, same
shuffle, same initial weights, its own hook's input scale and b_dec), and the store is read once
per block for all hooks together.

Two processes (torchrun, gloo, CPU), three hooks, distribute_hooks: hook 0 and 2 train on rank 0,
hook 1 on rank 1 (3 is not a multiple of 2: no hang); the run is stopped half-way and resumed (the
checkpoint holds both ranks' SAEs), and every SAE equals the one of a single process that reads
the same global batches (both ranks' reader batches side by side, as in
tests/test_train_distributed.py). Then one hook on two ranks: rank 1 holds nothing, yet takes part
in every collective, and the SAE again equals one process's. Tolerance as in
test_train_distributed.py (float32 summation order only): `atol=1e-5`.

Run directly as a script, this file is the worker that torchrun starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from saeworks.activations.config import ReaderConfig
from saeworks.activations.multi_reader import HooksBatch, MultiHookReader
from saeworks.activations.reader import ActivationReader
from saeworks.activations.store import (
    ActivationStore,
    StoreError,
    StoreGeometry,
    create_store,
    finalize,
    write_shard,
)
from saeworks.sae.configio import ConfigError
from tests.train_helpers import (
    CONTEXT,
    D_IN,
    REPO,
    TORCHRUN,
    Concatenated,
    config,
    sae_tensors,
    synthetic_activations,
)

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]
WIDTHS = {HOOKS[0]: D_IN, HOOKS[1]: D_IN, HOOKS[2]: 16}
STEPS, BATCH = 20, 256
SWEEP = ["topk-k4-64", "jumprelu-l01-32"]  # two architectures: different parameter counts
RECIPE: dict[str, object] = {
    "train.saes": "[{k: 4, d_sae: 64}, {architecture: jumprelu, d_sae: 32, l0_coefficient: 1.0}]",
    "train.total_tokens": STEPS * BATCH, "train.init_sample_rows": BATCH, "train.log_every_steps": 5,
}


def make_hooks_store(path: Path, n_windows: int = 128) -> ActivationStore:
    """A float32 store of the three HOOKS (hook 2 narrower), each its own synthetic data at its own
    scale; rows at position 0 and token 0 excluded, as tests/train_helpers.make_store."""
    geometry = StoreGeometry.plan(n_windows, CONTEXT, chunk_tokens=256, chunks_per_shard=4)
    store = create_store(str(path), {"test": "hooks", "dataset": {"prepend_bos": True}}, geometry,
                         WIDTHS, "float32", "zstd",
                         {"model": "synthetic-model", "dataset": "synthetic-text",
                          "excluded": {"first_positions": 1, "token_ids": [0]}})
    values = {hook: synthetic_activations(geometry.n_tokens, seed=i)[:, :WIDTHS[hook]] * (i + 1)
              for i, hook in enumerate(HOOKS)}
    token_ids = np.random.default_rng(1).integers(1, 100, (n_windows, CONTEXT), dtype=np.int32)
    token_ids[:, 0] = 0
    for shard in range(geometry.n_shards):
        windows = geometry.shard_windows(shard)
        rows = slice(windows.start * CONTEXT, windows.stop * CONTEXT)
        write_shard(store, shard, {hook: v[rows] for hook, v in values.items()},
                    token_ids[windows.start:windows.stop])
    finalize(store, n_windows)
    return ActivationStore.open(str(path))


def hooks_list(hooks: list[str]) -> str:
    return "[" + ", ".join(hooks) + "]"


class CountingColumns:
    """Wraps a reader's array: records the row range of every read (each covers all its hooks)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.reads = inner, []  # type: ignore[var-annotated]
        self.dtype = inner.dtype

    def get_basic_selection(self, selection: slice, out: Any) -> None:
        self.reads.append((selection.start, selection.stop))
        self.inner.get_basic_selection(selection, out=out)


class ConcatenatedHooks:
    """Several ranks' `HooksBatch`es side by side: W ranks' batches as one process's batch."""

    def __init__(self, sources: list[MultiHookReader]) -> None:
        self.sources = sources

    def __iter__(self):  # type: ignore[no-untyped-def]
        for parts in zip(*self.sources, strict=False):
            hooks = parts[0].activations
            yield HooksBatch({hook: torch.cat([p.activations[hook] for p in parts]) for hook in hooks},
                             torch.cat([p.rows for p in parts]))

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for source, part in zip(self.sources, state["parts"], strict=True):
            source.load_state_dict(part)


def reader_cfg(batch: int) -> ReaderConfig:
    return ReaderConfig(batch_size=batch, buffer_chunks=4)


def assert_same(got_dir: Path, want_dir: Path, atol: float) -> None:
    """The saved SAEs in the two directories hold the same tensors (to `atol`)."""
    got, want = sae_tensors(got_dir), sae_tensors(want_dir)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=f"{got_dir.name} {key}")


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def train(run_dir: Path, store: Path, source: Any = None, **extra: object) -> Any:
    from saeworks.api import train_saes

    return train_saes(config(run_dir, store, **{**RECIPE, **extra}), source=source)


def test_two_hooks_in_one_process_equal_each_hook_alone_from_one_read(tmp_path: Path) -> None:
    store_path = tmp_path / "store.zarr"
    store = make_hooks_store(store_path)
    two = HOOKS[:2]
    reader = MultiHookReader(store, two, reader_cfg(BATCH))
    reader.array = CountingColumns(reader.array)  # type: ignore[assignment]
    result = train(tmp_path / "both", store_path, source=reader, **{"train.hooks": hooks_list(two)})
    names = [f"{hook}--{sae}" for hook in two for sae in SWEEP]
    assert [r.name for r in result.saes] == names
    assert [r.path for r in result.saes] == [tmp_path / "both" / "saes" / name for name in names]
    assert list(result.held) == names
    # (train's own reader, built from the config, runs in the distributed test below)

    single_reads = []
    for hook in two:
        alone = tmp_path / f"alone-{hook}"
        single = ActivationReader(store, hook, reader_cfg(BATCH))
        single.array = CountingColumns(single.array)  # type: ignore[assignment]
        train(alone, store_path, source=single, **{"train.hook": hook})
        single_reads.append(single.array.reads)  # type: ignore[attr-defined]
        for sae in SWEEP:
            assert_same(tmp_path / "both" / "saes" / f"{hook}--{sae}", alone / "saes" / sae, atol=1e-6)
            scales = [json.loads((d / "cfg.json").read_text())["saeworks"]["input_scale"]
                      for d in (tmp_path / "both" / "saes" / f"{hook}--{sae}", alone / "saes" / sae)]
            assert scales[0] == pytest.approx(scales[1], rel=1e-6)
            metadata = json.loads((tmp_path / "both" / "saes" / f"{hook}--{sae}" / "cfg.json").read_text())
            assert metadata["metadata"]["hook_name"] == hook

    # One read per block run for both hooks: the same runs as ONE single-hook reader, up to the
    # blocks the prefetching thread read ahead before each iteration stopped (the initial sample's
    # and training's: how far it got depends on timing).
    multi_reads, alone_reads = Counter(reader.array.reads), Counter(single_reads[0])  # type: ignore[attr-defined]
    slack = 2 * 4 * (reader.cfg.prefetch + 1)  # runs (of up to 4 chunks) of the blocks read ahead
    assert (multi_reads - alone_reads).total() <= slack < alone_reads.total()
    assert (alone_reads - multi_reads).total() <= slack

    last = [row for row in metric_rows(tmp_path / "both") if row["step"] == STEPS]
    assert [row["sae"] for row in last] == names
    assert [row["hook"] for row in last] == [hook for hook in two for _ in SWEEP]


@pytest.mark.slow
def test_model_source_feeds_two_hooks_from_one_forward(tmp_path: Path) -> None:
    """train.source=model: both hooks captured from each forward; an SAE equals its hook's alone."""
    from saeworks.api import train_saes
    from saeworks.run_config import RunConfig
    from saeworks.sae.configio import load_config

    def run(run_dir: Path, **extra: object) -> Any:
        settings = {"run_dir": run_dir, "train.source": "model", "data.context_size": 32,
                    "harvest.batch_size": 8, "model.device": "cpu", "train.model_buffer_rows": 512,
                    "train.batch_size": 128, "train.total_tokens": 128 * 4,
                    "train.saes": "[{k: 8, d_sae: 128}]", "train.wandb": "false", "train.device": "cpu",
                    "train.b_dec_init": "mean", "train.init_sample_rows": 128, **extra}
        return train_saes(load_config(RunConfig, None, [f"{k}={v}" for k, v in settings.items()]))

    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]
    both = run(tmp_path / "both", **{"train.hooks": hooks_list(hooks)})
    assert [r.name for r in both.saes] == [f"{hook}--topk-k8-128" for hook in hooks]
    run(tmp_path / "alone", **{"train.hook": hooks[1]})  # the later hook (the first: same code path)
    assert_same(both.saes[1].path, tmp_path / "alone" / "saes" / "topk-k8-128", atol=1e-6)


def test_hook_config_errors(tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    make_hooks_store(store, n_windows=32)
    with pytest.raises(StoreError, match=r"no hook 'blocks\.9\.hook_resid_post' \(train\.hooks\)"):
        train(tmp_path / "a", store, **{"train.hooks": hooks_list([HOOKS[0], "blocks.9.hook_resid_post"])})
    with pytest.raises(ConfigError, match=r"train\.hooks: set either hook"):
        config(tmp_path / "b", store, **{"train.hook": HOOKS[0], "train.hooks": hooks_list(HOOKS[:2])})
    with pytest.raises(ConfigError, match=r"train\.hooks: list at least one hook"):
        config(tmp_path / "c", store, **{"train.hooks": "[]"})
    with pytest.raises(ConfigError, match=r"train\.hooks: .* listed more than once"):
        config(tmp_path / "d", store, **{"train.hooks": hooks_list([HOOKS[0], HOOKS[0]])})
    with pytest.raises(ConfigError, match=r"train\.latent_shards: latent sharding trains one hook"):
        config(tmp_path / "e", store, **{"train.hooks": hooks_list(HOOKS[:2]), "train.latent_shards": 2})


def worker(root: Path, store: Path) -> None:
    """One torchrun rank: three hooks distributed (stopped half-way, then resumed), then one hook
    distributed over two ranks (rank 1 holds nothing); what each rank trained goes to a JSON file."""
    rank = int(os.environ["RANK"])
    hooks = {"train.hooks": hooks_list(HOOKS), "train.distribute_hooks": "true"}
    first = train(root / "three", store, **hooks, **{"train.stop_after_tokens": STEPS // 2 * BATCH})
    assert not first.finished and first.steps == STEPS // 2
    result = train(root / "three", store, **hooks, **{"train.resume": "true"})
    assert result.finished and result.world_size == 2 and result.rank == rank
    lone = train(root / "one", store, **{**hooks, "train.hooks": hooks_list(HOOKS[:1])})
    records = {"three": list(result.held), "one": list(lone.held),
               "saved": [str(r.path) for r in result.saes]}
    (root / f"rank{rank}.json").write_text(json.dumps(records))


@pytest.mark.slow
@pytest.mark.distributed
def test_distributed_hooks_match_one_process_without_hanging(tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    make_hooks_store(store)
    two = tmp_path / "two"
    two.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([*TORCHRUN, __file__, str(two), str(store)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=240)  # a hang fails here
    assert result.returncode == 0, result.stderr[-3000:]

    records = [json.loads((two / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    names = [f"{hook}--{sae}" for hook in HOOKS for sae in SWEEP]
    assert records[0]["three"] == [f"{hook}--{sae}" for hook in (HOOKS[0], HOOKS[2]) for sae in SWEEP]
    assert records[1]["three"] == [f"{HOOKS[1]}--{sae}" for sae in SWEEP]
    assert records[0]["one"] == SWEEP and records[1]["one"] == []
    assert records[0]["saved"] == records[1]["saved"] == [str(two / "three" / "saes" / n) for n in names]

    store_obj = ActivationStore.open(str(store))
    one = tmp_path / "one-three"
    readers = [MultiHookReader(store_obj, HOOKS, reader_cfg(BATCH // 2), r, 2) for r in (0, 1)]
    train(one, store, source=ConcatenatedHooks(readers), **{"train.hooks": hooks_list(HOOKS)})
    for name in names:
        assert_same(two / "three" / "saes" / name, one / "saes" / name, atol=1e-5)
    rows = metric_rows(two / "three")
    assert [row["sae"] for row in rows if row["step"] == STEPS] == names  # rank 0 logs every rank's SAEs
    # resumed, not restarted: each logged step once (5 and 10 before the stop, 15 and 20 after it)
    assert [row["step"] for row in rows] == [step for step in (5, 10, 15, 20) for _ in names]

    lone = tmp_path / "one-lone"
    singles = [ActivationReader(store_obj, HOOKS[0], reader_cfg(BATCH // 2), r, 2) for r in (0, 1)]
    train(lone, store, source=Concatenated(singles), **{"train.hooks": hooks_list(HOOKS[:1])})
    for sae in SWEEP:
        assert_same(two / "one" / "saes" / sae, lone / "saes" / sae, atol=1e-5)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
