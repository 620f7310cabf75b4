"""Bad input to `saeworks harvest`: one line naming the field and the fix, exit 2, no usable store."""

from __future__ import annotations

from pathlib import Path

import pytest

from saeworks.activations.store import ActivationStore
from saeworks.cli import EXIT_USER_ERROR, main
from tests.helpers import DEMO_CONFIG, small_harvest_overrides


def harvest_error(capsys: pytest.CaptureFixture[str], run_dir: Path, **overrides: object) -> str:
    """Run a harvest that must fail; return its one-line error and check no store was made."""
    code = main(["harvest", str(DEMO_CONFIG), *small_harvest_overrides(run_dir, **overrides)])
    assert code == EXIT_USER_ERROR
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after any loading progress bar
    assert message.startswith("saeworks harvest: error: ")
    assert not (run_dir / "activations.zarr").exists()
    return message


@pytest.mark.parametrize(
    ("hooks", "expected"),
    [
        ("[blocks.15.hook_resid]", "unknown hook point 'blocks.15.hook_resid'"),
        ("[blocks.30.hook_resid_post]", "layer 30 is out of range, the model has 30 layers"),
        ("[blocks.x.hook_resid_post]", "unknown hook point"),
    ],
)
def test_bad_hook_lists_the_valid_names(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                        hooks: str, expected: str) -> None:
    message = harvest_error(capsys, tmp_path, **{"harvest.hooks": hooks})
    assert expected in message
    assert "blocks.{L}.hook_resid_post" in message and "L in 0..29" in message


def test_missing_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    message = harvest_error(capsys, tmp_path, **{"data.path": tmp_path / "nowhere.jsonl"})
    assert "data.path: no such file or directory" in message and "nowhere.jsonl" in message


def test_empty_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    message = harvest_error(capsys, tmp_path, **{"data.path": empty})
    assert "data.path" in message and "no text" in message


def test_dataset_without_the_text_field(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text('{"body": "some words here"}\n')
    message = harvest_error(capsys, tmp_path, **{"data.path": data})
    assert "data.text_field" in message and "'text'" in message and "body" in message


def test_context_size_above_the_model_maximum(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    message = harvest_error(capsys, tmp_path, **{"data.context_size": 10_000,
                                                 "harvest.max_tokens": 20_000})
    assert "data.context_size: 10000 exceeds the model's maximum of 8192" in message
    assert "set data.context_size=8192 or less" in message  # the model's own limit, not a smaller one


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"harvest.max_tokens": "lots"}, "harvest.max_tokens: expected an integer, got 'lots'"),
        ({"harvest.max_tokens": -5}, "harvest.max_tokens: must be positive"),
        ({"harvest.max_tokns": 5}, "unknown config field 'harvest.max_tokns'"),
        ({"model.dtype": "float8"}, "model.dtype: 'float8' is not one of"),
        ({"harvest.store_dtype": "int8"}, "harvest.store_dtype: 'int8' is not one of"),
        ({"data.context_size": 1}, "data.context_size: must be at least 2"),
        ({"model.name": "./no/such/model"}, "model.name: no such directory"),
    ],
)
def test_malformed_config_values_name_the_field(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                override: dict[str, object], expected: str) -> None:
    assert expected in harvest_error(capsys, tmp_path, **override)


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["harvest", str(tmp_path / "missing.yaml")]) == EXIT_USER_ERROR
    assert "does not exist" in capsys.readouterr().err


def test_store_from_another_configuration_is_refused(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    """A different context size must never extend or overwrite an existing store."""
    tiny = {"harvest.max_tokens": 128}
    assert main(["harvest", str(DEMO_CONFIG), *small_harvest_overrides(tmp_path, **tiny)]) == 0
    capsys.readouterr()
    before = ActivationStore.open(str(tmp_path / "activations.zarr")).read_rows(
        "blocks.2.hook_resid_post", 0, 128)
    overrides = small_harvest_overrides(tmp_path, **tiny, **{"data.context_size": 32})
    assert main(["harvest", str(DEMO_CONFIG), *overrides]) == EXIT_USER_ERROR
    message = capsys.readouterr().err
    assert "another configuration" in message and "context_size: 64 in the store, 32 now" in message
    after = ActivationStore.open(str(tmp_path / "activations.zarr"))
    assert after.complete and after.context_size == 64
    assert after.read_rows("blocks.2.hook_resid_post", 0, 128).equal(before)


def test_corrupt_store_metadata_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    store = tmp_path / "activations.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{not json")
    code = main(["harvest", str(DEMO_CONFIG), *small_harvest_overrides(tmp_path)])
    assert code == EXIT_USER_ERROR
    assert "cannot be read as a store" in capsys.readouterr().err
