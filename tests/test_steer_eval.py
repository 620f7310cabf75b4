"""The steering evaluation on the tiny run's real SAE and dictionary: scores follow their stated
formula, coefficient 0 is the unsteered model, steering raises the concept, DiffMean is the mean
difference of the store rows, results round-trip through JSON, and bad inputs fail in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from saeworks.activations.hooks import capture_activations
from saeworks.activations.store import TOKEN_IDS, ActivationStore
from saeworks.eval.dictionary import FeatureDictionary, FeatureNotFoundError
from saeworks.sae.errors import SaeworksError
from saeworks.steer.evaluation import (
    FORMULA,
    JSON_FILE,
    PLOT_FILE,
    SteerEvalError,
    SteerEvalSettings,
    SteeringEvaluation,
    diffmean_selection,
    diffmean_vector,
    evaluate_steering,
    parse_coefficients,
    score_continuations,
)
from saeworks.steer.generate import prompt_ids
from saeworks.steer.interventions import FeatureSource
from saeworks.steer.prompts import BUILTIN_PROMPTS, PromptsError, load_prompts

PROMPTS = ("Here is a short story about", "My favourite thing to do on weekends is",
           "I have always wondered why")
STRONG = 8.0
SETTINGS = SteerEvalSettings(coefficients=(0.0, STRONG), prompts=PROMPTS, max_new_tokens=8)


def chosen_feature(dictionary: FeatureDictionary) -> int:
    """The densest feature whose most frequent activating token is a newline with indentation:
    steered, the model writes indentation, on which the feature fires again (at layer 3 features
    are mostly about the current token; a plain-space feature does not do this)."""
    return next(s.id for s in dictionary.top_features(len(dictionary))
                if s.top_tokens and "\n" in s.top_tokens[0][0] and not s.top_tokens[0][0].strip())


@pytest.fixture(scope="module")
def dictionary(tiny_dictionary: Path) -> Any:
    with FeatureDictionary.open(tiny_dictionary, readonly=True) as d:
        yield d


@pytest.fixture(scope="module")
def result(dictionary: FeatureDictionary, tiny_run: Any, embedded_model: Any,
           embedded_tokenizer: Any) -> SteeringEvaluation:
    """One evaluation, shared by the tests that only read it (about 20 s on 2 cores)."""
    return evaluate_steering(dictionary, chosen_feature(dictionary), SETTINGS, model=embedded_model,
                             tokenizer=embedded_tokenizer, store_url=tiny_run.store_url)


SCORES = ("n_tokens", "fire_fraction", "mean_activation", "mean_activation_fraction", "loss", "loss_ratio",
          "concept_score", "fluency_score", "combined", "examples")


def test_coefficient_zero_is_the_unsteered_model(result: SteeringEvaluation) -> None:
    unsteered = result.row("unsteered")
    assert unsteered.loss_ratio == 1.0 and unsteered.fluency_score == 1.0
    for variant in ("feature", "diffmean"):
        zero = result.row(variant, 0.0)
        assert zero.loss_ratio == 1.0
        assert {k: getattr(zero, k) for k in SCORES} == {k: getattr(unsteered, k) for k in SCORES}
    assert unsteered.n_tokens > 0 and math.isfinite(unsteered.loss)


def test_steering_raises_the_concept(result: SteeringEvaluation) -> None:
    zero, strong = result.row("feature", 0.0), result.row("feature", STRONG)
    assert strong.fire_fraction > zero.fire_fraction
    assert strong.mean_activation_fraction > zero.mean_activation_fraction
    assert strong.examples != zero.examples  # the text changed
    assert result.row("diffmean", STRONG).examples != zero.examples


def test_scores_follow_the_stated_formula(result: SteeringEvaluation) -> None:
    reference = result.row("unsteered").loss
    assert [(r.variant, r.coefficient) for r in result.rows] == [
        ("unsteered", None), ("feature", 0.0), ("feature", STRONG), ("diffmean", 0.0), ("diffmean", STRONG),
        ("prompt", None)]
    for r in result.rows:
        assert r.concept_score == r.fire_fraction and 0 <= r.fire_fraction <= 1
        assert r.loss_ratio == pytest.approx(r.loss / reference, rel=1e-12)
        assert r.fluency_score == pytest.approx(min(1.0, reference / r.loss), rel=1e-12)
        c, f = r.concept_score, r.fluency_score
        assert r.combined == pytest.approx(0.0 if c == 0 or f == 0 else 2 * c * f / (c + f), rel=1e-12)
        assert r.mean_activation_fraction == pytest.approx(r.mean_activation / result.max_activation)
        assert len(r.examples) == SETTINGS.n_examples and r.examples[0][0] == PROMPTS[0]
    feature_rows = result.variant_rows("feature")
    assert result.best == max(feature_rows, key=lambda r: (r.combined, -(r.coefficient or 0))).coefficient
    assert result.best_by_variant["feature"] == result.best and "diffmean" in result.best_by_variant
    assert result.skipped == {}


def test_scores_are_the_clean_models(dictionary: FeatureDictionary, embedded_model: Any,
                                     embedded_tokenizer: Any) -> None:
    """The concept activation and loss of a continuation, computed directly: one forward for the
    loss, a forward cut at the hook and the SAE's encode for the activation."""
    source = FeatureSource.from_dictionary(dictionary)
    feature = chosen_feature(dictionary)
    contexts = [prompt_ids(embedded_tokenizer, p, True) for p in PROMPTS[:2]]
    continuations = [embedded_tokenizer(" the cat sat on the mat", add_special_tokens=False)["input_ids"],
                     embedded_tokenizer(" and then", add_special_tokens=False)["input_ids"]]
    scored = score_continuations(embedded_model, source.sae, source.hook, feature, contexts, continuations)
    for context, tokens, got in zip(contexts, continuations, scored, strict=True):
        ids = torch.tensor([context + tokens])
        p, n = len(context), len(tokens)
        with torch.no_grad():
            logits = embedded_model(input_ids=ids).logits[0].float()
            x = capture_activations(embedded_model, ids, [source.hook])[source.hook][0]
            acts = source.sae.encode(x.float())[p:, feature]
        nll = -torch.log_softmax(logits[p - 1:p + n - 1], dim=-1).gather(1, ids[0, p:, None]).squeeze(1)
        assert torch.allclose(got.nll, nll, atol=1e-4)
        assert torch.allclose(got.activations, acts, atol=1e-4)


