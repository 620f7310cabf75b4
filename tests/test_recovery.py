"""After a kill, the next run of the same stage finishes cleanly and leaves no junk: scratch of the
killed writer (and scratch named by older saeworks versions) is removed, the user is told once."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from saeworks.cli import main
from saeworks.eval.dictionary import FeatureDictionary
from saeworks.sae.atomic import FAULT_ENV
from tests.eval_helpers import TINY_SAE_NAME, tiny_overrides
from tests.helpers import REPO

FAST_ANALYZE = ["evaluate.downstream=false", "analyze.top_n=3", "analyze.device=cpu",
                "evaluate.device=cpu"]


def _killed_at(point: str, args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "saeworks", *args], capture_output=True, text=True,
                          env={**os.environ, FAULT_ENV: point}, cwd=REPO, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_killed_analyze_leaves_no_junk_after_the_next_run(
        tiny_run, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    sae_dir = tmp_path / "saes" / TINY_SAE_NAME
    shutil.copytree(tiny_run.sae_dir, sae_dir)
    dictionaries = tmp_path / "dictionaries"
    out = dictionaries / TINY_SAE_NAME
    args = ["analyze", str(sae_dir), tiny_run.store_url, *FAST_ANALYZE, "--out", str(out)]
    _killed_at("publish:ready", args)  # built in full, killed just before it is published
    assert not out.exists()
    assert any(".partial@" in name for name in _hidden(dictionaries))
    legacy = dictionaries / f".{TINY_SAE_NAME}-building-x8k2p1q0"  # as saeworks <= 0.9 named scratch
    legacy.mkdir()
    (legacy / "features.sqlite").write_bytes(bytes(1000))

    with caplog.at_level(logging.WARNING, logger="saeworks.sae.atomic"):
        assert main(args) == 0
    assert _hidden(dictionaries) == [f".{TINY_SAE_NAME}.lock"]
    told = [r.getMessage() for r in caplog.records if "leftover" in r.getMessage()]
    assert len(told) == 1 and legacy.name in told[0] and ".partial@" in told[0], told
    with FeatureDictionary.open(out) as first:
        n_features = len(first)

    _killed_at("publish:exchanged", args)  # the new one is in place, the old one not yet removed
    with FeatureDictionary.open(out) as replaced:
        assert len(replaced) == n_features
    assert main(args) == 0
    assert _hidden(dictionaries) == [f".{TINY_SAE_NAME}.lock"]


def test_a_train_killed_while_publishing_a_checkpoint_finishes_on_the_next_run(
        tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    args = ["train", *tiny_overrides(run, **{"train.store": tiny_run.store_url,
                                             "train.checkpoint_every_tokens": 256 * 20,
                                             "train.resume": "true"})]
    _killed_at("publish:ready", args)
    checkpoints = run / "checkpoints"
    assert any(".partial@" in name for name in _hidden(checkpoints))
    (checkpoints / ".tmp-q8w7e6").mkdir()  # a checkpoint scratch named by saeworks <= 0.9
    assert main(args) == 0
    assert _hidden(checkpoints) == [] and _hidden(run / "saes") == []
    assert (run / "saes" / TINY_SAE_NAME / "sae_weights.safetensors").is_file()
