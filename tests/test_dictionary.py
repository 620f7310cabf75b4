"""The feature dictionary: what is written is what is read back, lookups, labels, errors, atomicity,
and reading new text through a real tiny SAE."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from saeworks.activations.config import ModelConfig
from saeworks.eval import dictionary_build
from saeworks.eval.dictionary import (
    DB_FILE,
    INFO_FILE,
    DictionaryError,
    FeatureDictionary,
    FeatureNotFoundError,
    dictionary_summary,
)
from saeworks.eval.dictionary_build import write_dictionary
from saeworks.eval.features import Contexts, FeatureAnalysis
from saeworks.eval.labels import DEAD_LABEL, auto_label
from tests.dictionary_helpers import METRICS, VOCAB, FakeTokenizer, build, synthetic_analysis, tiny_sae_dir
from tests.helpers import umask, unshared_paths


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FeatureAnalysis]:
    """One dictionary of the default synthetic analysis, for tests that only read it."""
    return build(tmp_path_factory.mktemp("built"))


def expected_top_tokens(analysis: FeatureAnalysis, f: int, before: int = 3) -> list[tuple[str, int]]:
    ids = [int(t) for t, r in zip(analysis.top.token_ids[f, :, before], analysis.top.rows[f], strict=True)
           if r >= 0]
    return [(VOCAB[i], c) for i, c in Counter(ids).most_common(10)]


def test_round_trip_every_field(built: tuple[Path, FeatureAnalysis]) -> None:
    directory, a = built
    with FeatureDictionary.open(directory, readonly=True) as d:
        assert len(d) == a.d_sae == d.info["d_sae"]
        assert d.info["n_tokens"] == a.n_tokens and d.info["hook"] == "blocks.0.hook_resid_post"
        assert d.info["context_before"] == 3 and d.info["model"]["name"] == "embedded"
        assert d.metrics == METRICS
        for f in range(a.d_sae):
            feature = d.feature(f)
            assert feature.id == f and feature.count == int(a.count[f])
            assert feature.density == pytest.approx(float(a.density[f]), rel=1e-12)
            assert feature.mean_activation == pytest.approx(float(a.mean_active[f]), rel=1e-12)
            assert feature.max_activation == float(a.max[f])
            assert [q for q, _ in feature.quantiles] == a.quantile_levels
            assert torch.equal(torch.tensor([v for _, v in feature.quantiles]), a.quantiles[f])
            assert feature.histogram == a.histogram[f].tolist()
            assert feature.histogram_edges[-1] == pytest.approx(float(a.max[f]))
            assert feature.top_tokens == expected_top_tokens(a, f)
            for got, ids, values in ((feature.logit_positive, a.logit_positive_ids, a.logit_positive_values),
                                     (feature.logit_negative, a.logit_negative_ids, a.logit_negative_values),
                                     (feature.neighbours, a.neighbour_ids, a.neighbour_cosines)):
                keys = [VOCAB[i] for i in ids[f]] if got is not feature.neighbours else ids[f].tolist()
                assert [k for k, _ in got] == keys  # float32 values come back exactly
                assert torch.equal(torch.tensor([v for _, v in got]), values[f])
            assert feature.label_source == "auto"
            _check_contexts(feature.top_contexts, a.top, f, "top")
            _check_contexts(feature.band_contexts, a.bands, f, "band")
        assert d.feature(1).dead and d.feature(1).label == DEAD_LABEL and d.feature(1).contexts == []
        assert [c.rank for c in d.feature(2).top_contexts] == [0, 1, 2]  # the empty slot 3 is left out
        assert [(c.rank, c.band) for c in d.feature(2).band_contexts] == [(1, 0), (2, 1), (3, 1)]


def _check_contexts(contexts: list, ctx: Contexts, f: int, kind: str) -> None:
    slots = [n for n in range(ctx.rows.shape[1]) if ctx.rows[f, n] >= 0]
    assert [c.rank for c in contexts] == slots
    for c in contexts:
        n = c.rank
        inside = ctx.token_ids[f, n] >= 0
        assert c.kind == kind and c.row == int(ctx.rows[f, n]) and c.activation == float(ctx.values[f, n])
        assert c.token_ids == ctx.token_ids[f, n][inside].tolist()
        assert c.tokens == [VOCAB[i] for i in c.token_ids]
        assert c.focus == 3 - int(inside.int().argmax())
        assert c.activations[c.focus] == pytest.approx(c.activation, rel=1e-3)
        np.testing.assert_allclose(c.activations, ctx.activations[f, n][inside].numpy(), rtol=1e-3, atol=1e-3)
        assert (c.window, c.position) == (c.row // 8, c.row % 8)
        assert c.text().count("«") == 1 and f"«{c.tokens[c.focus]}»" in c.text()


def test_lookup_by_token_and_search(built: tuple[Path, FeatureAnalysis]) -> None:
    directory, a = built
    with FeatureDictionary.open(directory, readonly=True) as d:
        token, _ = expected_top_tokens(a, 0)[0]
        hits = d.features_for_token(token)
        assert 0 in [h.feature.id for h in hits]
        counts = [h.count for h in hits]
        assert counts == sorted(counts, reverse=True)
        for hit in hits:
            assert (token, hit.count) in d.feature(hit.feature.id).top_tokens
        by_id = d.features_for_token(VOCAB.index(token))
        assert [h.feature.id for h in by_id] == [h.feature.id for h in hits]
        assert d.features_for_token("no such token") == []
        word = re.findall(r"\w+", token)
        if word:
            assert 0 in [s.id for s in d.search(word[0])]
        assert 0 in [s.id for s in d.search(token)]  # verbatim, spaces and punctuation included
        assert all(s.label != DEAD_LABEL for s in d.search(token))
        assert d.search("zzz-nothing") == []
        assert 1 in [s.id for s in d.search("dead")]
        assert len(d.search("'", limit=3)) == 3


def test_set_label_persists_shows_in_search_and_survives_rebuild(tmp_path: Path) -> None:
    directory, a = build(tmp_path)
    with FeatureDictionary.open(directory) as d:
        auto = d.feature(5).label
        d.set_label(5, "  opening parenthesis of a call ")
        assert d.relabel() == 0
    with FeatureDictionary.open(directory) as d:
        assert (d.feature(5).label, d.feature(5).label_source) == ("opening parenthesis of a call", "user")
        assert [s.id for s in d.search("parenthesis")] == [5]
        assert [s.id for s in d.search("parenth")] == [5]  # prefix
        assert [s.id for s in d.search("of a call")] == [5]
    build(tmp_path, a)  # same SAE weights: the user's label is kept
    with FeatureDictionary.open(directory) as d:
        assert d.feature(5).label == "opening parenthesis of a call"
        d.set_label(5, None)
        assert (d.feature(5).label, d.feature(5).label_source) == (auto, "auto")
        assert d.search("parenthesis") == []
    with FeatureDictionary.open(directory, readonly=True) as d, \
            pytest.raises(DictionaryError, match="read-only"):
        d.set_label(5, "x")


def test_out_of_range_id_names_the_valid_range(built: tuple[Path, FeatureAnalysis]) -> None:
    directory, _ = built
    with FeatureDictionary.open(directory, readonly=True) as d:
        for bad in (12, -1, 10**9):
            with pytest.raises(FeatureNotFoundError, match=r"has 12 features, ids 0 to 11") as err:
                d.feature(bad)
            assert isinstance(err.value, IndexError) and isinstance(err.value, DictionaryError)
        with pytest.raises(IndexError):
            d.set_label(12, "x")


def _truncate(directory: Path) -> None:
    db = directory / DB_FILE
    with db.open("r+b") as f:
        f.truncate(db.stat().st_size // 2)


def _garbage(directory: Path) -> None:
    (directory / DB_FILE).write_bytes(b"not a database at all" * 100)


def _future_version(directory: Path) -> None:
    info = json.loads((directory / INFO_FILE).read_text())
    (directory / INFO_FILE).write_text(json.dumps({**info, "format_version": 99}))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: shutil.rmtree(d), "no such directory"),
    (lambda d: [p.unlink() for p in d.rglob("*") if p.is_file()], r"lacks dictionary\.json and features"),
    (lambda d: (d / INFO_FILE).unlink(), r"lacks dictionary\.json"),
    (_truncate, "not a readable SQLite database"),
    (_garbage, "not a readable SQLite database"),
    (_future_version, "format version 99"),
])
def test_not_a_dictionary_says_what_is_wrong(built: tuple[Path, FeatureAnalysis], tmp_path: Path, damage: Any,
                                             message: str) -> None:
    directory = Path(shutil.copytree(built[0], tmp_path / "copy"))
    damage(directory)
    with pytest.raises(DictionaryError, match=message) as err:
        FeatureDictionary.open(directory)
    assert "saeworks analyze SAE_DIR" in str(err.value)


def test_an_sae_directory_is_not_a_dictionary(tmp_path: Path) -> None:
    sae_dir = tiny_sae_dir(tmp_path / "sae")
    with pytest.raises(DictionaryError, match=r"looks like an SAE directory.*saeworks analyze"):
        FeatureDictionary.open(sae_dir)
    with pytest.raises(DictionaryError, match="refusing to replace"):  # and is never overwritten
        write_dictionary(sae_dir, synthetic_analysis(), sae_dir, FakeTokenizer(), ModelConfig(), "blocks.0.x")
    assert sorted(p.name for p in sae_dir.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_failed_write_leaves_nothing_that_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    def crash(directory: Path) -> Path:
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(dictionary_build, "dictionary_report", crash)  # the last step before the rename
    with pytest.raises(RuntimeError, match="killed"):
        build(tmp_path, name="new")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "saes"] == []
    monkeypatch.undo()
    directory, a = build(tmp_path)
    monkeypatch.setattr(dictionary_build, "dictionary_report", crash)
    with pytest.raises(RuntimeError):
        build(tmp_path, synthetic_analysis(seed=1))
    with FeatureDictionary.open(directory) as d:  # the old dictionary is intact
        assert d.feature(0).count == int(a.count[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dict", "saes"]


def test_dictionary_is_readable_by_others_under_umask_022(tmp_path: Path) -> None:
    """Built in scratch and renamed into place, a dictionary (new or replacing one) still gets the
    modes of ordinary files and directories, not tempfile's owner-only ones."""
    with umask(0o022):
        directory, _ = build(tmp_path, name="new")
        assert unshared_paths(directory) == []
        build(tmp_path, synthetic_analysis(seed=1), name="new")
    assert {p.name for p in directory.rglob("*")} >= {"sae", "plots", "features.sqlite", "report.md"}
    assert unshared_paths(directory) == []


