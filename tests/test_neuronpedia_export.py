"""The Neuronpedia export read back as Neuronpedia's importer reads it: gzip JSON lines, every
feature once and in order, 1,024 (here 16) per batch, the fields it needs with the dictionary's
values; and no OUT_DIR that looks complete after a failed or killed export."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from saeworks.cli import main
from saeworks.eval.dictionary import FeatureDictionary
from saeworks.neuronpedia_export import ExportError, export_neuronpedia
from tests.helpers import REPO

SMALL_BATCH = 16
FEATURE_FIELDS = {
    "modelId": str, "layer": str, "index": str, "maxActApprox": float, "frac_nonzero": float,
    "pos_str": list, "pos_values": list, "neg_str": list, "neg_values": list,
    "freq_hist_data_bar_heights": list, "freq_hist_data_bar_values": list,
    "topkCosSimIndices": list, "topkCosSimValues": list,
}
ACTIVATION_FIELDS = {"id": str, "modelId": str, "layer": str, "index": str, "tokens": list, "values": list,
                     "maxValue": float, "maxValueTokenIndex": int, "minValue": float, "creatorId": str}
# The fields of Neuronpedia's tables (its db_models and prisma schema): the importer creates these
# four records field by field, so they must hold these names and no others.
METADATA_FIELDS = {
    "release.jsonl": {"name", "description", "descriptionShort", "creatorName", "creatorNameShort",
                      "creatorEmail", "creatorId", "visibility", "isNewUi", "featured", "urls",
                      "defaultSourceSetName", "defaultSourceId", "defaultUmapSourceIds", "createdAt"},
    "model.jsonl": {"id", "displayName", "displayNameShort", "creatorId", "tlensId", "dimension",
                    "visibility", "defaultSourceSetName", "defaultSourceId", "inferenceEnabled", "instruct",
                    "layers", "neuronsPerLayer", "owner", "website", "createdAt", "updatedAt"},
    "sourceset.jsonl": {"modelId", "name", "creatorId", "creatorName", "creatorEmail", "hasDashboards",
                        "visibility", "description", "type", "urls", "releaseName", "defaultOfModelId",
                        "defaultRange", "defaultShowBreaks", "showDfa", "showCorrelated",
                        "showHeadAttribution", "showUmap", "createdAt"},
    "source.jsonl": {"id", "modelId", "setName", "creatorId", "hasDashboards", "inferenceEnabled",
                     "inferenceHosts", "saelensConfig", "saelensRelease", "saelensSaeId", "hfRepoId",
                     "hfFolderId", "visibility", "defaultOfModelId", "hasUmap", "hasUmapLogSparsity",
                     "hasUmapClusters", "num_prompts", "num_tokens_in_prompt", "dataset", "notes",
                     "createdAt"},
}


def _lines(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _batches(directory: Path) -> list[list[dict[str, Any]]]:
    """The records of every batch file in `directory`, batch 0 first; checks the names are
    batch-0.jsonl.gz .. batch-N.jsonl.gz with none missing."""
    names = sorted((p.name for p in directory.iterdir()), key=lambda n: int(re.findall(r"\d+", n)[0]))
    assert names == [f"batch-{i}.jsonl.gz" for i in range(len(names))]
    return [_lines(directory / name) for name in names]


@pytest.fixture(scope="module")
def small_export(tiny_dictionary: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("np") / "export"
    export_neuronpedia(tiny_dictionary, out, features_per_batch=SMALL_BATCH, progress=False)
    return out


def test_every_feature_once_in_order_with_the_dictionarys_values(tiny_dictionary: Path,
                                                                 small_export: Path) -> None:
    batches = _batches(small_export / "features")
    with FeatureDictionary.open(tiny_dictionary, readonly=True) as d:
        assert len(batches) == -(-len(d) // SMALL_BATCH) > 2
        assert [len(b) for b in batches[:-1]] == [SMALL_BATCH] * (len(batches) - 1)
        ids = [int(r["index"]) for b in batches for r in b]
        assert ids == list(range(len(d)))
        for b, batch in enumerate(batches):
            first = b * SMALL_BATCH
            assert [int(r["index"]) for r in batch] == list(range(first, first + len(batch)))
        for record in (r for b in batches for r in b):
            f = d.feature(int(record["index"]))
            for name, kind in FEATURE_FIELDS.items():
                assert isinstance(record[name], kind), (name, record[name])
            assert "activations" not in record
            assert record["maxActApprox"] == f.max_activation and record["frac_nonzero"] == f.density
            assert (record["pos_str"], record["pos_values"]) == ([t for t, _ in f.logit_positive],
                                                                 [v for _, v in f.logit_positive])
            assert (record["neg_str"], record["neg_values"]) == ([t for t, _ in f.logit_negative],
                                                                 [v for _, v in f.logit_negative])
            assert len(record["pos_str"]) == len(record["pos_values"]) > 0
            assert len(record["neg_str"]) == len(record["neg_values"]) > 0
            heights, values = record["freq_hist_data_bar_heights"], record["freq_hist_data_bar_values"]
            assert heights == f.histogram and sum(heights) == f.count == record["count"]
            assert len(values) == len(heights) and values == sorted(values)
            assert values[0] > 0 and values[-1] < f.max_activation
            assert record["topkCosSimIndices"] == [j for j, _ in f.neighbours]
            assert record["topkCosSimValues"] == [c for _, c in f.neighbours]
            assert record["label"] == f.label and record["creatorId"]


def test_activations_are_the_dictionarys_contexts(tiny_dictionary: Path, small_export: Path) -> None:
    batches = _batches(small_export / "activations")
    seen: set[str] = set()
    with FeatureDictionary.open(tiny_dictionary, readonly=True) as d:
        features = [r for b in _batches(small_export / "features") for r in b]
        by_feature: dict[int, list[dict[str, Any]]] = {}
        for b, batch in enumerate(batches):
            for record in batch:
                assert int(record["index"]) // SMALL_BATCH == b  # beside its feature's batch
                by_feature.setdefault(int(record["index"]), []).append(record)
        assert sorted(by_feature) == [i for i in range(len(d)) if d.feature(i).contexts]
        for i, records in by_feature.items():
            f = d.feature(i)
            assert len(records) == len(f.contexts)
            for record, context in zip(records, f.contexts, strict=True):
                for name, kind in ACTIVATION_FIELDS.items():
                    assert isinstance(record[name], kind), (name, record[name])
                assert (record["modelId"], record["layer"]) == (features[i]["modelId"], features[i]["layer"])
                assert record["tokens"] == context.tokens and record["values"] == context.activations
                assert len(record["tokens"]) == len(record["values"])
                assert record["maxValue"] == max(context.activations)
                assert record["values"][record["maxValueTokenIndex"]] == record["maxValue"]
                assert record["qualifyingTokenIndex"] == context.focus
                assert record["id"] not in seen
                seen.add(record["id"])


def test_metadata_and_labels_are_neuronpedias_records(tiny_dictionary: Path, small_export: Path) -> None:
    meta = {}
    for name, fields in METADATA_FIELDS.items():
        lines = (small_export / name).read_text().splitlines()
        assert len(lines) == 1
        meta[name] = json.loads(lines[0])
        assert set(meta[name]) == fields, name
    model, source = meta["model.jsonl"], meta["source.jsonl"]
    sourceset, release = meta["sourceset.jsonl"], meta["release.jsonl"]
    feature = _lines(small_export / "features" / "batch-0.jsonl.gz")[0]
    assert feature["modelId"] == model["id"] == source["modelId"] == sourceset["modelId"]
    assert feature["layer"] == source["id"] == f"3-{source['setName']}"
    assert source["setName"] == sourceset["name"]
    assert feature["sourceSetName"] == sourceset["name"] and sourceset["releaseName"] == release["name"]
    assert re.fullmatch(r"[a-z0-9\-]+", release["name"]) and isinstance(model["layers"], int)
    explanations = [r for b in _batches(small_export / "explanations") for r in b]
    with FeatureDictionary.open(tiny_dictionary, readonly=True) as d:
        assert [int(r["index"]) for r in explanations] == [i for i in range(len(d)) if not d.feature(i).dead]
        for r in explanations:
            assert r["description"] == d.feature(int(r["index"])).label and r["layer"] == source["id"]
            assert r["authorId"] and r["typeName"] is None


def test_default_batches_hold_1024_features_and_the_same_records(tiny_dictionary: Path, small_export: Path,
                                                                 tmp_path: Path) -> None:
    summary = export_neuronpedia(tiny_dictionary, tmp_path / "np", progress=False)
    assert summary.batches == 1 and summary.features == 256
    for kind in ("features", "activations", "explanations"):
        (whole,) = _batches(tmp_path / "np" / kind)
        assert whole == [r for b in _batches(small_export / kind) for r in b], kind
    assert summary.activations == sum(map(len, _batches(small_export / "activations")))


def test_user_labels_only(tiny_dictionary: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_dictionary, tmp_path / "dictionary"))
    with FeatureDictionary.open(copy) as d:
        d.set_label(5, "closing parenthesis")
    summary = export_neuronpedia(copy, tmp_path / "user", labels="user", progress=False)
    (batch,) = _batches(tmp_path / "user" / "explanations")
    assert summary.explanations == 1 and [(r["index"], r["description"]) for r in batch] == \
        [("5", "closing parenthesis")]
    assert "user" in batch[0]["notes"]
    assert _lines(tmp_path / "user" / "features" / "batch-0.jsonl.gz")[5]["label"] == "closing parenthesis"
    export_neuronpedia(copy, tmp_path / "none", labels="none", progress=False)
    assert not (tmp_path / "none" / "explanations").exists()


def test_refused_outputs_are_one_line_errors(tiny_dictionary: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"not empty.*--force"):
        export_neuronpedia(tiny_dictionary, taken, progress=False)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_neuronpedia(tiny_dictionary, tmp_path / "file", progress=False)
    with pytest.raises(ExportError, match="is a file, not a directory"):
        export_neuronpedia(tiny_dictionary, tmp_path / "file" / "export", progress=False)
    with pytest.raises(ExportError, match="holds the dictionary"):
        export_neuronpedia(tiny_dictionary, tiny_dictionary, force=True, progress=False)
    with pytest.raises(ExportError, match="at least 1"):
        export_neuronpedia(tiny_dictionary, tmp_path / "zero", features_per_batch=0, progress=False)
    capsys.readouterr()
    assert main(["export", "neuronpedia", str(tiny_dictionary), str(taken), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saeworks export: error:") and "--force" in err and "\n" not in err
    assert main(["export", "neuronpedia", str(tmp_path / "missing"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "no feature dictionary" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_failed_export_leaves_nothing_that_looks_complete(tiny_dictionary: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from saeworks.service import records

    real = records.feature_record

    def fail_midway(dictionary: Any, feature: Any) -> dict[str, Any]:
        if feature.id == 3 * SMALL_BATCH + 2:  # some batches are already written
            raise RuntimeError("disk fell off")
        return real(dictionary, feature)

    monkeypatch.setattr(records, "feature_record", fail_midway)
    with pytest.raises(RuntimeError, match="disk fell off"):
        export_neuronpedia(tiny_dictionary, tmp_path / "np", features_per_batch=SMALL_BATCH, progress=False)
    assert list(tmp_path.iterdir()) == []  # no OUT_DIR, no scratch left beside it
    previous = tmp_path / "previous"
    monkeypatch.setattr(records, "feature_record", real)
    export_neuronpedia(tiny_dictionary, previous, features_per_batch=128, progress=False)
    before = sorted(str(p.relative_to(previous)) for p in previous.rglob("*"))
    monkeypatch.setattr(records, "feature_record", fail_midway)
    with pytest.raises(RuntimeError):
        export_neuronpedia(tiny_dictionary, previous, features_per_batch=SMALL_BATCH, force=True,
                           progress=False)
    assert sorted(str(p.relative_to(previous)) for p in previous.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["previous"]


def test_a_killed_export_is_not_published_and_the_next_run_cleans_up(
        tiny_dictionary: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "np"
    args = ["export", "neuronpedia", str(tiny_dictionary), str(out), "--features-per-batch", "100"]
    killed = subprocess.run([sys.executable, "-m", "saeworks", *args], capture_output=True, text=True,
                            timeout=300, cwd=REPO, env={**os.environ, "SAEWORKS_FAULT": "publish:ready"})
    assert killed.returncode == -signal.SIGKILL  # every file written, killed just before the rename
    assert not out.exists() and [p.name.startswith(".np.partial@") for p in tmp_path.iterdir()] == [True]
    assert main(args) == 0
    done = capsys.readouterr()
    assert "wrote 256 features (3 batches)" in done.out and "export neuronpedia" in done.err  # the bar
    assert [p.name for p in tmp_path.iterdir()] == ["np"]  # the dead writer's scratch is gone
    assert sorted(p.name for p in (out / "features").iterdir()) == [f"batch-{i}.jsonl.gz" for i in range(3)]


def test_a_dead_feature_is_exported_without_contexts_or_its_auto_label(tmp_path: Path) -> None:
    from tests.dictionary_helpers import build

    directory, analysis = build(tmp_path)  # feature 1 never fired
    summary = export_neuronpedia(directory, tmp_path / "out", progress=False)
    (features,) = _batches(tmp_path / "out" / "features")
    (activations,) = _batches(tmp_path / "out" / "activations")
    (explanations,) = _batches(tmp_path / "out" / "explanations")
    dead = features[1]
    assert dead["index"] == "1" and dead["frac_nonzero"] == 0 and dead["maxActApprox"] == 0
    assert sum(dead["freq_hist_data_bar_heights"]) == 0 and dead["dead"] is True
    assert "1" not in {r["index"] for r in activations} and "1" not in {r["index"] for r in explanations}
    assert summary.features == analysis.d_sae and summary.explanations == analysis.d_sae - 1
