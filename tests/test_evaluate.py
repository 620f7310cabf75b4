"""`evaluate` on the tiny real run: against straightforward computations written out here, on both
targets, and its refusals."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saeworks.activations.config import DataConfig
from saeworks.activations.hooks import HookError
from saeworks.activations.store import TOKEN_IDS, ActivationStore
from saeworks.activations.text import iter_documents, iter_windows, pack_windows, separator_ids
from saeworks.eval.evaluate import (
    METRICS_FILE,
    EvalReport,
    EvaluationError,
    evaluation_device,
    read_report,
    write_metrics,
)
from saeworks.eval.metrics import DOWNSTREAM_KEYS, RECONSTRUCTION_KEYS
from saeworks.sae.io import SAEFormatError, load_sae
from tests.eval_helpers import TINY_HOOK, evaluate_run

FIRST_KEPT = 2  # the tiny run's data.exclude_first_positions, the SAE's seqpos_slice start
SPECIAL = [0, 1, 2]


def with_settings(tiny_run: Any, **evaluate: Any) -> Any:
    """The tiny run's config with some `evaluate:` settings changed."""
    return replace(tiny_run.cfg, evaluate=replace(tiny_run.cfg.evaluate, **evaluate))


def edited_sae(tmp_path: Path, tiny_run: Any, **metadata: Any) -> Path:
    """A copy of the tiny SAE whose cfg.json metadata has some fields changed."""
    directory = tmp_path / "edited-sae"
    shutil.copytree(tiny_run.sae_dir, directory)
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg["metadata"].update(metadata)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="module")
def held_out_report(tiny_run: Any) -> EvalReport:
    return evaluate_run(tiny_run.sae_dir, tiny_run.cfg)


@torch.no_grad()
def test_held_out_figures_match_a_hand_computation(held_out_report: EvalReport, tiny_run: Any,
                                                   embedded_model: Any, embedded_tokenizer: Any) -> None:
    """The acceptance test: a plain forward hook on the block module, no saeworks hook code."""
    cfg = tiny_run.cfg
    windows = torch.from_numpy(np.stack(list(iter_windows(
        embedded_tokenizer, cfg.data, cfg.evaluate.held_out_tokens // cfg.data.context_size,
        held_out=True)))).long()  # [8, 32]
    sae = load_sae(tiny_run.sae_dir)
    block = embedded_model.model.layers[3]  # its output is blocks.3.hook_resid_post
    captured: list[torch.Tensor] = []

    def forward(rewrite: Any) -> torch.Tensor:
        def hook(module: Any, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            captured.append(hidden.clone())
            if rewrite is None:
                return None
            hidden = hidden.clone()
            hidden[:, FIRST_KEPT:] = rewrite(hidden[:, FIRST_KEPT:])
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = block.register_forward_hook(hook)
        try:
            return embedded_model(input_ids=windows, use_cache=False).logits
        finally:
            handle.remove()

    clean = forward(None)
    hidden = captured[0]  # [8, 32, 576]
    keep = ~torch.isin(windows[:, FIRST_KEPT:], torch.tensor(SPECIAL))
    x = hidden[:, FIRST_KEPT:][keep]  # kept rows
    mean = x.mean(dim=0)
    spliced = forward(sae)
    zero = forward(torch.zeros_like)
    mean_ablated = forward(lambda kept: mean.expand_as(kept))

    targets = windows[:, FIRST_KEPT + 1:].reshape(-1)

    def ce(logits: torch.Tensor) -> float:
        predictions = logits[:, FIRST_KEPT:-1]
        return float(F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets))

    ce_clean, ce_spliced, ce_zero, ce_mean = ce(clean), ce(spliced), ce(zero), ce(mean_ablated)
    log_p = F.log_softmax(clean[:, FIRST_KEPT:-1], dim=-1).reshape(-1, clean.shape[-1])
    log_q = F.log_softmax(spliced[:, FIRST_KEPT:-1], dim=-1).reshape(-1, clean.shape[-1])
    kl = float(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))
    x_hat = sae(x)
    fvu = float((x - x_hat).pow(2).sum() / (x - mean).pow(2).sum())

    figures = held_out_report.metrics
    assert figures["ce_recovered"] == pytest.approx((ce_zero - ce_spliced) / (ce_zero - ce_clean), abs=1e-4)
    assert figures["ce_recovered_mean"] == pytest.approx((ce_mean - ce_spliced) / (ce_mean - ce_clean),
                                                         abs=1e-4)
    for key, value in (("ce_clean", ce_clean), ("ce_spliced", ce_spliced), ("ce_zero", ce_zero),
                       ("ce_mean", ce_mean), ("kl", kl), ("fvu", fvu)):
        assert figures[key] == pytest.approx(value, rel=1e-4), key
    assert 0.5 < figures["ce_recovered"] < 1.0  # a real, imperfect SAE
    info = held_out_report.info
    assert info["n_tokens"] == int(keep.sum())
    assert info["n_predictions"] == targets.numel() == 8 * (32 - FIRST_KEPT - 1)
    assert info["target"]["kind"] == "held_out_documents" and info["target"]["n_windows"] == 8


