"""YAML run configs mapped onto typed dataclasses, with `key=value` command-line overrides.

Every stage reads its configuration through `load_config`, so an unknown key or a value of the
wrong type is refused in one place, with the dotted name of the field and what would fix it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from saeworks.sae.errors import SaeworksError

T = TypeVar("T")


class ConfigError(SaeworksError, ValueError):
    """A config file or override that cannot be mapped onto the config dataclasses."""


def require(condition: bool, field: str, message: str) -> None:
    """Validation helper for `__post_init__`: raise a ConfigError naming `field` unless true."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML file (or start from defaults when `path` is None), apply overrides, build `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML file")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {yaml_problem(err)}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of fields at top level")
        data = loaded or {}
    for item in overrides:
        apply_override(data, item)
    return from_dict(cls, data)


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what PyYAML found wrong and where (line and column, 1-based), without its
    multi-line excerpt that names the text as "<unicode string>"."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return " ".join(str(err).split())

    def where(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    text = f"{where(err.problem_mark)}: {err.problem}" if err.problem_mark else str(err.problem)
    if err.context:
        text += f" ({err.context}" + (f" at {where(err.context_mark)})" if err.context_mark else ")")
    return text


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is read as a YAML scalar or list."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. harvest.max_tokens=20000)")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: cannot read the value: {yaml_problem(err)}") from err
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every key and value against the type hints."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        valid = ", ".join(prefix + name for name in fields)
        raise ConfigError(f"unknown config field {prefix + unknown[0]!r}; valid fields here: {valid}")
    kwargs = {name: _coerce(hints[name], data[name], prefix + name) for name in data}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a config dataclass (for attributes, logs and checkpoints)."""
    return dataclasses.asdict(config)


def _coerce(hint: Any, value: Any, field: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, field + ".")  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, field)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{field}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple, Sequence):
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{field}: expected a list, got {value!r}")
        item_hint = args[0] if args else Any
        items = [_coerce(item_hint, v, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a mapping, got {value!r}")
        return dict(value)
    return _coerce_scalar(hint, value, field)


def _coerce_scalar(hint: Any, value: Any, field: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{field}: expected true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, str):
        value = _number_or_string(value)  # YAML reads `1e6` (no dot) as a string
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{field}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{field}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{field}: expected a string, got {value!r}")
    raise ConfigError(f"{field}: unsupported config type {hint!r}")


def _number_or_string(text: str) -> float | str:
    try:
        return float(text.replace("_", ""))
    except ValueError:
        return text
