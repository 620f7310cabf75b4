"""The interpretability subcommands as a researcher runs them: tables on stdout, JSON and PNGs
with --out, the same numbers as the Python API, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saeworks.cli import main

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def _json(capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_lens_prints_a_table_and_writes_json_and_png(
        tiny_dictionary: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["lens", str(tiny_dictionary), "--prompt", "The capital of France is", "--target", " Paris"]
    assert main([*args, "--out", str(tmp_path / "lens")]) == 0
    out = capsys.readouterr().out
    assert "logit lens of 'The capital of France is'" in out and "embed" in out
    data = json.loads((tmp_path / "lens" / "lens.json").read_text())
    assert data["layers"][0] == "embed" and len(data["layers"]) == 31  # embeddings + 30 blocks
    assert (tmp_path / "lens" / "lens.png").read_bytes()[:4] == b"\x89PNG"


def test_attribute_json_adds_up_to_the_model_logit(
        tiny_dictionary: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "import os\nimport sys\nfrom collections import"
    assert main(["attribute", str(tiny_dictionary), "--prompt", prompt, "--target", " defaultdict",
                 "--json"]) == 0
    data = _json(capsys)
    assert data["total"] == pytest.approx(data["model_logit"], abs=1e-4)
    assert data["hook"] == "blocks.3.hook_resid_post" and data["features"]


def test_patch_ranks_and_checks_features_and_patches_chosen_ones(
        tiny_dictionary: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pair = ["--clean", CLEAN, "--corrupted", CORRUPTED, "--correct", " Mary", "--incorrect", " John"]
    assert main(["patch", str(tiny_dictionary), *pair, "--top", "5", "--json"]) == 0
    ranked = _json(capsys)
    assert len(ranked["check"]["entries"]) == 5 and ranked["attribution"]
    top = ranked["check"]["entries"][0]
    assert main(["patch", str(tiny_dictionary), *pair, "--features", str(top["feature"]),
                 "--positions", str(top["position"]), "--json"]) == 0
    patched = _json(capsys)["patch"]
    assert patched["patched"] - patched["corrupted"] == pytest.approx(top["real"], abs=1e-4)


def test_bad_interp_input_is_one_line(tiny_dictionary: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["patch", str(tiny_dictionary), "--clean", CLEAN, "--corrupted", CORRUPTED + " now",
                 "--correct", " Mary", "--incorrect", " John"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("saeworks patch: error:") and "tokens" in errors[0]
    assert main(["attribute", str(tiny_dictionary), "--prompt", "x"]) == 2
    assert "--target TOKEN" in capsys.readouterr().err


def test_orthogonalize_a_vector_file_out_of_the_embedded_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vector = torch.randn(576, generator=torch.Generator().manual_seed(0))
    save_file({"direction": vector}, str(tmp_path / "v.safetensors"))
    assert main(["orthogonalize", "embedded", "--vector", str(tmp_path / "v.safetensors"),
                 "--out", str(tmp_path / "edited")]) == 0
    out = capsys.readouterr().out
    assert "lm_head untied" in out and "saved" in out
    worst = float(out.split("residual stream on the check text: ")[1].split()[0])
    assert worst < 1e-4
    config = json.loads((tmp_path / "edited" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["saeworks_orthogonalization"]
    assert main(["orthogonalize", "embedded", "--vector", str(tmp_path / "v.safetensors")[:-3] + "x",
                 "--out", str(tmp_path / "other")]) == 2
    assert not (tmp_path / "other").exists()


def test_attribute_a_feature_to_the_input_tokens(
        tiny_dictionary: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "for i in range(10):"
    assert main(["attribute", str(tiny_dictionary), "--prompt", prompt, "--feature", "0",
                 "--method", "gxi", "--json"]) == 0
    data = _json(capsys)
    assert data["feature"] == 0 and data["method"] == "gradient_x_input"
    assert [t["token"] for t in data["tokens"]][-1].endswith(":")


def test_probe_two_text_files_and_save_a_steerable_direction(
        tiny_dictionary: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from saeworks.interp.probing import code_vs_prose
    from saeworks.steer.interventions import VectorIntervention

    code, prose = code_vs_prose(24)
    (tmp_path / "code.txt").write_text("\n".join(c.replace("\n", " ") for c in code))
    (tmp_path / "prose.txt").write_text("\n".join(prose))
    assert main(["probe", str(tiny_dictionary), "--positive", str(tmp_path / "code.txt"), "--negative",
                 str(tmp_path / "prose.txt"), "--save-direction", str(tmp_path / "d.safetensors"),
                 "--out", str(tmp_path / "probe")]) == 0
    out = capsys.readouterr().out
    assert "'code' vs 'prose'" in out and "saved the diff_means direction" in out
    data = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert data["probe"]["logistic_accuracy"] > 0.75 and data["sparse"]
    vector = VectorIntervention.from_file(tmp_path / "d.safetensors", "blocks.3.hook_resid_post")
    assert vector is not None