def test_diffmean_is_the_mean_difference_of_the_store_rows(dictionary: FeatureDictionary, tiny_run: Any,
                                                           result: SteeringEvaluation) -> None:
    source = FeatureSource.from_dictionary(dictionary)
    feature = chosen_feature(dictionary)
    store = ActivationStore.open(tiny_run.store_url)
    selection = diffmean_selection(store, source.first_kept, None)
    found = diffmean_vector(source.sae, store, source.hook, feature, selection, batch_rows=100)
    # By hand: every row, the store's exclusions and the SAE's first kept position, one encode.
    x = store.read_rows(source.hook, 0, store.n_tokens).float()
    tokens = torch.from_numpy(store.array(TOKEN_IDS)[:].astype("int64"))
    excluded = store.attrs.get("excluded", {})
    first = max(int(excluded.get("first_positions", 0)), source.first_kept)
    keep = (torch.arange(store.n_tokens) % store.context_size >= first)
    keep &= ~torch.isin(tokens, torch.tensor(excluded.get("token_ids", []), dtype=torch.long))
    x = x[keep]
    with torch.no_grad():
        fires = source.sae.encode(x)[:, feature] > 0
    expected = x[fires].double().mean(0) - x[~fires].double().mean(0)
    assert found.n_rows == int(keep.sum()) and found.n_firing == int(fires.sum()) > 0
    assert torch.allclose(found.vector.double(), expected, atol=1e-5)
    # The evaluation read the same rows (the default cap is above the tiny store's size).
    assert result.diffmean["rows"] == found.n_rows and result.diffmean["rows_firing"] == found.n_firing
    decoder_norm = float(source.sae.W_dec[feature].detach().norm())
    assert result.diffmean["scaled_norm"] == pytest.approx(result.max_activation * decoder_norm, rel=1e-6)
    assert result.diffmean["raw_norm"] == pytest.approx(float(expected.norm()), rel=1e-5)


