"""Plots are real PNG files; reports show what they should and every link points at a file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import matplotlib.image
import pytest
import torch

from saeworks.eval import plots
from saeworks.eval.dictionary import REPORT_FILE, FeatureDictionary
from saeworks.eval.report import dictionary_report, run_report
from saeworks.sae.paths import RunLayout
from tests.dictionary_helpers import METRICS, build, synthetic_analysis, tiny_sae_dir
from tests.helpers import umask, unshared_paths

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def links(markdown: Path) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", markdown.read_text())


def assert_links_exist(markdown: Path) -> None:
    for link in links(markdown):
        assert (markdown.parent / link).exists(), link


def test_plots_are_pngs(tmp_path: Path) -> None:
    analysis = synthetic_analysis()
    assert_png(plots.density_histogram(analysis.density, tmp_path / "density.png"))
    assert_png(plots.density_histogram(torch.zeros(4), tmp_path / "all-dead.png"))
    assert_png(plots.activation_histograms(analysis, [0, 1, 2], tmp_path / "a" / "hist.png", {0: "' def'"}))
    assert_png(plots.frontier([("one", 8.0, 0.2)], tmp_path / "one.png"))
    assert_png(plots.frontier([("a", 8, 0.2), ("b", 16, 0.1), ("c", 32, 0.15), ("nan", 4, float("nan"))],
                              tmp_path / "several.png"))


def test_pareto_front_keeps_the_undominated_points() -> None:
    points = [("a", 8, 0.2), ("b", 16, 0.1), ("c", 32, 0.15), ("d", 64, 0.05), ("e", 8, 0.3)]
    assert [p[0] for p in plots.pareto_front(points)] == ["a", "b", "d"]


def test_dictionary_report_shows_metrics_plots_and_contexts(tmp_path: Path) -> None:
    directory, analysis = build(tmp_path)
    report = directory / REPORT_FILE
    text = report.read_text()
    assert "| fvu | 0.21 |" in text and "| ce_recovered | 0.97 |" in text
    assert {"plots/density_histogram.png", "plots/activation_histograms.png"} <= set(links(report))
    assert_links_exist(report)
    for link in links(report):
        assert_png(directory / link)
    densest = int(torch.argmax(analysis.density))
    with FeatureDictionary.open(directory) as d:
        best = d.feature(densest).top_contexts[0]
        assert f"### Feature {densest}: `{d.feature(densest).label}`" in text
    assert "11 alive, 1 dead" in text
    assert best.text() in text and text.count("«") == 10  # one context for each of the top 10
    assert "Feature 1:" not in text  # dead


def test_dictionary_report_without_metrics(tmp_path: Path) -> None:
    directory, _ = build(tmp_path, metrics=None)
    assert "Not evaluated" in (directory / REPORT_FILE).read_text()
    shutil.rmtree(directory / "plots")
    dictionary_report(directory)
    assert links(directory / REPORT_FILE) == []


def _run_with_saes(tmp_path: Path, names: list[str], evaluated: set[str], with_dictionary: set[str]) -> Path:
    layout = RunLayout(tmp_path / "run")
    for i, name in enumerate(names):
        sae_dir = tiny_sae_dir(layout.sae(name))
        if name in evaluated:
            metrics = {"metrics": {"fvu": 0.3 / (i + 1), "l0": 8.0 * (i + 1), "ce_recovered": 0.9,
                                   "kl": 0.1, "dead_fraction": 0.0}, "info": {}}
            (sae_dir / "metrics.json").write_text(json.dumps(metrics))
        if name in with_dictionary:
            from saeworks.activations.config import ModelConfig
            from saeworks.eval.dictionary_build import write_dictionary
            from tests.dictionary_helpers import FakeTokenizer

            write_dictionary(layout.dictionary(name), synthetic_analysis(), sae_dir, FakeTokenizer(),
                             ModelConfig(), "blocks.0.hook_resid_post", METRICS)
    return layout.root


def test_run_report_with_one_sae(tmp_path: Path) -> None:
    root = _run_with_saes(tmp_path, ["topk-k8"], {"topk-k8"}, {"topk-k8"})
    with umask(0o022):
        report = run_report(root)
    assert report == root / "report.md" and unshared_paths(report) == []  # others can read it
    text = report.read_text()
    assert "report/l0_fvu_frontier.png" in links(report) and "dictionaries/topk-k8/report.md" in links(report)
    assert "| 0.3 | 8 |" in text
    assert_links_exist(report)
    assert_png(root / "report" / "l0_fvu_frontier.png")


@pytest.mark.parametrize("evaluated", [{"a", "c"}, set()])
def test_run_report_with_several_saes(tmp_path: Path, evaluated: set[str]) -> None:
    root = _run_with_saes(tmp_path, ["a", "b", "c"], evaluated, {"a"})
    text = run_report(root).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| [")]
    assert [re.match(r"\| \[(\w+)\]", r).group(1) for r in rows] == ["a", "b", "c"]  # type: ignore[union-attr]
    for row, name in zip(rows, "abc", strict=True):
        assert ("not evaluated" in row) == (name not in evaluated)
        assert ("dictionaries/a/report.md" in row) == (name == "a")
    assert_links_exist(root / "report.md")
    assert (root / "report" / "l0_fvu_frontier.png").exists() == bool(evaluated)
    assert f"{len(evaluated)} evaluated" in text
