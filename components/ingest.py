"""Ingest: read the data source, keep an immutable raw snapshot, make the splits.

``ingest.source`` names the data; ``ingest.kind`` (``auto`` guesses from the source) names the
data kind (components/kinds/) that reads it, splits it and encodes it: images (stratified),
tables (stratified for classes, random for regression), sequences (a time series split in time,
or per-sample sequences). This stage only asks the kind and writes what it returns: the raw
snapshot to ``paths.raw_dir``, the splits and ``meta.json`` to ``paths.prepared_dir``.

Local sources must lie under ``paths.external_dir``: dvc.yaml declares that folder as a
dependency, so adding, changing or removing a file there re-runs ingest and what follows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from components import kinds
from components.config import Params
from components.dataset import (
    SPLITS,
    meta_path,
    raw_path,
    save_arrays,
    save_frame,
    split_path,
    table_path,
)
from components.stage import main

log = logging.getLogger("pipeline.ingest")


@dataclass(frozen=True)
class IngestResult:
    source: str
    n_examples: int
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]


def save(prepared: kinds.Prepared, raw_dir: Path, prepared_dir: Path) -> None:
    """Write the raw snapshot, the splits (and rows as read, if any) and meta.json."""
    rows = prepared.frames is not None
    if rows:
        save_frame(prepared.raw, raw_path(raw_dir, rows=True))
        for split, frame in prepared.frames.items():
            save_frame(frame, table_path(prepared_dir, split))
    else:
        save_arrays(prepared.raw, raw_path(raw_dir, rows=False))
        for split in SPLITS:  # a table's rows from an earlier run would be validated instead
            table_path(prepared_dir, split).unlink(missing_ok=True)
    for split, data in prepared.splits.items():
        save_arrays(data, split_path(prepared_dir, split))
    prepared.meta.save(meta_path(prepared_dir))


def run(params: Params) -> IngestResult:
    paths, cfg = params.paths, params.ingest
    kind = kinds.get(kinds.detect(cfg))
    prepared = kind.prepare(cfg, Path(paths.external_dir))
    save(prepared, Path(paths.raw_dir), Path(paths.prepared_dir))
    log.info("%s", prepared.summary)
    meta = prepared.meta
    return IngestResult(cfg.source, prepared.n_examples, meta.class_names, dict(meta.split_sizes))


if __name__ == "__main__":
    main("ingest", run)
