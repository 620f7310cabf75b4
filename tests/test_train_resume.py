"""Checkpoints and resume: a run stopped at N tokens (by stop_after_tokens or SIGTERM) and resumed
to 2N ends with bit-identical weights to a run that went straight to 2N, in one process and in two.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
import torch

import saeworks.activations.reader as reader_module
from saeworks.activations.config import ReaderConfig
from saeworks.activations.reader import ActivationReader
from saeworks.activations.store import ActivationStore
from saeworks.api import train_saes
from saeworks.cli import EXIT_INTERRUPTED
from saeworks.sae.precision import autocast_dtype
from saeworks.train.checkpoint import latest_checkpoint
from saeworks.train.data import initial_sample
from saeworks.train.errors import CheckpointError, TrainingInterrupted
from tests.train_helpers import (
    HOOK,
    REPO,
    TORCHRUN,
    Recording,
    config,
    make_store,
    sae_tensors,
    train_overrides,
)

STEPS, BATCH = 24, 256
NAME = "topk-k4-256"
# 256 latents, k=4, dead after 1024 tokens: AuxK is active, so dead counters must resume too
RECIPE = {"train.saes": "[{k: 4, d_sae: 256}]", "train.total_tokens": STEPS * BATCH,
          "train.dead_after_tokens": 1024, "train.lr_warmup_tokens": 4 * BATCH,
          "train.lr_decay": "cosine", "train.lr_final_fraction": 0.1}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "store.zarr"
    make_store(path)
    return path


@pytest.fixture(scope="module")
def straight(store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Weights of an uninterrupted 1-process run of the whole budget."""
    run_dir = tmp_path_factory.mktemp("straight")
    train_saes(config(run_dir, store, **RECIPE))
    return sae_tensors(run_dir / "saes" / NAME)


def assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), (key, (got[key] - want[key]).abs().max())


def test_stop_and_resume_is_exact(store: Path, tmp_path: Path, straight: dict[str, torch.Tensor]) -> None:
    half = config(tmp_path, store, **RECIPE, **{"train.stop_after_tokens": STEPS * BATCH // 2,
                                                "train.checkpoint_every_tokens": 5 * BATCH})
    result = train_saes(half)
    assert not result.finished and result.saes[0].path is None and result.steps == STEPS // 2
    assert not (tmp_path / "saes").exists()
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"tokens-{STEPS // 2 * BATCH:012d}"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [checkpoint.name]  # older pruned
    resumed = train_saes(config(tmp_path, store, **RECIPE, **{"train.resume": "true"}))
    assert resumed.finished and resumed.steps == STEPS
    assert_identical(sae_tensors(tmp_path / "saes" / NAME), straight)
    dead = [line for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
            if '"dead": 0,' not in line]
    assert dead  # some latents were dead, so AuxK and the counters took part