def test_report_keys_table_and_files(held_out_report: EvalReport, tiny_run: Any, tmp_path: Path) -> None:
    report = held_out_report
    assert list(report.metrics) == [*RECONSTRUCTION_KEYS, *DOWNSTREAM_KEYS]
    assert report.density.shape == (256,)
    assert report.info["dead_count"] == int((report.density == 0).sum())
    assert report.metrics["dead_fraction"] == report.info["dead_count"] / 256
    for key in ("sae_dir", "sae_name", "hook", "model", "target", "n_tokens", "n_predictions", "dead_count",
                "dense_count", "dense_threshold", "first_kept", "seconds", "tokens_per_s",
                "saeworks_version"):
        assert key in report.info, key
    assert report.info["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert report.info["hook"] == TINY_HOOK and report.info["first_kept"] == FIRST_KEPT
    table = report.table()
    assert all(key in table for key in report.metrics) and "fraction of variance unexplained" in table
    path = write_metrics(report, tmp_path)
    assert path == tmp_path / METRICS_FILE
    assert [p.name for p in tmp_path.iterdir()] == [METRICS_FILE]  # no temporary file left
    again = read_report(tmp_path)
    assert again.metrics == pytest.approx(report.metrics)
    assert torch.equal(again.density, report.density.double())
    assert json.loads(path.read_text())["info"]["sae_name"] == tiny_run.sae_dir.name


def kept_rows_by_hand(store_url: str) -> torch.Tensor:
    """Every kept row of the tiny store [rows, 576]: positions >= 2, special tokens skipped."""
    store = ActivationStore.open(store_url)
    activations = store.read_rows(TINY_HOOK, 0, store.n_tokens).float()
    tokens = np.asarray(store.array(TOKEN_IDS)[:])
    keep = (np.arange(store.n_tokens) % store.context_size >= FIRST_KEPT) & ~np.isin(tokens, SPECIAL)
    return activations[torch.from_numpy(keep)]


@torch.no_grad()
def test_store_reconstruction_matches_a_hand_computation(tiny_run: Any, monkeypatch: Any) -> None:
    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no model is needed without downstream figures")

    monkeypatch.setattr("saeworks.eval.evaluate.load_model", no_model)
    report = evaluate_run(tiny_run.sae_dir, with_settings(tiny_run, downstream=False, row_batch_size=1000),
                      tiny_run.store_url)
    x = kept_rows_by_hand(tiny_run.store_url)
    sae = load_sae(tiny_run.sae_dir)
    latents = sae.encode(x)
    x_hat = sae.decode(latents)
    density = (latents > 0).double().mean(dim=0)
    expected = {
        "mse": (x - x_hat).pow(2).sum(dim=1).mean(),
        "fvu": (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum(),
        "cosine": F.cosine_similarity(x, x_hat, dim=1).mean(),
        "relative_norm": (x_hat.norm(dim=1) / x.norm(dim=1)).mean(),
        "l0": (latents > 0).sum(dim=1).double().mean(),
        "l1": latents.abs().sum(dim=1).mean(),
        "dead_fraction": (density == 0).double().mean(),
        "dense_fraction": (density > 0.1).double().mean(),
    }
    assert list(report.metrics) == list(RECONSTRUCTION_KEYS)
    for key, value in expected.items():
        assert report.metrics[key] == pytest.approx(float(value), rel=1e-5, abs=1e-12), key
    torch.testing.assert_close(report.density, density)
    assert report.info["n_tokens"] == x.shape[0] and report.info["n_predictions"] == 0
    assert report.info["target"]["kind"] == "store"
    # batching the rows differently changes nothing; max_rows caps them
    rebatched = evaluate_run(tiny_run.sae_dir, with_settings(tiny_run, downstream=False, row_batch_size=37),
                         tiny_run.store_url)
    assert rebatched.metrics == pytest.approx(report.metrics, rel=1e-6)
    capped = evaluate_run(tiny_run.sae_dir, with_settings(tiny_run, downstream=False, max_rows=500),
                      tiny_run.store_url)
    assert capped.info["n_tokens"] == 500


def test_store_downstream_uses_the_store_windows(tiny_run: Any) -> None:
    cfg = with_settings(tiny_run, device="auto", held_out_tokens=4 * 32 + 5)
    report = evaluate_run(tiny_run.sae_dir, cfg, tiny_run.store_url)
    assert list(report.metrics) == [*RECONSTRUCTION_KEYS, *DOWNSTREAM_KEYS]
    assert report.info["target"]["n_windows"] == 4 and report.info["n_predictions"] == 4 * 29
    assert report.metrics["ce_clean"] < report.metrics["ce_spliced"] < report.metrics["ce_zero"]
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert report.info["device"].startswith(expected_device)


@pytest.mark.slow
def test_held_out_figures_do_not_depend_on_the_window_batch(held_out_report: EvalReport,
                                                           tiny_run: Any) -> None:
    report = evaluate_run(tiny_run.sae_dir, with_settings(tiny_run, batch_size=3))
    assert report.metrics == pytest.approx(held_out_report.metrics, rel=1e-5)


def test_refuses_an_sae_of_another_model(tiny_run: Any, tmp_path: Path) -> None:
    other = edited_sae(tmp_path, tiny_run, model_name="EleutherAI/pythia-70m")
    with pytest.raises(EvaluationError) as caught:
        evaluate_run(other, tiny_run.cfg, tiny_run.store_url)
    assert "EleutherAI/pythia-70m" in str(caught.value)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in str(caught.value)
    with pytest.raises(EvaluationError, match=r"pythia-70m.*SmolLM2.*model\.name"):
        evaluate_run(other, tiny_run.cfg)


def test_unknown_hook_lists_the_valid_names(tiny_run: Any, tmp_path: Path) -> None:
    absent = edited_sae(tmp_path, tiny_run, hook_name="blocks.99.hook_resid_post")
    with pytest.raises(HookError, match=r"valid names: .*blocks\.\{L\}\.hook_resid_post"):
        evaluate_run(absent, tiny_run.cfg)
    with pytest.raises(EvaluationError, match=f"does not hold.*{TINY_HOOK}"):
        evaluate_run(absent, tiny_run.cfg, tiny_run.store_url)


def test_refuses_an_sae_of_another_width(tiny_run: Any, tmp_path: Path) -> None:
    neurons = edited_sae(tmp_path, tiny_run, hook_name="blocks.3.mlp.hook_post")  # 1536 wide
    with pytest.raises(EvaluationError, match=r"576-wide.*1536 wide"):
        evaluate_run(neurons, tiny_run.cfg)


def test_refuses_what_is_not_an_sae(tiny_run: Any, tmp_path: Path) -> None:
    with pytest.raises(SAEFormatError, match="not an SAE directory"):
        evaluate_run(tmp_path, tiny_run.cfg)
    with pytest.raises(SAEFormatError, match="no SAE directory"):
        evaluate_run(tmp_path / "missing", tiny_run.cfg)


def test_device_resolution() -> None:
    assert evaluation_device("cpu") == torch.device("cpu")
    assert evaluation_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EvaluationError, match="no GPU"):
            evaluation_device("cuda")


class CountingTokenizer:
    """The real tokenizer, counting the documents it is asked to tokenise."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.documents = tokenizer, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.documents += len(texts)
        return self.tokenizer(texts, **kwargs)


@pytest.mark.parametrize(("held_out", "n_windows"), [(True, 1), (True, 40), (True, 10**6), (False, 300)])
def test_held_out_windows_tokenise_only_the_documents_they_need(
        held_out: bool, n_windows: int, embedded_tokenizer: Any, tmp_path: Path) -> None:
    """Evaluate's held-out windows (`iter_windows(..., held_out=True)`) are those of packing the
    held-out documents tokenised one at a time, and only about the documents they use are
    tokenised: a few windows used to tokenise 64 whole documents (the demo: 148k tokens for 2k)."""
    words = ["the", "model", "reads", "residual", "streams", "of", "held", "out", "python",
             "documents", "quickly"]
    docs = [f"Document {i}: " + " ".join(words[(i * j) % len(words)] for j in range(i * 37 % 40 + 1))
            for i in range(3000)]  # ~150 held out: past the 127 documents of batches 1, 2, ..., 64
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    data = DataConfig(path=str(path), context_size=16)

    used = 0

    def one_at_a_time() -> Iterator[list[int]]:
        nonlocal used
        for doc in iter_documents(data, held_out):
            used += 1
            yield embedded_tokenizer([doc], add_special_tokens=False)["input_ids"][0]

    bos, separator = separator_ids(embedded_tokenizer)
    expected = list(islice(pack_windows(one_at_a_time(), 16, bos, separator), n_windows))
    tokenizer = CountingTokenizer(embedded_tokenizer)
    windows = list(iter_windows(tokenizer, data, n_windows, held_out=held_out))
    assert [w.tolist() for w in windows] == [w.tolist() for w in expected]
    if n_windows == 10**6:  # every document, each tokenised once
        assert held_out and len(windows) < n_windows and tokenizer.documents == used > 127
    else:  # batches of 1, 2, 4, ... 64 documents: at most twice those used, never a batch beyond
        assert len(windows) == n_windows and used <= tokenizer.documents <= min(2 * used - 1, used + 63)
    if n_windows == 1:
        assert tokenizer.documents == 1
