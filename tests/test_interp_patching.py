"""Activation patching and attribution patching (`saeworks.interp.patching`, issue 11 item 2).

On the embedded model and the tiny dictionary's SAE (blocks.3.hook_resid_post), with an
indirect-object pair the model gets right: clean "... John gave a drink to" → " Mary", corrupted by
swapping the repeated name, so the prompts differ at one position. Identities:
(a) every feature plus the error term at every position recovers the clean metric (1e-4);
(b) the whole hook at every position recovers it (fraction 1), nothing patched gives the corrupted
    metric (fraction 0);
(c) attribution scores add up per position to the whole hook's (the decoder is linear), and the
    top-ranked feature's real patching effect has the estimated sign;
(d) the layer sweep: resid_pre of layer 0 recovers everything at the differing position and nothing
    elsewhere; no cell of the shared prefix moves; a sweep cell equals the single patch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from saeworks.eval.dictionary import FeatureDictionary
from saeworks.interp.patching import (
    SWEEP_KINDS,
    LogitDiff,
    PatchingError,
    PromptPair,
    attribution_patching,
    check_attribution,
    fraction_recovered,
    layer_sweep,
    patch_features,
    patch_hook,
)
from saeworks.sae.errors import SaeworksError
from saeworks.steer.interventions import FeatureSource

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
SWAPPED = 10
"""The one position where the prompts differ (BOS is position 0)."""

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Case:
    model: Any
    tokenizer: Any
    source: FeatureSource
    pair: PromptPair
    metric: LogitDiff


@pytest.fixture(scope="module")
def case(embedded_model: Any, embedded_tokenizer: Any, tiny_dictionary: Path) -> Case:
    with FeatureDictionary.open(tiny_dictionary, readonly=True) as dictionary:
        source = FeatureSource.from_dictionary(dictionary)
    pair = PromptPair.from_text(embedded_tokenizer, CLEAN, CORRUPTED, prepend_bos=source.prepend_bos)
    metric = LogitDiff.of_tokens(embedded_tokenizer, " Mary", " John")
    return Case(embedded_model, embedded_tokenizer, source, pair, metric)


def test_pair_is_tokenised_like_steering(case: Case) -> None:
    assert case.source.prepend_bos
    assert case.pair.clean[0] == case.tokenizer.bos_token_id  # the tokenizer adds none by itself
    assert case.pair.differing() == [SWAPPED]
    assert case.pair.tokens[SWAPPED] == " John" and len(case.pair) == 15


def test_every_feature_and_the_error_recover_the_clean_metric(case: Case) -> None:
    """(a) Error-preserving feature patching, all features + error everywhere: h_corr → h_clean."""
    full = patch_features(case.model, case.source, case.pair, case.metric, error=True)
    assert full.clean > 0 > full.corrupted  # the model gets the pair right, and the corruption flips it
    assert full.patched == pytest.approx(full.clean, abs=1e-4)
    assert full.fraction_recovered == pytest.approx(1.0, abs=1e-4)
    nothing = patch_features(case.model, case.source, case.pair, case.metric, features=[])
    assert nothing.patched == nothing.corrupted and nothing.fraction_recovered == 0.0
    assert json.loads(json.dumps(full.to_json(), allow_nan=False))["fraction_recovered"] == pytest.approx(1.0,
                                                                                                       abs=1e-4)
    assert "recovered 1.000" in full.table()


def test_whole_hook_patching_with_a_custom_metric(case: Case) -> None:
    """(b) The whole hook everywhere recovers the clean metric; no position recovers nothing."""
    mary = case.metric.correct

    def mary_logprob(logits: torch.Tensor) -> torch.Tensor:  # [pos, vocab] -> []
        return logits[-1].log_softmax(dim=-1)[mary]

    everywhere = patch_hook(case.model, case.pair, mary_logprob, case.source.hook)
    assert everywhere.clean > everywhere.corrupted
    assert everywhere.fraction_recovered == pytest.approx(1.0, abs=1e-4)
    assert everywhere.metric == "mary_logprob"
    nowhere = patch_hook(case.model, case.pair, case.metric, case.source.hook, positions=[])
    assert nowhere.patched == nowhere.corrupted and nowhere.fraction_recovered == 0.0
    # The metric reads only the last position of the last residual stream.
    last = patch_hook(case.model, case.pair, case.metric, "blocks.29.hook_resid_post", positions=[-1])
    assert last.fraction_recovered == pytest.approx(1.0, abs=1e-4)


def test_attribution_patching_against_real_patching(case: Case) -> None:
    """(c) Scores decompose the whole hook's score; the top estimate's real effect has its sign."""
    found = attribution_patching(case.model, case.source, case.pair, case.metric)
    assert found.scores.shape == (len(case.pair), case.source.d_sae)
    torch.testing.assert_close(found.scores.sum(dim=1) + found.error_scores, found.hook_scores,
                               rtol=1e-4, atol=1e-4)
    assert found.scores[:SWAPPED].abs().max() == 0  # the shared prefix: clean and corrupted are equal
    check = check_attribution(case.model, case.source, case.pair, case.metric, found, top=20)
    print(check.table())  # the correlation of estimate and real patching, for the record
    assert len(check.entries) == 20 and math.isfinite(check.correlation)
    (top, real), *_ = check.entries
    assert top.score != 0 and real * top.score > 0
    assert check.correlation > 0
    # The batched check patches as patch_features does, one (feature, position) alone.
    alone = patch_features(case.model, case.source, case.pair, case.metric, [top.feature], [top.position])
    assert alone.patched - alone.corrupted == pytest.approx(real, abs=1e-4)
    data = json.loads(json.dumps(check.to_json(), allow_nan=False))
    assert data["entries"][0]["feature"] == top.feature
    assert f"{top.feature:>8}" in found.table(5)


def test_layer_sweep(case: Case, tmp_path: Path) -> None:
    """(d) Layer 0's resid_pre is the embedding: patching it recovers all at the swapped token."""
    last = 29
    sweep = layer_sweep(case.model, case.pair, case.metric, layers=[0, last])
    assert sweep.kinds == SWEEP_KINDS and sweep.layers == (0, last)
    embedding = sweep.recovered("hook_resid_pre")[0]  # [positions]
    assert embedding[SWAPPED] == pytest.approx(1.0, abs=1e-4)
    assert [p for p, value in enumerate(embedding) if value != 0] == [SWAPPED]
    for kind in sweep.kinds:
        assert (sweep.patched[kind][:, :SWAPPED] == sweep.corrupted).all()
    single = patch_hook(case.model, case.pair, case.metric, f"blocks.{last}.hook_resid_pre", [-1])
    assert sweep.patched["hook_resid_pre"][1, -1] == pytest.approx(single.patched, abs=1e-4)
    assert sweep.best(1)[0][3] >= 1.0 - 1e-4  # at least what the swapped embedding recovers
    data = json.loads(json.dumps(sweep.to_json(), allow_nan=False))
    assert data["tokens"] == list(case.pair.tokens) and len(data["fraction_recovered"]["hook_mlp_out"]) == 2
    assert "hook_attn_out" in sweep.table() and "L29" in sweep.table()
    png = sweep.save_png(tmp_path / "sweep.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def refused(call: Any, *words: str, kind: type[SaeworksError] = SaeworksError) -> None:
    """`call()` raises `kind` with a one-line message holding every word."""
    with pytest.raises(kind) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_inputs_are_one_line_errors(case: Case) -> None:
    model, tokenizer, source, pair, metric = case.model, case.tokenizer, case.source, case.pair, case.metric
    longer = CORRUPTED.replace("Mary gave", "Mary Ann gave")
    refused(lambda: PromptPair.from_text(tokenizer, CLEAN, longer), "15 tokens", "16", "pad",
            kind=PatchingError)
    refused(lambda: patch_features(model, source, pair, metric, [1], positions=[15]), "position 15", "0..14")
    refused(lambda: patch_hook(model, pair, LogitDiff(metric.correct, metric.incorrect, -16), source.hook),
            "position -16")
    refused(lambda: LogitDiff.of_tokens(tokenizer, "drink", " John"), "'drink'", "' drink'")
    refused(lambda: patch_features(model, source, pair, metric, [source.d_sae]), f"feature {source.d_sae}",
            f"0 to {source.d_sae - 1}")
    refused(lambda: layer_sweep(model, pair, metric, kinds=["hook_resid_mid"]), "hook_resid_mid",
            "hook_resid_pre", kind=PatchingError)
    refused(lambda: layer_sweep(model, pair, metric, layers=[30]), "[30]", "0..29", kind=PatchingError)
    assert math.isnan(fraction_recovered(1.0, 2.0, 2.0))
