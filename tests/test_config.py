"""YAML configs and `key=value` overrides map onto the dataclasses, or fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from saeworks.run_config import RunConfig
from saeworks.sae.configio import ConfigError, apply_override, load_config
from tests.helpers import DEMO_CONFIG


def test_demo_config_loads_with_its_documented_values() -> None:
    cfg = load_config(RunConfig, DEMO_CONFIG)
    assert cfg.model.name == "embedded" and cfg.data.context_size == 128
    assert cfg.harvest.hooks == ["blocks.15.hook_resid_post"]
    assert cfg.store_url == str(Path("runs/demo") / "activations.zarr")


def test_dotted_overrides_reach_nested_fields_and_parse_yaml_values() -> None:
    cfg = load_config(RunConfig, DEMO_CONFIG, [
        "harvest.max_tokens=20000", "run_dir=/tmp/elsewhere", "harvest.hooks=[blocks.1.hook_mlp_out]",
        "data.shuffle_seed=null", "harvest.store=s3://bucket/acts.zarr", "harvest.max_tokens=1e5",
    ])
    assert cfg.harvest.max_tokens == 100_000  # last override wins; 1e5 accepted as an integer
    assert cfg.run_dir == "/tmp/elsewhere" and cfg.data.shuffle_seed is None
    assert cfg.harvest.hooks == ["blocks.1.hook_mlp_out"]
    assert cfg.store_url == "s3://bucket/acts.zarr"


def test_single_string_is_accepted_for_a_list_field() -> None:
    cfg = load_config(RunConfig, None, ["harvest.hooks=blocks.3.hook_resid_pre"])
    assert cfg.harvest.hooks == ["blocks.3.hook_resid_pre"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("harvest.batch_size=true", "harvest.batch_size: expected an integer, got True"),
        ("harvest.max_tokens=12.5", "harvest.max_tokens: expected an integer, got 12.5"),
        ("data.prepend_bos=maybe", "data.prepend_bos: expected true or false, got 'maybe'"),
        ("data.exclude_first_positions=500",
         "data.exclude_first_positions: must be in [0, context_size=128)"),
        ("harvest=3", "harvest: expected a mapping of fields"),
        ("modle.name=x", "unknown config field 'modle'"),
        ("harvest.hooks=[]", "harvest.hooks: name at least one hook point"),
        ("novalue", "is not of the form key=value"),
        ("model.device=tpu", "model.device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ],
)
def test_bad_values_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(RunConfig, DEMO_CONFIG, [override])
    assert message in str(caught.value)


def test_unknown_key_in_a_file_lists_the_valid_fields(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("harvest:\n  hook: [blocks.1.hook_resid_post]\n")
    with pytest.raises(ConfigError, match=r"unknown config field 'harvest.hook'; valid fields here: "
                                          r"harvest.hooks, harvest.max_tokens"):
        load_config(RunConfig, path)


def test_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(RunConfig, path)


def test_override_cannot_descend_into_a_value() -> None:
    data = {"run_dir": "x"}
    with pytest.raises(ConfigError, match="'run_dir' is a value, not a section"):
        apply_override(data, "run_dir.sub=1")


@pytest.mark.parametrize(("text", "where"), [
    ("harvest:\n  max_tokens: [1, 2\n", "line 3, column 1: expected ',' or ']'"),
    ("a: b: c\n", "line 1, column 5: mapping values are not allowed here"),
])
def test_invalid_yaml_is_one_line_naming_the_file_and_the_place(tmp_path: Path, text: str,
                                                                 where: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    message = str(err.value)
    assert message.startswith(f"config file {str(path)!r} is not valid YAML: ") and where in message
    assert "\n" not in message and "<unicode string>" not in message
    bad_override = r"override 'harvest.hooks=\[a': cannot read the value: line 1, column 3"
    with pytest.raises(ConfigError, match=bad_override):
        load_config(RunConfig, None, ["harvest.hooks=[a"])
