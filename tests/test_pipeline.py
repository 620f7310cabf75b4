"""`saeworks run`, `evaluate` and `analyze` as a user calls them: one process, real artifacts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.eval_helpers import TINY_SAE_NAME, tiny_overrides
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def test_run_goes_from_text_to_an_open_dictionary(tmp_path: Path) -> None:
    from saeworks.eval.dictionary import FeatureDictionary

    done = run_cli(["run", *tiny_overrides(tmp_path / "run")])
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    sae_dir, dictionary = run / "saes" / TINY_SAE_NAME, run / "dictionaries" / TINY_SAE_NAME
    metrics = json.loads((sae_dir / "metrics.json").read_text())
    assert metrics["info"]["target"]["kind"] == "held_out_documents"
    assert 0 < metrics["metrics"]["fvu"] < 1
    assert metrics["metrics"]["l0"] == pytest.approx(8.0)
    assert (run / "report.md").is_file()
    for line in (f"SAE {TINY_SAE_NAME}: {sae_dir}", f"feature dictionary: {dictionary}",
                 f"run report: {run / 'report.md'}"):
        assert line in done.stdout
    assert "CE recovered" in done.stdout and "times: harvest" in done.stdout
    assert re.search(r"trained to 15360 tokens in [\d.]+ s: setup [\d.]+ s, steps [\d.]+ s", done.stderr)
    with FeatureDictionary.open(dictionary) as opened:
        assert len(opened) == 256
        assert opened.metrics is not None and opened.metrics["metrics"]["fvu"] == metrics["metrics"]["fvu"]


def test_evaluate_on_a_store_writes_metrics_where_asked(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m.json"
    done = run_cli(["evaluate", str(tiny_run.sae_dir), tiny_run.store_url, "evaluate.downstream=false",
                    "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads(out.read_text())
    assert written["info"]["target"]["kind"] == "store"
    assert "ce_recovered" not in written["metrics"]
    assert "fvu" in done.stdout and str(out) in done.stdout
    assert not (tiny_run.sae_dir / "metrics.json").exists()


def test_analyze_a_store_into_a_chosen_directory(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sae_dir = tmp_path / "saes" / TINY_SAE_NAME
    shutil.copytree(tiny_run.sae_dir, sae_dir)
    out = tmp_path / "dictionary"
    done = run_cli(["analyze", str(sae_dir), tiny_run.store_url, "evaluate.downstream=false",
                    "analyze.top_n=3", "analyze.device=cpu", "evaluate.device=cpu", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"feature dictionary: {out}" in done.stdout
    assert (out / "features.sqlite").is_file() and (out / "sae" / "cfg.json").is_file()
    assert (sae_dir / "metrics.json").is_file()  # evaluated first, since it had no metrics


@pytest.mark.parametrize("stage", ["evaluate", "analyze"])
def test_a_directory_that_is_not_an_sae_is_one_clear_line(stage: str, tmp_path: Path) -> None:
    done = run_cli([stage, str(tmp_path), "evaluate.downstream=false"])
    assert done.returncode == 2
    assert f"saeworks {stage}: error:" in done.stderr and "is not an SAE directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_sae_of_another_model_is_refused_naming_both(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sae_dir = tmp_path / "other"
    shutil.copytree(tiny_run.sae_dir, sae_dir)
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    cfg["metadata"]["model_name"] = "EleutherAI/pythia-70m"
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    (sae_dir / "metrics.json").write_text("{}")  # even an evaluated SAE is checked before analysis
    done = run_cli(["analyze", str(sae_dir), tiny_run.store_url, "--out", str(tmp_path / "d")])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "EleutherAI/pythia-70m" in done.stderr and "HuggingFaceTB/SmolLM2-135M-Instruct" in done.stderr
    assert not (tmp_path / "d").exists()
