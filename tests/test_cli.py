"""The CLI's config commands (`config`, `--print-config`, `--version`) and the field reference.

All fast: nothing here loads a model or runs a stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from saeworks import cli
from saeworks.activations.config import DataConfig, HarvestConfig, ReaderConfig
from saeworks.run_config import RunConfig
from saeworks.sae.config import SAEConfig
from saeworks.sae.configdoc import describe, field_docstrings, sections, show, type_name
from saeworks.sae.configio import load_config, to_dict
from saeworks.sae.version import package_version
from tests.helpers import DEMO_CONFIG

ALL_STAGES = [*cli.STAGES, *cli.SAE_STAGES]


def flat(text: str) -> str:
    """Text with every run of whitespace (line wraps, indents) as one space."""
    return " ".join(text.split())


def default_of(cls: type, name: str) -> object:
    (spec,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def stage_argv(stage: str, tmp_path: Path, *rest: str) -> list[str]:
    """argv of `stage` on the demo config (the SAE stages also take an SAE directory first)."""
    head = [stage, str(tmp_path / "sae")] if stage in cli.SAE_STAGES else [stage]
    return [*head, str(DEMO_CONFIG), *rest]


def test_config_describes_every_field_with_type_default_and_docstring(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config"]) == 0
    out = flat(capsys.readouterr().out)
    doc = flat(field_docstrings(HarvestConfig)["max_tokens"])
    assert "Token budget" in doc
    assert f"harvest.max_tokens int = {default_of(HarvestConfig, 'max_tokens')!r} {doc}" in out
    assert f"data.shuffle_seed int | None = {default_of(DataConfig, 'shuffle_seed')!r} " in out
    compression = default_of(HarvestConfig, "compression")
    assert f"harvest.compression 'zstd' | 'lz4' | 'none' = {compression!r} " in out
    assert "train.saes list[SAEConfig] = [SAEConfig()] " in out
    assert f"train.saes[].k int = {default_of(SAEConfig, 'k')!r} " in out
    assert f"train.reader.seed int = {default_of(ReaderConfig, 'seed')!r} " in out
    for section in sections(RunConfig):
        assert f"{section} " in out


def test_config_section_lists_only_its_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "train.saes"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert names == ["train.saes"] + [f"train.saes[].{f.name}" for f in dataclasses.fields(SAEConfig)]
    assert "train.saes[].k  int" in out


def test_unknown_section_is_one_line_listing_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "trian"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "'trian'" in captured.err
    assert sections(RunConfig) == ["model", "data", "harvest", "train", "train.saes", "train.reader",
                                   "evaluate", "analyze"]
    assert ", ".join(sections(RunConfig)) in captured.err


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_print_config_prints_the_resolved_config_and_runs_nothing(
        stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: object) -> None:
        raise AssertionError(f"--print-config ran the {stage} stage")

    table = cli.STAGES if stage in cli.STAGES else cli.SAE_STAGES
    monkeypatch.setitem(table, stage, (must_not_run, ""))  # type: ignore[arg-type]
    overrides = ["harvest.max_tokens=1234", "train.saes=[{k: 8}]"]
    assert cli.main(stage_argv(stage, tmp_path, *overrides, "--print-config")) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["harvest"]["max_tokens"] == 1234
    # what was printed is the config the stage would have run with, and loads back to it
    expected = load_config(RunConfig, DEMO_CONFIG, overrides)
    assert yaml.safe_load(printed) == to_dict(expected)
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_config(RunConfig, tmp_path / "printed.yaml") == expected


def test_print_config_with_only_overrides_starts_from_the_defaults(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "train.total_tokens=8192", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(RunConfig, None, ["train.total_tokens=8192"]))


@pytest.mark.parametrize("stage", sorted(cli.SAE_STAGES))
def test_a_store_url_holding_an_equals_sign_is_the_target_not_an_override(
        stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = "s3://activations/date=2026-12-01/acts.zarr"  # a Hive-style prefix
    argv = [stage, str(tmp_path / "sae"), url, "evaluate.held_out_tokens=4096", "--print-config"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == f"# store: {url}"
    assert yaml.safe_load(printed)["evaluate"]["held_out_tokens"] == 4096
    # a dotted key is still an override, in the target's place
    assert cli.main([stage, str(tmp_path / "sae"), "evaluate.held_out_tokens=4096", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert not printed.startswith("# store")
    assert yaml.safe_load(printed)["evaluate"]["held_out_tokens"] == 4096


def test_an_override_too_long_for_a_file_name_is_an_override(capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = "x" * 300  # an argument of 308 characters: no file can have that name
    for argv in (["train", f"run_dir={run_dir}"], ["analyze", "sae", f"run_dir={run_dir}"]):
        assert cli.main([*argv, "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["run_dir"] == run_dir


def test_a_config_path_holding_an_equals_sign_is_the_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "sweep=3" / "run.yaml"
    config.parent.mkdir()
    config.write_text("train:\n  total_tokens: 8192\n")
    assert cli.main(["train", str(config), "train.lr=0.002", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(RunConfig, config, ["train.lr=0.002"]))
    assert printed["train"]["total_tokens"] == 8192


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_print_config_with_a_bad_override_exits_2_naming_the_field(
        stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = stage_argv(stage, tmp_path, "harvest.max_tokens=many", "--print-config")
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "harvest.max_tokens: expected an integer, got 'many'" in captured.err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"saeworks {package_version()}"


def test_every_config_field_has_a_docstring() -> None:
    undocumented = [doc.name for doc in describe(RunConfig) if not doc.doc.strip()]
    assert not undocumented, f"config fields without a docstring under them: {undocumented}"


@dataclass
class _Inner:
    """A nested section of the example config."""

    width: int = 4
    """How wide.
    Second line of the docstring."""


@dataclass
class _Example:
    """A config exercising every kind of field the reference shows."""

    mode: Literal["a", "b"] = "a"
    """Which mode: a well-known hyphen-
    ated word across lines."""
    limit: float | None = None
    inner: _Inner = field(default_factory=_Inner)
    """The nested section."""
    items: list[_Inner] = field(default_factory=lambda: [_Inner(), _Inner(width=8)])
    """A list of sections."""
    names: list[str] = field(default_factory=list)
    """Plain strings."""


def test_describe_reads_types_defaults_and_docstrings_from_the_source() -> None:
    docs = {doc.name: doc for doc in describe(_Example)}
    assert list(docs) == ["mode", "limit", "inner", "inner.width", "items", "items[].width", "names"]
    assert docs["mode"].type == "'a' | 'b'" and docs["mode"].default == "'a'"
    assert docs["mode"].doc == "Which mode: a well-known hyphen-ated word across lines."
    assert docs["limit"].type == "float | None" and docs["limit"].doc == ""  # no docstring under it
    assert docs["inner"].section and docs["inner"].default == ""
    assert docs["inner.width"].doc == "How wide. Second line of the docstring."
    assert docs["items"].type == "list[_Inner]" and docs["items"].section
    assert docs["items"].default == "[_Inner(), _Inner(width=8)]"
    assert docs["names"].type == "list[str]" and not docs["names"].section
    assert sections(_Example) == ["inner", "items"]


def test_type_names_and_defaults_read_as_a_user_writes_them() -> None:
    assert type_name(int) == "int" and type_name(str | None) == "str | None"
    assert type_name(list[SAEConfig]) == "list[SAEConfig]"
    assert type_name(Literal["x", "y"] | None) == "'x' | 'y' | None"
    assert type_name(dict[str, float]) == "dict[str, float]"
    assert show(SAEConfig(k=8)) == "SAEConfig(k=8)" and show(0.5) == "0.5"
