"""Notebook manners: importing saeworks leaves matplotlib's backend alone, and features and
dictionaries print as one line and render as shaded HTML contexts."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

from saeworks.eval.dictionary import HTML_CONTEXTS, Feature, FeatureDictionary
from saeworks.eval.features import FeatureAnalysis
from tests.dictionary_helpers import build, synthetic_analysis
from tests.helpers import REPO

SPAN = re.compile(r"<span( class='focus')? style='background-color: rgba\(255, 128, 0, ([0-9.]+)\)[^']*' "
                  r"title='[^']*'>(.*?)</span>", re.S)
"""One shaded token of Feature._repr_html_: (focus mark, alpha, escaped text)."""

BACKEND_CHECK = """
import sys
import matplotlib
matplotlib.use("svg")
import saeworks, saeworks.eval.plots, saeworks.eval.dictionary, saeworks.eval.report
from saeworks.eval.plots import density_histogram
density_histogram([0.0, 0.1, 0.01], sys.argv[1])
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_importing_and_plotting_keeps_the_notebook_backend(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", BACKEND_CHECK, str(tmp_path / "d.png")], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "False"]  # backend unchanged, pyplot never imported
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # still a PNG (Agg renders it)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FeatureAnalysis]:
    return build(tmp_path_factory.mktemp("notebook"))


def shaded(feature: Feature) -> list[list[tuple[bool, float, str]]]:
    """Per context item of the HTML: its (is focus, alpha, escaped text) spans."""
    items = re.findall(r"<li>(.*?)</li>", feature._repr_html_(), re.S)
    return [[(bool(m), float(a), text) for m, a, text in SPAN.findall(item)] for item in items]


def test_feature_repr_is_one_line_with_id_and_label(built: tuple[Path, FeatureAnalysis]) -> None:
    with FeatureDictionary.open(built[0], readonly=True) as d:
        feature = d.feature(3)
        text = repr(feature)
        assert "\n" not in text and len(text) < 200
        assert text.startswith("Feature(id=3, ") and f"label={feature.label!r}" in text
        assert f"density={feature.density:.3g}" in text
        assert f"max_activation={feature.max_activation:.4g}" in text


def test_dictionary_repr_names_path_sae_hook_and_sizes(built: tuple[Path, FeatureAnalysis]) -> None:
    directory, analysis = built
    d = FeatureDictionary.open(directory, readonly=True)
    d.close()  # repr reads dictionary.json's facts only, so a closed dictionary still prints
    assert repr(d) == (f"FeatureDictionary({str(directory)!r}, sae='tiny', hook='blocks.0.hook_resid_post', "
                       f"features=12, tokens={analysis.n_tokens:,})")


def test_feature_html_shades_each_token_of_its_top_contexts(built: tuple[Path, FeatureAnalysis]) -> None:
    with FeatureDictionary.open(built[0], readonly=True) as d:
        feature = d.feature(0)
        page = feature._repr_html_()
    assert f"<b>Feature 0</b> <code>{html.escape(feature.label)}</code>" in page
    assert f"max {feature.max_activation:.4g}" in page and f"density {feature.density:.3g}" in page
    items = shaded(feature)
    assert len(items) == len(feature.top_contexts) == 4  # top contexts only, no band samples
    for context, spans in zip(feature.top_contexts, items, strict=True):
        assert [text for _, _, text in spans] == [html.escape(t) for t in context.tokens]
        assert [i for i, (focus, _, _) in enumerate(spans) if focus] == [context.focus]
        for (_, alpha, _), value in zip(spans, context.activations, strict=True):
            assert alpha == pytest.approx(min(max(value / feature.max_activation, 0), 1), abs=1e-3)
    alphas = sorted((value, alpha) for context, spans in zip(feature.top_contexts, items, strict=True)
                    for value, (_, alpha, _) in zip(context.activations, spans, strict=True))
    (low, low_alpha), (high, high_alpha) = alphas[0], alphas[-1]
    assert high > low and high_alpha > low_alpha  # a higher activation is a darker shade
    assert items[0][feature.top_contexts[0].focus][1] == 1.0  # the feature's maximum: full shade


def test_feature_html_escapes_markup_in_tokens_and_labels() -> None:
    from saeworks.eval.dictionary import Context

    context = Context("top", 0, None, 2.0, 5, 0, 5, 1, [1, 2, 3], ["<b>", " & ", "\"'"], [0.5, 2.0, 0.0])
    feature = Feature(7, 0.25, 3, 1.0, 2.0, [], [], "<script>", "user", [], [], [], [], [context])
    page = feature._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert shaded(feature) == [[(False, 0.25, "&lt;b&gt;"), (True, 1.0, " &amp; "),
                                (False, 0.0, "&quot;&#x27;")]]


def test_feature_html_shows_at_most_the_first_top_contexts(tmp_path: Path) -> None:
    directory, _ = build(tmp_path, synthetic_analysis(top_n=HTML_CONTEXTS + 2))
    with FeatureDictionary.open(directory, readonly=True) as d:
        feature = d.feature(0)
    assert len(feature.top_contexts) == HTML_CONTEXTS + 2 and len(shaded(feature)) == HTML_CONTEXTS
    dead = Feature(1, 0.0, 0, 0.0, 0.0, [], [], "dead", "auto", [], [], [], [], [])
    assert "no contexts" in dead._repr_html_() and "\n" not in repr(dead)