def test_autocast_auto_resumes_under_the_value_it_resolved_to(store: Path, tmp_path: Path) -> None:
    """`auto` is decided once per run and recorded as the concrete value: a checkpoint made under
    `auto` resumes under that value, and the saved SAE records it."""
    resolved = autocast_dtype("auto", "cpu")
    half = config(tmp_path, store, **RECIPE, **{"train.autocast": "auto",
                                                "train.stop_after_tokens": STEPS * BATCH // 2})
    assert not train_saes(half).finished
    other = "none" if resolved == "bfloat16" else "bfloat16"
    refused = f"train.autocast: '{resolved}' in the checkpoint, '{other}' now"
    with pytest.raises(CheckpointError, match=refused):
        train_saes(config(tmp_path, store, **RECIPE, **{"train.autocast": other, "train.resume": "true"}))
    resumed = train_saes(config(tmp_path, store, **RECIPE, **{"train.autocast": resolved,
                                                             "train.resume": "true"}))
    assert resumed.finished
    saved = json.loads((tmp_path / "saes" / NAME / "cfg.json").read_text())
    assert saved["metadata"]["saeworks_training"]["autocast"] == resolved


def test_sigterm_checkpoints_at_the_next_step_and_resume_is_exact(
        store: Path, tmp_path: Path, straight: dict[str, torch.Tensor]) -> None:
    cfg = config(tmp_path, store, **RECIPE)
    reader = ActivationReader(ActivationStore.open(str(store)), HOOK,
                              ReaderConfig(batch_size=BATCH, buffer_chunks=4))
    source = Recording(reader, after=7, action=lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after step 7"):
        train_saes(cfg, source=source)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"tokens-{7 * BATCH:012d}"
    assert not (tmp_path / "saes").exists()
    train_saes(config(tmp_path, store, **RECIPE, **{"train.resume": "true"}))
    assert_identical(sae_tensors(tmp_path / "saes" / NAME), straight)


@pytest.mark.slow
def test_sigterm_through_the_command_line(store: Path, tmp_path: Path) -> None:
    args = train_overrides(tmp_path, store, **{"train.total_tokens": 10**9, "train.log_every_steps": 1})
    process = subprocess.Popen([sys.executable, "-m", "saeworks.cli", "train", *args], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "stopped by SIGTERM after step" in err and "train.resume=true" in err
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None and not (tmp_path / "saes").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_stop_and_resume_is_exact(store: Path, tmp_path: Path) -> None:
    def run(run_dir: Path, **extra: object) -> None:
        args = train_overrides(run_dir, store, **RECIPE, **extra)
        result = subprocess.run([*TORCHRUN, "-m", "saeworks.train", *args], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    run(tmp_path / "straight")
    run(tmp_path / "halves", **{"train.stop_after_tokens": STEPS * BATCH // 2})
    assert not (tmp_path / "halves" / "saes").exists()
    run(tmp_path / "halves", **{"train.resume": "true"})
    assert_identical(sae_tensors(tmp_path / "halves" / "saes" / NAME),
                     sae_tensors(tmp_path / "straight" / "saes" / NAME))


@pytest.mark.slow
def test_on_the_fly_model_source_trains_and_resumes_exactly(tmp_path: Path) -> None:
    """source=model: the embedded model's layer-2 residual, shuffled in memory, nothing on disk."""
    from saeworks.run_config import RunConfig
    from saeworks.sae.configio import load_config

    def cfg(run_dir: Path, **extra: object) -> RunConfig:
        settings = {"run_dir": run_dir, "train.source": "model", "train.hook": "blocks.2.hook_resid_post",
                    "data.context_size": 32, "harvest.batch_size": 8, "model.device": "cpu",
                    "train.model_buffer_rows": 512, "train.batch_size": 128, "train.total_tokens": 128 * 8,
                    "train.saes": "[{k: 8, d_sae: 256}]", "train.wandb": "false", "train.device": "cpu",
                    "train.b_dec_init": "mean", "train.init_sample_rows": 128, **extra}
        return load_config(RunConfig, None, [f"{key}={value}" for key, value in settings.items()])

    straight = train_saes(cfg(tmp_path / "straight"))
    assert straight.finished and straight.saes[0].l0 == 8
    assert not (tmp_path / "straight" / "activations.zarr").exists()
    train_saes(cfg(tmp_path / "halves", **{"train.stop_after_tokens": 128 * 3}))  # mid-block (4 batches each)
    train_saes(cfg(tmp_path / "halves", **{"train.resume": "true"}))
    name = "topk-k8-256"
    assert_identical(sae_tensors(tmp_path / "halves" / "saes" / name),
                     sae_tensors(tmp_path / "straight" / "saes" / name))


def test_the_initial_sample_is_handed_over_again_not_read_twice(store: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's first batches are the sample's, from the reader's one read of its first block;
    the position reported among them is the reader's after as many batches."""
    loads: list[tuple[int, int]] = []
    load_block = reader_module._Loader._load_block

    def counted(self: Any, epoch: int, block: int, chunks: Any) -> Any:
        loads.append((epoch, block))
        return load_block(self, epoch, block, chunks)

    monkeypatch.setattr(reader_module._Loader, "_load_block", counted)
    reader_cfg = ReaderConfig(batch_size=BATCH, buffer_chunks=4)  # ~3.9 batches a block
    fresh = ActivationReader(ActivationStore.open(str(store)), HOOK, reader_cfg)
    want_states = [fresh.state_dict()]
    want = []
    for batch in itertools.islice(iter(fresh), 9):
        want.append(batch.activations.clone())
        want_states.append(fresh.state_dict())
    loads.clear()

    reader = ActivationReader(ActivationStore.open(str(store)), HOOK, reader_cfg)
    samples, replayed = initial_sample(reader, 5, torch.device("cpu"), [HOOK])  # blocks 0 and 1
    assert torch.equal(samples[HOOK], torch.cat(want[:5]).float())
    assert reader.pace is not None and reader.pace.step_s is None  # the sample's reads set no pace
    got, got_states = [], [replayed.state_dict()]
    batches = iter(replayed)
    for batch in itertools.islice(batches, 9):
        got.append(batch.activations)
        got_states.append(replayed.state_dict())
    cast(Any, batches).close()
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert got_states == want_states
    assert loads.count((0, 0)) == 1 and loads.count((0, 1)) == 1  # each block decoded once

    replayed.load_state_dict(want_states[2])  # repositioned: the held batches are dropped
    assert torch.equal(next(iter(replayed)).activations, want[2])

    _, stopped = initial_sample(ActivationReader(ActivationStore.open(str(store)), HOOK, reader_cfg), 5,
                                torch.device("cpu"), [HOOK])
    batches = iter(stopped)
    next(batches), next(batches)
    cast(Any, batches).close()  # stopped among the held batches: the source continues after two
    assert stopped.state_dict() == want_states[2]
    assert torch.equal(next(iter(stopped)).activations, want[2])