def test_summary_lists_alive_features(built: tuple[Path, FeatureAnalysis]) -> None:
    directory, a = built
    lines = dictionary_summary(directory, top=3)
    assert "12 features" in lines[0] and "11 alive, 1 dead" in lines[0]
    densest = int(torch.argmax(a.density))
    assert lines[2].lstrip().startswith(f"#{densest}") and len(lines) == 5


def test_write_speed_and_size_at_a_realistic_shape(tmp_path: Path) -> None:
    """1,024 features of 40 contexts of 33 tokens (a ninth of a 9,216-latent SAE): seconds, ~4 MB."""
    import time

    analysis = synthetic_analysis(1024, top_n=20, bands=4, per_band=5, before=24, after=8, context_size=128,
                                  n_windows=512, vocab=4096, logit_tokens=10, neighbours=10, dead=())
    start = time.perf_counter()
    directory, _ = build(tmp_path, analysis, metrics=None)
    seconds = time.perf_counter() - start
    size = (directory / DB_FILE).stat().st_size
    assert seconds < 15 and size < 100e6 / 9 * 0.7, (seconds, size)
    with FeatureDictionary.open(directory) as d:
        assert len(d.feature(7).contexts) == 40 and d.metrics is None


def test_auto_labels_are_short_and_show_whitespace() -> None:
    assert auto_label([" def", " class"], [" __init__"]) == "' def' ' class' → ' __init__'"
    assert auto_label(["\n", "\t"]) == r"'\n' '\t'"
    assert auto_label([], [" Paris"]) == "→ ' Paris'"
    assert auto_label([" def"], [" x"], dead=True) == DEAD_LABEL
    assert auto_label([], []) == "?"
    long = auto_label(["a" * 50, "b" * 50, "c"], ["d" * 80])
    assert len(long) <= 60 and long.startswith("'aaa") and "→" in long
    assert len(auto_label(["x" * 200])) <= 60


