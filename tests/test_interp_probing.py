"""Probing: a built-in contrast with a known answer (Python code vs English prose from the embedded
corpus) separated at a middle layer by the difference of means and the logistic probe, and by
five SAE features; direction files that steering and orthogonalisation read; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from saeworks.eval.dictionary import FeatureDictionary
from saeworks.interp.input_attribution import FeatureSite
from saeworks.interp.probing import (
    DIRECTION_KEY,
    Pooling,
    ProbeError,
    check_direction,
    code_vs_prose,
    fit_probe,
    fit_sparse_probe,
    load_direction,
    pooled_activations,
    probe,
    probe_layers,
    read_texts,
    save_direction,
    sparse_probe,
    split,
)
from saeworks.sae.io import load_sae
from saeworks.steer.interventions import VectorIntervention
from tests.eval_helpers import TINY_HOOK

MIDDLE = "blocks.15.hook_resid_post"
"""The middle of SmolLM2-135M's 30 layers."""
N, MAX_CHARS = 40, 160
LABELS = ("code", "prose")


@pytest.fixture(scope="module")
def contrast() -> tuple[list[str], list[str]]:
    return code_vs_prose(N, MAX_CHARS)


@pytest.fixture(scope="module")
def pooled(embedded_model: Any, embedded_tokenizer: Any, tiny_dictionary: Path,
           contrast: tuple[list[str], list[str]]) -> dict[str, dict[str, torch.Tensor]]:
    """Both classes at the tiny SAE's hook (with its latents) and at the middle layer, one forward."""
    sae = load_sae(tiny_dictionary / "sae")
    return {label: pooled_activations(embedded_model, embedded_tokenizer, texts, [TINY_HOOK, MIDDLE],
                                      Pooling("mean", first_kept=2), sae=sae, name=label)
            for label, texts in zip(LABELS, contrast, strict=True)}


def test_the_built_in_contrast_is_balanced_and_distinct(contrast: tuple[list[str], list[str]]) -> None:
    code, prose = contrast
    assert len(code) == len(prose) == N
    assert len(set(code)) == len(set(prose)) == N
    assert all(0 < len(text) <= MAX_CHARS for text in code + prose)
    assert sum("\n" in text for text in code) > N // 2 and not any("\n" in text for text in prose)


def test_dense_probes_separate_code_from_prose_at_a_middle_layer(pooled: dict[str, dict[str, torch.Tensor]]
                                                                 ) -> None:
    code, prose = pooled["code"][MIDDLE], pooled["prose"][MIDDLE]
    result = fit_probe(code, prose, MIDDLE, labels=LABELS)
    assert (result.n_train, result.n_test) == (60, 20)
    assert result.diff_means_accuracy >= 0.85 and result.logistic_accuracy >= 0.85, result.table()
    # The direction is the difference of the training means, exactly.
    (code_train, _), (prose_train, _) = split(N, 0.25, 0), split(N, 0.25, 1)
    expected = code[code_train].double().mean(0) - prose[prose_train].double().mean(0)
    torch.testing.assert_close(result.direction, expected.float())
    assert json.loads(json.dumps(result.to_json()))["diff_means_accuracy"] == result.diff_means_accuracy
    assert "difference of means" in result.table()


def test_five_sae_features_separate_code_from_prose(pooled: dict[str, dict[str, torch.Tensor]]) -> None:
    result = fit_sparse_probe(pooled["code"]["latents"], pooled["prose"]["latents"], TINY_HOOK,
                              labels=LABELS)
    assert set(result.accuracy) == {1, 2, 5}
    assert result.accuracy[5] >= 0.75, result.table()
    scores = [f.score for f in result.features]
    assert scores == sorted(scores, reverse=True) and len(result.features) == 10
    assert "k=5" in result.table() and result.to_json()["accuracy"]["5"] == result.accuracy[5]


