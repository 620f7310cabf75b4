"""The trainer end to end on a small synthetic store: SAEs learn, are saved in the SAELens layout,
log metrics; every bad input is a one-line error with exit status 2 and no saved SAE; a diverging
run stops with a clear error and saves nothing."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import saeworks.train.run as run_module
from saeworks.activations.store import ActivationStore
from saeworks.api import train_saes
from saeworks.cli import EXIT_USER_ERROR, main
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.config import SAEConfig
from saeworks.sae.io import load_sae
from saeworks.sae.registry import create_sae
from saeworks.sae.topk import TopKSAE
from saeworks.train.config import TrainConfig
from saeworks.train.data import SourceInfo
from saeworks.train.errors import TrainingDivergedError
from saeworks.train.plan import make_hooks_plan
from saeworks.train.schedule import Schedule, default_lr
from saeworks.train.trainer import Trainer
from tests.train_helpers import HOOK, config, make_store, train_overrides


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("train") / "store.zarr"
    make_store(path)
    return path


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_two_topk_saes_learn_from_one_pass_and_are_saved(store: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    args = train_overrides(run_dir, store, **{"train.saes": "[{k: 4, d_sae: 64}, {k: 8, d_sae: 64}]",
                                              "train.wandb": "true", "train.b_dec_init": "geometric_median",
                                              "train.log_every_steps": 1})
    assert main(["train", *args]) == 0
    printed = capsys.readouterr().out
    rows = metrics_of(run_dir)
    raw = ActivationStore.open(str(store)).read_rows(HOOK, 0, 4096)[32:].float()  # [rows, d_in]
    for name, k in (("topk-k4-64", 4), ("topk-k8-64", 8)):
        mine = [r for r in rows if r["sae"] == name]
        assert [r["step"] for r in mine] == list(range(1, 41))
        first, last = (np.mean([r["loss"] for r in part]) for part in (mine[:5], mine[-5:]))
        assert last < 0.75 * first  # the loss falls
        assert all(r["l0"] == k for r in mine)
        assert all(0 < r["fvu"] < 1 and math.isfinite(r["fvu"]) for r in mine)
        assert {"loss", "aux", "dead", "dense", "lr", "tokens_per_s", "tokens"} <= set(mine[-1])
        assert f"saved SAE {name} to {run_dir / 'saes' / name}" in printed
        sae = load_sae(run_dir / "saes" / name)
        with torch.no_grad():  # on raw activations: the input scale is folded into the weights
            latents = sae.encode(raw)
            x_hat = sae.decode(latents)
        assert int((latents > 0).sum(dim=1).max()) <= k
        fvu = float((raw - x_hat).pow(2).sum() / (raw - raw.mean(0)).pow(2).sum())
        assert fvu < 0.6, fvu
        cfg = json.loads((run_dir / "saes" / name / "cfg.json").read_text())
        metadata = cfg["metadata"]
        assert metadata["model_name"] == "synthetic-model" and metadata["hook_name"] == HOOK
        assert metadata["context_size"] == 32 and metadata["prepend_bos"] is True
        assert metadata["dataset_path"] == "synthetic-text"
        assert metadata["saeworks_training"]["tokens"] == 256 * 40
        assert cfg["saeworks"]["input_scale"] != 1.0
    assert (run_dir / "checkpoints" / f"tokens-{256 * 40:012d}").is_dir()
    assert list((run_dir / "logs" / "wandb").glob("offline-run-*"))


def test_api_result_and_defaults(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path, store, **{"train.total_tokens": 256 * 4, "train.lr": "null",
                                     "train.b_dec_init": "zeros", "train.normalize_inputs": "false",
                                     "train.checkpoint_every_tokens": 512})
    write_checkpoint = run_module.write_checkpoint

    def slow_checkpoint(*args: Any, **kwargs: Any) -> Path:  # a slow disk: the time is the checkpoints'
        time.sleep(0.2)
        return write_checkpoint(*args, **kwargs)

    monkeypatch.setattr(run_module, "write_checkpoint", slow_checkpoint)
    start = time.perf_counter()
    result = train_saes(cfg)
    wall = time.perf_counter() - start
    assert result.finished and result.steps == 4 and result.tokens == 1024
    spent = result.seconds  # two checkpoints (after steps 2 and 4), each 0.2 s slower
    assert spent.checkpoints >= 0.4 and spent.setup > 0 and spent.steps > 0 and spent.save > 0
    assert spent.total == spent.setup + spent.steps + spent.checkpoints + spent.save <= wall
    assert result.saes[0].path == tmp_path / "saes" / "topk-k4-64"
    assert result.saes[0].l0 == 4
    assert metrics_of(tmp_path)[0]["lr"] == pytest.approx(default_lr(64))
    assert cfg.train.total_tokens == 1024  # the trainer never mutates its config


def bad_input_cases(store: Path, tmp_path: Path) -> list[tuple[list[str], str]]:
    incomplete = tmp_path / "incomplete.zarr"
    make_store(incomplete, n_windows=64, complete=False)
    base = train_overrides(tmp_path / "run", store)
    return [
        ([*base, "train.hook=blocks.9.hook_resid_post"], f"has no hook 'blocks.9.hook_resid_post' "
                                                         f"(train.hook); it holds {HOOK}"),
        ([*base, "train.saes=[{d_in: 16}]"], "train.saes[0].d_in: 16 does not match the width d=32"),
        ([*base, "train.saes=[{architecture: nope}]"],
         "train.saes[0].architecture: unknown SAE architecture 'nope'; registered: "),
        ([*base, "train.saes=[{k: 0}]"], "train.saes[0].k: must be positive, got 0"),
        ([*base, "train.saes=[{k: 4, d_sae: -8}]"], "train.saes[0].d_sae: must be positive, got -8"),
        ([*base, "train.saes=[{expansion_factor: 0}]"], "train.saes[0].expansion_factor: must be positive"),
        ([*base, "train.batch_size=0"], "train.batch_size: must be positive, got 0"),
        ([*base, "train.store=" + str(tmp_path / "nothing.zarr")], "no activation store at"),
        ([*base, f"train.store={incomplete}"], "is incomplete"),
        ([*base, "train.total_tokens=100", "train.batch_size=200"],
         "train.total_tokens: 100 is less than one batch"),
    ]


def test_bad_inputs_are_one_line_errors_and_save_nothing(store: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    for args, message in bad_input_cases(store, tmp_path):
        assert main(["train", *args]) == EXIT_USER_ERROR, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("saeworks train: error: ") and "\n" not in err, err
        assert message in err, (message, err)
        assert not (tmp_path / "run" / "saes").exists()


def test_a_checkpoint_from_another_config_is_refused(store: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = train_overrides(tmp_path, store, **{"train.stop_after_tokens": 512})
    assert main(["train", *args]) == 0
    assert not (tmp_path / "saes").exists()  # stopped early: checkpoint only
    capsys.readouterr()
    assert main(["train", *args, "train.resume=true", "train.batch_size=128",
                 "train.saes=[{k: 5, d_sae: 64}]"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "was written under another config" in err
    assert "train.batch_size: 256 in the checkpoint, 128 now" in err
    assert "train.saes[0].k: 4 in the checkpoint, 5 now" in err
    assert main(["train", *args]) == EXIT_USER_ERROR  # no silent restart over a checkpoint
    assert "set train.resume=true" in capsys.readouterr().err
    assert not (tmp_path / "saes").exists()


def test_nan_activations_stop_the_run_and_save_nothing(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    poisoned = tmp_path / "poisoned.zarr"
    make_store(poisoned, poison_rows=slice(4000, 4010))
    cfg = config(tmp_path / "run", poisoned, **{"train.normalize_inputs": "false",
                                                "train.b_dec_init": "zeros"})
    with pytest.raises(TrainingDivergedError, match=r"SAE topk-k4-64 diverged at step \d+ \(\d+ tokens"):
        train_saes(cfg)
    assert not (tmp_path / "run" / "saes").exists()
    assert not list((tmp_path / "run" / "checkpoints").glob("tokens-*"))
    # through the CLI, and with the poison inside the first sample: caught before training
    args = train_overrides(tmp_path / "cli", poisoned, **{"train.init_sample_rows": 8192})
    assert main(["train", *args]) == EXIT_USER_ERROR
    assert "NaN/Inf" in capsys.readouterr().err
    assert not (tmp_path / "cli" / "saes").exists()


def test_a_huge_learning_rate_diverges_cleanly(store: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = train_overrides(tmp_path, store, **{"train.lr": 1e30, "train.grad_clip_norm": "null"})
    assert main(["train", *args]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "diverged at step" in err and "no SAE was saved" in err
    assert not (tmp_path / "saes").exists()


def test_schedules() -> None:
    warm = Schedule(total_steps=100, lr_warmup_steps=10, lr_decay="linear", lr_final_fraction=0.1,
                    sparsity_warmup_steps=20)
    assert warm.lr_factor(0) == pytest.approx(0.1) and warm.lr_factor(9) == 1.0
    assert warm.lr_factor(10) == 1.0 and warm.lr_factor(100) == pytest.approx(0.1)
    assert warm.lr_factor(55) == pytest.approx(0.1 + 0.9 * 0.5)
    cosine = Schedule(100, 0, "cosine", 0.0, 0)
    assert cosine.lr_factor(0) == 1.0 and cosine.lr_factor(50) == pytest.approx(0.5)
    assert cosine.lr_factor(100) == pytest.approx(0.0, abs=1e-12)
    assert Schedule(100, 0, "none", 0.0, 0).lr_factor(99) == 1.0
    assert warm.sparsity_factor(0) == pytest.approx(0.05) and warm.sparsity_factor(19) == 1.0
    factors = [warm.lr_factor(s) for s in range(100)]
    assert np.all(np.diff(factors[10:]) <= 0)


def test_every_registered_architecture_trains_and_saves(store: Path, tmp_path: Path) -> None:
    from saeworks.sae.registry import ARCHITECTURES

    saes = ", ".join(f"{{architecture: {name}, k: 4, d_sae: 64, matryoshka_prefixes: [16, 64]}}"
                     if name.startswith("matryoshka") else f"{{architecture: {name}, k: 4, d_sae: 64}}"
                     for name in sorted(ARCHITECTURES))
    cfg = config(tmp_path, store, **{"train.saes": f"[{saes}]", "train.total_tokens": 256 * 6,
                                     "train.sparsity_warmup_tokens": 512, "train.dead_after_tokens": 256})
    result = train_saes(cfg)
    for sae in result.saes:
        assert sae.path is not None and math.isfinite(sae.fvu), sae
        load_sae(sae.path)


def _training_latents(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """[batch, d_sae] the latents a training forward activates, computed densely."""
    if isinstance(sae, TopKSAE):
        return sae.dense_training_latents(x)
    return sae.encode(x)  # relu: what training uses


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_logged_dense_latents_are_counted_from_the_steps_own_forward(architecture: str) -> None:
    """The metrics' `dense` (latents firing on more than dense_fraction of the batch) comes from
    the step's own firing counts, TrainOutput.fired: the latents its forward activated, with the
    weights before the optimiser step (no second encode of the batch)."""
    torch.manual_seed(0)
    cfg = SAEConfig(architecture=architecture, k=8, d_sae=512).resolved(40)
    sae = create_sae(cfg)
    with torch.no_grad():
        sae.b_enc.normal_()  # some latents far more frequent than others
    train_cfg = TrainConfig(saes=[cfg], batch_size=700, total_tokens=700 * 4, dense_fraction=0.05)
    plan = make_hooks_plan(train_cfg, [SourceInfo(HOOK, 40, "x", {}, {})], 1)
    trainer = Trainer([sae], plan, train_cfg, 1.0, torch.device("cpu"))
    inputs = trainer.prepare(torch.randn(700, 40))
    with torch.no_grad():
        fraction = (_training_latents(sae, inputs[HOOK]) > 0).double().mean(dim=0)  # [d_sae]
    stats = trainer.forward_backward(inputs)
    trainer.reduce(stats, False)
    torch.testing.assert_close(stats.fired[0], (fraction * 700).float())
    want = int((fraction > 0.05).sum())
    assert 0 < want < 512
    with torch.no_grad():  # weights that move after the step (as the optimiser moves them) do not
        sae.b_enc.add_(3.0)  # change what the step's forward fired: nearly every latent now would
    assert trainer.metrics(inputs, stats)[0]["dense"] == want