def test_features_on_agrees_with_encoding_by_hand(tiny_run: Any, embedded_model: Any, embedded_tokenizer: Any,
                                                 tmp_path: Path, one_thread: None) -> None:
    from saeworks.activations.hooks import capture_activations
    from saeworks.sae.io import load_sae
    from tests.eval_helpers import TINY_HOOK

    analysis = synthetic_analysis(256, vocab=len(embedded_tokenizer), dead=())
    directory = write_dictionary(tmp_path / "dict", analysis, tiny_run.sae_dir, embedded_tokenizer,
                                 tiny_run.cfg.model, TINY_HOOK)
    text = "The function returns a list of the keys."
    with FeatureDictionary.open(directory) as d:
        d.set_label(3, "my label")
        got = d.features_on(text, top=4)
        labels = {i: d.feature(i).label for i in range(len(d))}
    ids = [embedded_tokenizer.bos_token_id, *embedded_tokenizer(text, add_special_tokens=False)["input_ids"]]
    x = capture_activations(embedded_model, torch.tensor([ids]), [TINY_HOOK])[TINY_HOOK][0]
    with torch.no_grad():
        latents = load_sae(tiny_run.sae_dir).encode(x)
    assert [t.position for t in got] == list(range(1, len(ids)))
    assert "".join(t.token for t in got) == text
    for token in got:
        values, expected = latents[token.position].topk(4)
        assert token.token_id == ids[token.position]
        assert [f.id for f in token.features] == expected[values > 0].tolist()
        np.testing.assert_allclose([f.activation for f in token.features], values[values > 0], rtol=1e-4)
        assert all(f.label == labels[f.id] for f in token.features)
    assert labels[3] == "my label"


