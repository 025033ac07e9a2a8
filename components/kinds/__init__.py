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

from components.kinds.base import DataKind, Prepared
from components.kinds.registry import (
    AUTO_ORDER,
    BUILTIN,
    FALLBACK,
    PLUGIN,
    UnknownKind,
    is_known,
    lookup,
    names,
    register,
)


def get(name: str) -> DataKind:
    """The kind called ``name``: built in, registered, or ``package.module:Class``."""
    known = lookup(name)
    if known is not None:
        return known
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


__all__ = [
    "AUTO_ORDER",
    "BUILTIN",
    "FALLBACK",
    "PLUGIN",
    "DataKind",
    "Prepared",
    "UnknownKind",
    "detect",
    "get",
    "is_known",
    "names",
    "register",
]
