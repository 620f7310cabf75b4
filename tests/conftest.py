"""Shared fixtures: offline settings and the embedded model, loaded once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="session")
def embedded_tokenizer():  # type: ignore[no-untyped-def]
    from saeworks.activations.config import ModelConfig
    from saeworks.activations.model import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def embedded_model():  # type: ignore[no-untyped-def]
    from saeworks.activations.config import ModelConfig
    from saeworks.activations.model import load_model

    return load_model(ModelConfig(device="cpu"))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch threads, then restore the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny shapes run fastest, and steadiest on a busy machine, with one torch thread."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A real store of the embedded model and a small TopK SAE trained on it (tests/eval_helpers.py).
    Shared and read-only: tests that write copy what they change."""
    from tests.eval_helpers import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("tiny-run"))


@pytest.fixture(scope="session")
def tiny_dictionary(tiny_run, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The feature dictionary of the tiny run's SAE, analysed over its store (read-only, shared).
    Built from a copy of the SAE: analysing evaluates first and writes metrics.json beside the SAE,
    which must not change the shared tiny run for the tests that come after."""
    import shutil

    from saeworks.pipeline import build_dictionary

    root = tmp_path_factory.mktemp("tiny-dictionary")
    sae_dir = Path(shutil.copytree(tiny_run.sae_dir, root / "saes" / tiny_run.sae_dir.name))
    return build_dictionary(sae_dir, tiny_run.cfg, tiny_run.store_url, root / "dictionary").directory


@pytest.fixture(scope="session")
def late_dictionary(embedded_model, embedded_tokenizer, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A tiny SAE at a late layer (tests/eval_helpers.LATE_HOOK) and its dictionary: where a
    feature's direct logit effect shows in the output (read-only, shared)."""
    from tests.eval_helpers import build_late_dictionary

    return build_late_dictionary(tmp_path_factory.mktemp("late-run"), embedded_model, embedded_tokenizer)
