"""The configuration reference (docs/config.md), generated from config.py's docstrings.

    python -m qlora_lab.configdoc > docs/config.md

Each config dataclass documents its fields in its docstring, one entry per field, as
`name: text` at the docstring's left margin (continuation lines indented), or
`a / b / c: text` for fields that share one text. tests/test_docs.py fails when a field has no
entry or when docs/config.md differs from what this module renders.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Literal, Union

from qlora_lab import config

# `name: text` or `a / b: text` at the docstring's left margin.
_ENTRY = re.compile(r"^(?P<names>[A-Za-z_]\w*(?: / [A-Za-z_]\w*)*): (?P<text>.*)$")

GENERATOR_COMMAND = "python -m qlora_lab.configdoc > docs/config.md"
HEADER = (f"<!-- Generated from src/qlora_lab/config.py by `{GENERATOR_COMMAND}`; edit the "
          "docstrings there, not this file. -->")
USAGE = ("Each key below is `section.key` in a `--set` override, and `key:` under `section:` in "
         "a YAML file given to `--config` ([configs/demo.yaml](../configs/demo.yaml) is a "
         "commented example). `qlora-lab train --config runs/x/config.yaml` repeats a run.")


@dataclasses.dataclass(frozen=True)
class SectionDoc:
    """One config section as documented: its summary, field texts and any other prose."""

    name: str
    cls: type
    summary: str
    field_docs: dict[str, str]
    notes: str


def sections() -> list[tuple[str, type]]:
    """(YAML section name, dataclass) for every section of RunConfig, in declaration order."""
    hints = typing.get_type_hints(config.RunConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(config.RunConfig)]


def parse_section(name: str, cls: type) -> SectionDoc:
    """Split `cls`'s docstring into its summary paragraph and one text per documented field."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    blank = lines.index("") if "" in lines else len(lines)
    summary = " ".join(line.strip() for line in lines[:blank])
    known = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, list[str]] = {}
    notes: list[str] = []
    current: list[str] | None = None
    for line in lines[blank:]:
        if not line.strip():
            current = None
            continue
        match = _ENTRY.match(line)
        names = match["names"].split(" / ") if match else []
        if names and all(n in known for n in names):
            current = [match["text"].strip()]
            for n in names:
                docs[n] = current  # shared list: a continuation line reaches every name
        elif current is not None and line.startswith(" "):
            current.append(line.strip())
        else:
            current = None
            notes.append(line.strip())
    return SectionDoc(name, cls, summary, {k: " ".join(v) for k, v in docs.items()},
                      " ".join(notes))


def undocumented_fields() -> list[str]:
    """`section.key` of every config field without a `name: text` entry in its docstring."""
    missing = []
    for name, cls in sections():
        doc = parse_section(name, cls)
        missing += [f"{name}.{f.name}" for f in dataclasses.fields(cls)
                    if f.name not in doc.field_docs]
    return missing


def format_type(annotation: Any) -> str:
    """A field's type in Markdown, as a reader writes its value: `int`, `str` or `null`, one of
    `"nf4"`, `"fp4"`. No `|`: it would split a Markdown table cell."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f'`"{a}"`' if isinstance(a, str) else f"`{a}`"
                                     for a in typing.get_args(annotation))
    if origin is Union or isinstance(annotation, types.UnionType):
        return " or ".join("`null`" if a is type(None) else format_type(a)
                           for a in typing.get_args(annotation))
    return f"`{getattr(annotation, '__name__', annotation)}`"


def format_default(value: Any) -> str:
    """A default as it would be written in YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null (unset)"
    if value == "":
        return '"" (empty)'
    return str(value)


def render_config_reference() -> str:
    """The full text of docs/config.md."""
    intro = inspect.cleandoc(config.__doc__ or "")
    out = ["# Configuration reference", "", HEADER, "", intro, "", USAGE, ""]
    for name, cls in sections():
        doc = parse_section(name, cls)
        hints = typing.get_type_hints(cls)
        out += [f"## `{name}`", "", f"`{cls.__name__}`: {doc.summary}", ""]
        if doc.notes:
            out += [doc.notes, ""]
        out += ["| key | type | default |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"| [`{name}.{f.name}`](#{name}{f.name}) | "
                       f"{format_type(hints[f.name])} | `{format_default(default)}` |")
        out.append("")
        for f in dataclasses.fields(cls):
            out += [f"### `{name}.{f.name}`", "",
                    doc.field_docs.get(f.name, "*Undocumented: add a line to the docstring.*"),
                    ""]
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render_config_reference(), end="")