def test_dictionary_of_a_real_analysis(tiny_run: Any, embedded_model: Any, embedded_tokenizer: Any,
                                       tmp_path: Path, one_thread: None) -> None:
    """analyze_features over the tiny store → dictionary: every context's tokens are the store's."""
    analysis_module = pytest.importorskip("eval.analysis")
    from saeworks.activations.store import ActivationStore
    from saeworks.sae.io import load_sae
    from tests.eval_helpers import TINY_HOOK

    store = ActivationStore.open(tiny_run.store_url)
    analysis = analysis_module.analyze_features(load_sae(tiny_run.sae_dir), store, TINY_HOOK,
                                                tiny_run.cfg.analyze, embedded_model, "cpu", progress=False)
    directory = write_dictionary(tmp_path / "dict", analysis, tiny_run.sae_dir, embedded_tokenizer,
                                 tiny_run.cfg.model, TINY_HOOK)  # window and position: from the store
    tokens = np.asarray(store.array("token_ids")[:])
    with FeatureDictionary.open(directory) as d:
        alive = [s.id for s in d.top_features(len(d))]
        assert alive and len(alive) == int((analysis.count > 0).sum())
        for f in alive[:: max(1, len(alive) // 20)]:
            for c in d.feature(f).contexts:
                start = c.row - c.focus
                assert c.token_ids == tokens[start:start + len(c.token_ids)].tolist()
                assert c.position == c.row % store.context_size
                assert c.activations[c.focus] == pytest.approx(c.activation, rel=2e-3, abs=2e-3)
