"""`saeworks steer` and `saeworks.steer_completions(...)`: default and steered completions from a dictionary,
as a user runs them, and the one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import saeworks
from saeworks import cli
from saeworks.steer.generate import generate
from saeworks.steer.settings import GenerationSettings

PROMPT = "The Python interpreter reads a script and"


def steer_cli(capsys: pytest.CaptureFixture[str], dictionary: Path, *args: str) -> tuple[int, str, str]:
    status = cli.main(["steer", str(dictionary), "--dtype", "float32", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_prints_default_and_steered_side_by_side(capsys: pytest.CaptureFixture[str],
                                                     tiny_dictionary: Path) -> None:
    status, out, err = steer_cli(capsys, tiny_dictionary, "--prompt", PROMPT, "--feature", "11=+4",
                                 "--feature", "12=clamp:0", "--max-new-tokens", "8", "--temperature", "0")
    assert status == 0, err
    assert "DEFAULT" in out and "STEERED" in out and f"prompt: {PROMPT!r}" in out
    assert "feature 11=+4:" in out and "feature 12=clamp:0:" in out
    assert [line for line in out.splitlines() if line.startswith("mean logprob")] == [
        line for line in out.splitlines() if "| mean logprob" in line]  # one prompt, one footer


def test_cli_json_matches_the_python_api(capsys: pytest.CaptureFixture[str], tiny_dictionary: Path,
                                         embedded_model: Any, embedded_tokenizer: Any) -> None:
    status, out, err = steer_cli(capsys, tiny_dictionary, "--prompt", PROMPT, "--prompt", "Hello",
                                 "--feature", "11=+4", "--max-new-tokens", "6", "--seed", "5",
                                 "--temperature", "0.8", "--logprobs", "3", "--json")
    assert status == 0, err
    printed = json.loads(out)
    assert [r["prompt"] for r in printed["results"]] == [PROMPT, "Hello"]
    api = saeworks.steer_completions(tiny_dictionary, [PROMPT, "Hello"], "11=+4", dtype="float32",
                                     max_new_tokens=6, seed=5, temperature=0.8, n_logprobs=3)
    for row, result in zip(printed["results"], api, strict=True):
        assert row["steered"]["token_ids"] == result.steered.token_ids
        assert row["default"]["token_ids"] == result.default.token_ids
        assert len(row["steered"]["logprobs"][0]["top"]) == 3
    # the default column is the plain model's own completion with the same seed
    plain = generate(embedded_model, embedded_tokenizer, PROMPT, [],
                     GenerationSettings(max_new_tokens=6, seed=5, temperature=0.8))[0]
    assert printed["results"][0]["default"]["token_ids"] == plain.token_ids


def test_api_takes_an_open_dictionary_and_intervention_objects(tiny_dictionary: Path) -> None:
    with saeworks.open_dictionary(tiny_dictionary) as dictionary:
        session = saeworks.SteeringSession.open(dictionary, dtype="float32")
        objects = session.interventions(["11=orthogonal:0"], positions="generated")
        (by_object,) = saeworks.steer_completions(dictionary, PROMPT, *objects, max_new_tokens=5,
                                                  temperature=0)
        (by_spec,) = saeworks.steer_completions(dictionary, PROMPT, "11=orthogonal:0", positions="generated",
                                    max_new_tokens=5, temperature=0)
        assert by_object.steered.token_ids == by_spec.steered.token_ids
        assert by_object.steered.token_ids[0] == by_object.default.token_ids[0]  # prompt untouched
        assert isinstance(objects[0].source.sae.W_dec, torch.Tensor)


@pytest.mark.parametrize(("args", "expected"), [
    (["--feature", "999=+2"], "999 does not exist: topk-k8-256 has 256 features, ids 0 to 255"),
    (["--feature", "3=wobble:1"], "valid methods: additive, projection_cap, orthogonal, clamp, zero, mean"),
    (["--feature", "3=+2", "--method", "zero"], "takes no value"),
    (["--feature", "3=resample"], "--resample-from"),
    (["--feature", "3=+2", "--positions", "middle"], "kept, generated"),
    (["--feature", "3=+2", "--top-p", "0"], "top_p=0.0"),
    (["--vector", "missing.safetensors@blocks.3.hook_resid_post=+1"], "not a readable safetensors"),
    ([], "nothing to steer"),
])
def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tiny_dictionary: Path,
                                          args: list[str], expected: str) -> None:
    status, out, err = steer_cli(capsys, tiny_dictionary, "--prompt", PROMPT, "--max-new-tokens", "2", *args)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("saeworks steer: error: ") and expected in err, err


def test_a_prompt_longer_than_the_context_is_refused(capsys: pytest.CaptureFixture[str],
                                                     tiny_dictionary: Path) -> None:
    status, _, err = steer_cli(capsys, tiny_dictionary, "--prompt", "word " * 9000, "--feature", "3=+1")
    assert status == 2 and "the model reads at most 8192" in err and "never truncated" in err


def test_not_a_dictionary(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = steer_cli(capsys, tmp_path / "nothing", "--prompt", "x", "--feature", "3=+1")
    assert status == 2 and "no feature dictionary" in err and err.count("\n") == 1


def test_steer_eval_cli_prints_the_table_and_writes_json_and_png(
        capsys: pytest.CaptureFixture[str], tiny_dictionary: Path, tiny_run: Any, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The weather today is\n\nMy favourite thing is\n")
    out = tmp_path / "eval"
    status = cli.main(["steer-eval", str(tiny_dictionary), "--feature", "11", "--coefficients", "0,4",
                       "--prompts", str(prompts), "--max-new-tokens", "4", "--store", tiny_run.store_url,
                       "--dtype", "float32", "--out", str(out)])
    printed, err = capsys.readouterr()
    assert status == 0, err
    lines = printed.splitlines()
    rows = [line.split()[:2] for line in lines if line.split()[:1] in (["unsteered"], ["prompt"], ["feature"],
                                                                         ["diffmean"])]
    assert ["unsteered", "-"] in rows and ["prompt", "-"] in rows
    assert [r for r in rows if r[0] in ("feature", "diffmean")][1:] == [  # after the title: 2 x 2 rows
        ["feature", "0"], ["feature", "4"], ["diffmean", "0"], ["diffmean", "4"]]
    saved = json.loads((out / "steer_eval.json").read_text())
    assert saved["feature"] == 11 and saved["prompts"] == ["The weather today is", "My favourite thing is"]
    assert (out / "steer_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("args", "expected"), [
    (["--feature", "999"], "256 features"),
    (["--feature", "3", "--method", "clamp"], "method='clamp'"),
    (["--feature", "3", "--coefficients", "0,x"], "comma-separated numbers"),
    (["--feature", "3", "--prompts", "missing.txt"], "missing.txt"),
])
def test_steer_eval_bad_input(capsys: pytest.CaptureFixture[str], tiny_dictionary: Path, args: list[str],
                              expected: str) -> None:
    status = cli.main(["steer-eval", str(tiny_dictionary), *args])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and err.count("\n") == 1 and expected in err, err
