"""One home per data kind: what differs between images, tables and sequences.

Each kind is one module (image.py, table.py, sequence.py) with a :class:`DataKind` that reads
and recognises its sources, splits and encodes them, describes their validation, says how the
network scales its input, whether augmentation applies, which model families read it and
what it adds to the model card. Stages ask ``kinds.get(meta.kind)``; they never branch on it.

A new kind is one new module, with no edit to a stage: name its class in params.yaml as
``ingest.kind: "package.module:Class"``. That reference is the kind's name in meta.json, so
every later stage, in this process or in its own (``python -m components.<stage>`` under
DVC), imports the same module. :func:`register` adds a kind under a short name instead, for
this process only.
"""

from __future__ import annotations

import importlib
import re

from components.kinds.base import DataKind, Prepared

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

_registry: dict[str, DataKind] = {}


class UnknownKind(ValueError):
    """A data kind that is neither built in, registered, nor an importable plugin."""


def register(kind: DataKind | type[DataKind], name: str | None = None) -> DataKind:
    """Make ``kind`` (a class or an instance) answer to ``name`` (default: its own name)."""
    instance = kind() if isinstance(kind, type) else kind
    key = name or instance.name
    instance.name = key  # the name meta.json records is the one it was found by
    _registry[key] = instance
    return instance


def names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*BUILTIN, *_registry]))


def get(name: str) -> DataKind:
    """The kind called ``name``: built in, registered, or ``package.module:Class``."""
    if name in _registry:
        return _registry[name]
    reference = BUILTIN.get(name) or (name if PLUGIN.match(name) else None)
    if reference is None:
        raise UnknownKind(
            f"unknown data kind {name!r}; expected one of {names()} or a plugin "
            "'package.module:Class'"
        )
    module_name, attr = reference.split(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownKind(f"data kind {name!r}: cannot import {reference} ({exc})") from None
    if not (isinstance(found, type) and issubclass(found, DataKind)):
        raise UnknownKind(f"data kind {name!r}: {reference} is not a DataKind subclass")
    return register(found, name)


def detect(cfg) -> str:
    """``ingest.kind``, or for ``auto`` the first kind that recognises ``ingest.source``."""
    if cfg.kind != "auto":
        try:
            get(cfg.kind)  # fail here, naming the param, rather than deep in a stage
        except UnknownKind as exc:
            raise UnknownKind(f"ingest.kind: {exc}") from None
        return cfg.kind
    return next((k for k in AUTO_ORDER if get(k).recognises(cfg.source)), FALLBACK)


__all__ = ["DataKind", "Prepared", "UnknownKind", "detect", "get", "names", "register"]