def test_the_text_api_equals_the_tensor_api(embedded_model: Any, embedded_tokenizer: Any,
                                            tiny_dictionary: Path, contrast: tuple[list[str], list[str]],
                                            pooled: dict[str, dict[str, torch.Tensor]]) -> None:
    """sparse_probe and probe_layers read texts as pooled_activations does (10 + 10 texts)."""
    code, prose = contrast[0][:10], contrast[1][:10]
    with FeatureDictionary.open(tiny_dictionary, readonly=True) as dictionary:
        site = FeatureSite.from_dictionary(dictionary, embedded_model, embedded_tokenizer)
        assert (site.hook, site.first_kept) == (TINY_HOOK, 2)
        sparse = sparse_probe(site, code, prose, labels=LABELS)
        labels = dictionary.labels([f.feature for f in sparse.features])
    expected = fit_sparse_probe(pooled["code"]["latents"][:10], pooled["prose"]["latents"][:10], TINY_HOOK,
                                labels=LABELS)
    assert [f.feature for f in sparse.features] == [f.feature for f in expected.features]
    assert sparse.accuracy == expected.accuracy
    assert [f.label for f in sparse.features] == [labels.get(f.feature, "") for f in sparse.features]
    sweep = probe_layers(embedded_model, embedded_tokenizer, code, prose, [1, 3], labels=LABELS)
    single = fit_probe(pooled["code"][TINY_HOOK][:10], pooled["prose"][TINY_HOOK][:10], TINY_HOOK,
                       labels=LABELS)
    assert [r.hook for r in sweep.results] == ["blocks.1.hook_resid_post", TINY_HOOK]
    torch.testing.assert_close(sweep.results[1].direction, single.direction, rtol=1e-4, atol=1e-4)
    assert sweep.results[1].diff_means_accuracy == single.diff_means_accuracy
    assert len(sweep.table().splitlines()) == 4 and len(sweep.to_json()["layers"]) == 2


def test_a_saved_direction_loads_for_steering(tmp_path: Path,
                                              pooled: dict[str, dict[str, torch.Tensor]]) -> None:
    result = fit_probe(pooled["code"][MIDDLE], pooled["prose"][MIDDLE], MIDDLE, labels=LABELS)
    path = result.save_direction(tmp_path / "code.safetensors")
    steering = VectorIntervention.from_file(path, MIDDLE)
    torch.testing.assert_close(steering.vector, result.direction)
    vector, meta = load_direction(path, d_model=576)
    assert meta["hook"] == MIDDLE and meta["kind"] == "diff_means" and meta["unit"] == "false"
    torch.testing.assert_close(vector, result.direction)
    unit = save_direction(tmp_path / "unit.safetensors", result.direction / result.direction.norm(), MIDDLE)
    assert load_direction(unit)[1]["unit"] == "true"
    logistic = result.save_direction(tmp_path / "logistic.safetensors", which="logistic")
    torch.testing.assert_close(VectorIntervention.from_file(logistic, MIDDLE, key=DIRECTION_KEY).vector,
                               result.logistic_direction)


def test_texts_from_files(tmp_path: Path) -> None:
    lines = tmp_path / "texts.txt"
    lines.write_text("first text\n\n  \nsecond text\n")
    assert read_texts(lines) == ["first text", "second text"]
    records = tmp_path / "texts.jsonl"
    records.write_text('{"body": "a"}\n{"body": "b"}\n')
    assert read_texts(records, text_field="body") == ["a", "b"]
    assert read_texts(("x", "y")) == ["x", "y"]


def test_bad_inputs_are_one_line_errors(tmp_path: Path, embedded_model: Any, embedded_tokenizer: Any) -> None:
    def message(call: Any) -> str:
        with pytest.raises(ProbeError) as error:
            call()
        assert "\n" not in str(error.value)
        return str(error.value)

    ones = torch.ones(4, 8)
    assert "no texts" in message(lambda: read_texts([], name="code"))
    assert "code" in message(lambda: probe(embedded_model, embedded_tokenizer, [], ["a b c"], MIDDLE,
                                           labels=LABELS))
    assert "empty text" in message(lambda: read_texts(["a", " "]))
    assert "no such file" in message(lambda: read_texts(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    assert "bad.jsonl:1" in message(lambda: read_texts(tmp_path / "bad.jsonl"))
    assert "at least 2" in message(lambda: fit_probe(ones[:1], ones, MIDDLE))
    assert "widths" in message(lambda: fit_probe(ones, torch.ones(4, 9), MIDDLE))
    assert "each k" in message(lambda: fit_sparse_probe(ones, ones, TINY_HOOK, ks=(9,)))
    assert "width 5" in message(lambda: check_direction(torch.ones(5), d_model=576))
    zero = torch.zeros(576)
    assert "zero vector" in message(lambda: save_direction(tmp_path / "z.safetensors", zero, MIDDLE))
    assert "one vector" in message(lambda: check_direction(torch.ones(2, 3)))
    save_direction(tmp_path / "d.safetensors", torch.ones(8), MIDDLE)
    assert "width 8" in message(lambda: load_direction(tmp_path / "d.safetensors", d_model=576))
    assert "pooling" in message(lambda: Pooling("max"))
    assert "first_kept=2" in message(lambda: pooled_activations(embedded_model, embedded_tokenizer, ["Hi"],
                                                                [MIDDLE]))