def test_write_round_trips(result: SteeringEvaluation, tmp_path: Path) -> None:
    paths = result.write(tmp_path / "out")
    assert paths == {"json": tmp_path / "out" / JSON_FILE, "plot": tmp_path / "out" / PLOT_FILE}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert data["formula"] == FORMULA and data["feature"] == result.feature
    back = SteeringEvaluation.from_json(data)
    assert back.rows == result.rows and back.best == result.best and back.settings == result.settings
    assert back.to_json() == result.to_json()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [JSON_FILE, PLOT_FILE]  # no scratch left


def test_table_has_a_line_per_row(result: SteeringEvaluation) -> None:
    lines = result.table().splitlines()
    assert lines[1].split() == ["variant", "coef", "tokens", "fires", "act/max", "loss", "ratio", "combined"]
    assert [line.split()[:2] for line in lines[2:2 + len(result.rows)]] == [
        ["unsteered", "-"], ["feature", "0"], ["feature", "8"], ["diffmean", "0"], ["diffmean", "8"],
        ["prompt", "-"]]
    assert lines[-1].startswith("best coefficient: feature")


def test_diffmean_skipped_without_a_store(dictionary: FeatureDictionary, embedded_model: Any,
                                          embedded_tokenizer: Any, tmp_path: Path) -> None:
    settings = SteerEvalSettings(coefficients=(1.0,), prompts=PROMPTS[:1], max_new_tokens=2)
    found = evaluate_steering(dictionary, chosen_feature(dictionary), settings, model=embedded_model,
                              tokenizer=embedded_tokenizer, store_url=str(tmp_path / "missing.zarr"))
    assert [r.variant for r in found.rows] == ["unsteered", "feature", "prompt"]
    assert "missing.zarr" in found.skipped["diffmean"] and "diffmean" not in found.best_by_variant
    assert found.table().splitlines()[-1].startswith("skipped diffmean: ")


def test_prompts_files(tmp_path: Path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("First prompt\n\n   \nSecond one \n")
    assert load_prompts(text) == ("First prompt", "Second one")
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "A "}\n\n"B\\n"\n')
    assert load_prompts(lines) == ("A ", "B\n")
    assert parse_coefficients("0, 1,2.5,-4") == (0.0, 1.0, 2.5, -4.0)
    assert len(BUILTIN_PROMPTS) == 12 and SteerEvalSettings().prompts is None


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    assert isinstance(err.value, SaeworksError)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"method": "clamp"}, ["method='clamp'", "additive, projection_cap, orthogonal"]),
    ({"max_new_tokens": -1}, ["max_new_tokens=-1", ">= 1"]),
    ({"coefficients": ()}, ["coefficients is empty"]),
    ({"coefficients": (1.0, float("nan"))}, ["finite"]),
    ({"top_p": 0.0}, ["top_p=0.0"]),
    ({"prompts": ("ok", "  ")}, ["blank"]),
])
def test_bad_settings(kwargs: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(SaeworksError) as err:
        SteerEvalSettings(**kwargs)
    message = one_line(err)
    assert all(w in message for w in words), message


@pytest.mark.parametrize("text", ["", "1,,2", "1,x", "1,1", "inf"])
def test_bad_coefficients(text: str) -> None:
    with pytest.raises(SteerEvalError) as err:
        parse_coefficients(text)
    assert "coefficient" in one_line(err)


def test_bad_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(PromptsError) as err:
        load_prompts(empty)
    assert "holds no prompts" in one_line(err)
    with pytest.raises(PromptsError) as err:
        load_prompts(tmp_path / "absent.txt")
    assert "no prompts file" in one_line(err)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "A"}\n{"text": "B"}\n')
    with pytest.raises(PromptsError) as err:
        load_prompts(broken)
    assert "line 2" in one_line(err)


def test_bad_feature(dictionary: FeatureDictionary, embedded_model: Any, embedded_tokenizer: Any) -> None:
    with pytest.raises(FeatureNotFoundError) as err:
        evaluate_steering(dictionary, 256, SETTINGS, model=embedded_model, tokenizer=embedded_tokenizer)
    assert "256 features" in one_line(err)
    dead = [f for f in range(len(dictionary)) if dictionary.feature(f).dead]
    if dead:
        with pytest.raises(SteerEvalError) as err:
            evaluate_steering(dictionary, dead[0], SETTINGS, model=embedded_model,
                              tokenizer=embedded_tokenizer)
        assert "never fired" in one_line(err)
