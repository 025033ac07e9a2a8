"""The names of the data kinds: built in, registered in this process, or plugin references.

A leaf module (it imports nothing of ours), so params validation and meta.json can check a
kind's name without importing the kinds themselves, which build on the data layer.
"""

from __future__ import annotations

import re

# Built-in kinds, imported on first use (the image kind needs no pandas, the table no Pillow).
BUILTIN = {
    "image": "components.kinds.image:ImageKind",
    "table": "components.kinds.table:TableKind",
    "sequence": "components.kinds.sequence:SequenceKind",
}
# ``ingest.kind: auto`` asks these in turn; a source none recognises is read as images, whose
# reader names every source it takes.
AUTO_ORDER = ("table", "image")
FALLBACK = "image"
PLUGIN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # "package.module:Class"

_registry: dict = {}  # name -> DataKind instance


class UnknownKind(ValueError):
    """A data kind that is neither built in, registered, nor an importable plugin."""


def register(kind, name: str | None = None):
    """Make ``kind`` (a class or an instance) answer to ``name`` (default: its own name)."""
    instance = kind() if isinstance(kind, type) else kind
    key = name or instance.name
    instance.name = key  # the name meta.json records is the one it was found by
    _registry[key] = instance
    return instance


def names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*BUILTIN, *_registry]))


def lookup(name: str):
    """The kind registered (or already imported) under ``name``, or None."""
    return _registry.get(name)


def is_known(name: str) -> bool:
    """A built-in or registered kind's name, or a well-formed plugin reference (whether it
    imports is checked when the kind is first used: components.kinds.get)."""
    return name in names() or bool(PLUGIN.match(name))
