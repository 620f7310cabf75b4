"""The reference of a config dataclass, read from its source: every field's name, type, default, doc.

A field is documented by the string literal right under it (the attribute-docstring convention,
as in EleutherAI's sparsify); Python keeps no such attribute, so the class source is parsed:

    max_tokens: int = 1_000_000           <- ast.AnnAssign
    \"\"\"Token budget (rounded ...).\"\"\"     <- ast.Expr holding a str constant

Fields typed as a dataclass are sections, listed with their own fields under dotted names
(`train.reader.seed`); a field typed as a list of dataclasses lists its item's fields with `[]`
(`train.saes[].k`). `saeworks config [SECTION]` prints this reference.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

from saeworks.sae.configio import ConfigError


class FieldDoc(NamedTuple):
    """One config field as a user sees it: `train.saes[].k`, `int`, `32`, its docstring."""

    name: str
    type: str
    default: str
    """The default as Python writes it; "" for a section (its fields carry the defaults)."""
    doc: str
    section: bool
    """A dataclass field or a list of dataclasses: its own fields follow it."""


def field_docstrings(cls: type) -> dict[str, str]:
    """`{field name: docstring}` of a dataclass and its bases; a field without one is absent."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):  # bases first, so a subclass's docstring wins
        docs.update(_own_docstrings(klass))
    return docs


@functools.cache
def _own_docstrings(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (built in, or defined interactively)
        return {}
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef)
    docs = {}
    for field, after in zip(node.body, node.body[1:], strict=False):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[field.target.id] = _one_paragraph(after.value.value)
    return docs


def _one_paragraph(docstring: str) -> str:
    """The docstring on one line; a line that ends in a hyphenated word joins the next unspaced."""
    text = ""
    for line in inspect.cleandoc(docstring).splitlines():
        line = line.strip()
        joint = "" if not text or (text.endswith("-") and text[-2:-1].isalnum()) else " "
        text += joint + line
    return text


def describe(cls: type, prefix: str = "") -> list[FieldDoc]:
    """Every field of dataclass `cls`, sections recursively, in declaration order."""
    return list(_describe(cls, prefix))


def _describe(cls: type, prefix: str) -> Iterator[FieldDoc]:
    hints = typing.get_type_hints(cls)
    docs = field_docstrings(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        hint, name, doc = hints[field.name], prefix + field.name, docs.get(field.name, "")
        item = _list_item(hint)
        if _is_dataclass_type(hint):
            yield FieldDoc(name, type_name(hint), "", doc, section=True)
            yield from _describe(hint, name + ".")
        else:
            yield FieldDoc(name, type_name(hint), show(_default(field)), doc, section=item is not None)
            if item is not None:
                yield from _describe(item, name + "[].")


def sections(cls: type) -> list[str]:
    """Dotted names of the sections of `cls`: its dataclass and list-of-dataclass fields, nested."""
    return [doc.name for doc in describe(cls) if doc.section]


def section_docs(cls: type, section: str | None = None) -> list[FieldDoc]:
    """The fields of `section` (the section itself first), or every field when it is None."""
    docs = describe(cls)
    if section is None:
        return docs
    valid = sections(cls)
    if section not in valid:
        raise ConfigError(f"unknown config section {section!r}; valid sections: {', '.join(valid)}")
    inside = (section + ".", section + "[].")
    return [doc for doc in docs if doc.name == section or doc.name.startswith(inside)]


def render(docs: list[FieldDoc], width: int = 100) -> str:
    """Terminal text: `name  type = default` on one line, the docstring wrapped and indented below."""
    blocks = []
    for doc in docs:
        head = f"{doc.name}  {doc.type}" + (f" = {doc.default}" if doc.default else "")
        body = textwrap.fill(doc.doc or "(undocumented)", width=width, initial_indent="    ",
                             subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
        blocks.append(f"{head}\n{body}")
    return "\n\n".join(blocks)


def type_name(hint: Any) -> str:
    """A type as a user reads it: `int`, `str | None`, `list[SAEConfig]`, `'zstd' | 'lz4'`."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is type(None) or hint is None:
        return "None"
    if hint is Any:
        return "Any"
    if origin is Literal:
        return " | ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is not None:
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{', '.join(type_name(arg) for arg in args)}]" if args else base
    return getattr(hint, "__name__", str(hint))


def show(value: Any) -> str:
    """A default as Python writes it; a dataclass shows only the fields that differ from its defaults."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = [f"{f.name}={show(getattr(value, f.name))}" for f in dataclasses.fields(value)
                   if f.init and getattr(value, f.name) != _default(f)]
        return f"{type(value).__name__}({', '.join(changed)})"
    if isinstance(value, list | tuple):
        items = ", ".join(show(item) for item in value)
        return f"[{items}]" if isinstance(value, list) else f"({items})"
    if value is dataclasses.MISSING:
        return "(required)"
    return repr(value)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _list_item(hint: Any) -> type | None:
    """The item type of `list[X]` or `list[X] | None` when X is a dataclass, else None."""
    args = [arg for arg in get_args(hint) if arg is not type(None)] if get_origin(hint) in (
        Union, types.UnionType) else [hint]
    if len(args) == 1 and get_origin(args[0]) is list:
        item = get_args(args[0])[0] if get_args(args[0]) else None
        return item if _is_dataclass_type(item) else None
    return None
