"""Ingest: read the data source, keep an immutable raw snapshot, make the splits.

``ingest.source`` names the data; ``ingest.kind`` (``auto`` guesses from the source) names the
data kind (components/kinds/) that reads it, splits it and encodes it: images (stratified),
tables (stratified for classes, random for regression), sequences (a time series split in time,
or per-sample sequences). This stage only asks the kind and writes what it returns: the raw
snapshot to ``paths.raw_dir``, the splits and ``meta.json`` to ``paths.prepared_dir``.

``ingest.storage`` says how the splits are stored (components/dataset.py): ``memory`` (.npz,
loaded whole), ``shards`` (read a shard at a time by every later stage; a time series' split is
its rows, memory-mapped), or ``auto``: shards when the encoded examples exceed
``ingest.shard_above_mb``. A kind that can read its source incrementally (an image folder
file by file, a table or time series in batches) then never holds the data set in memory; its
raw snapshot is a manifest of what was read, not a copy.

Local sources must lie under ``paths.external_dir``: dvc.yaml declares that folder as a
dependency, so adding, changing or removing a file there re-runs ingest and what follows.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from components import kinds
from components.config import IngestParams, Params
from components.dataset import (
    SPLITS,
    FrameWriter,
    SeriesWindows,
    meta_path,
    raw_path,
    save_arrays,
    save_frame,
    save_split,
    stored_as,
    table_path,
    write_sharded,
)
from components.kinds.base import ManifestItems
from components.stage import main, replacing

MANIFEST = "manifest.json"  # the raw snapshot of a source read incrementally

log = logging.getLogger("pipeline.ingest")


@dataclass(frozen=True)
class IngestResult:
    source: str
    n_examples: int
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]
    storage: str = "memory"  # memory | shards


def save(
    prepared: kinds.Prepared, raw_dir: Path, prepared_dir: Path, storage: str = "memory",
    seed: int = 0,
) -> None:  # fmt: skip
    """Write the raw snapshot, the splits (and rows as read, if any) and meta.json."""
    rows = prepared.frames is not None
    (Path(raw_dir) / MANIFEST).unlink(missing_ok=True)
    if rows:
        save_frame(prepared.raw, raw_path(raw_dir, rows=True))
        for split, frame in prepared.frames.items():
            save_frame(frame, table_path(prepared_dir, split))
    else:
        save_arrays(prepared.raw, raw_path(raw_dir, rows=False))
        _drop_rows(prepared_dir)
    for split, data in prepared.splits.items():
        save_split(data, prepared_dir, split, storage, seed)
    prepared.meta.save(meta_path(prepared_dir))


def _drop_rows(prepared_dir: Path) -> None:
    for split in SPLITS:  # a table's rows from an earlier run would be validated instead
        table_path(prepared_dir, split).unlink(missing_ok=True)


def save_streamed(streamed: kinds.StreamedSplits, raw_dir: Path, prepared_dir: Path,
                  seed: int) -> None:  # fmt: skip
    """Each split written as shards while its examples are read, a chunk at a time, or by the kind
    itself (a time series: its rows); for a kind that keeps them, its rows as read too, batch by
    batch. The manifest of what was read is the raw snapshot."""
    for rows in (True, False):
        raw_path(raw_dir, rows=rows).unlink(missing_ok=True)
    write_manifest(Path(raw_dir) / MANIFEST, streamed.manifest)
    if not streamed.keeps_rows:
        _drop_rows(prepared_dir)
    with ExitStack() as stack:
        kept = {}
        if streamed.keeps_rows:
            for split in SPLITS:
                writer = stack.enter_context(FrameWriter(table_path(prepared_dir, split)))
                kept[split] = writer.write
        if streamed.write_splits is not None:
            streamed.write_splits(prepared_dir, kept)
        else:
            for split in SPLITS:
                n = streamed.meta.split_sizes[split]
                write_sharded(streamed.chunks(split, kept.get(split)), n, prepared_dir, split, seed)
    streamed.meta.save(meta_path(prepared_dir))


def write_manifest(path: Path, manifest: dict) -> None:
    """The raw snapshot of a streamed source as JSON (keys sorted), a
    long list (:class:`~components.kinds.base.ManifestItems`: an image folder's files) written
    one item a line as it is made, so that its memory does not grow with the source."""
    with replacing(path, "w") as fh:
        fh.write("{")
        for n, key in enumerate(sorted(manifest)):
            value = manifest[key]
            fh.write(f"{',' if n else ''}\n  {json.dumps(key)}: ")
            if isinstance(value, ManifestItems):
                fh.write("[")
                for i, item in enumerate(value):
                    fh.write(f"{',' if i else ''}\n    {json.dumps(item)}")
                fh.write("\n  ]")
            else:
                fh.write(json.dumps(value, sort_keys=True))
        fh.write("\n}\n")


def storage_for(cfg: IngestParams, nbytes: int) -> str:
    """``ingest.storage``, with ``auto`` decided by the encoded examples' size."""
    if cfg.storage != "auto":
        return cfg.storage
    return "shards" if nbytes > cfg.shard_above_mb * 1e6 else "memory"


def run(params: Params) -> IngestResult:
    paths, cfg = params.paths, params.ingest
    kind = kinds.get(kinds.detect(cfg))
    external, raw_dir, prepared_dir = (
        Path(paths.external_dir),
        Path(paths.raw_dir),
        Path(paths.prepared_dir),
    )
    streamed = kind.stream(cfg, external) if cfg.storage != "memory" else None
    if streamed is not None and storage_for(cfg, streamed.nbytes) == "shards":
        opened = streamed.open()
        save_streamed(opened, raw_dir, prepared_dir, cfg.seed)
        meta, n, summary, storage = opened.meta, streamed.n_examples, opened.summary, "shards"
        stored = stored_as(storage, series=opened.write_splits is not None)
    else:
        prepared = kind.prepare(cfg, external)
        nbytes = sum(d.nbytes for d in prepared.splits.values())
        storage = storage_for(cfg, nbytes)
        save(prepared, raw_dir, prepared_dir, storage, cfg.seed)
        meta, n, summary = prepared.meta, prepared.n_examples, prepared.summary
        stored = stored_as(storage, series=isinstance(prepared.splits["train"], SeriesWindows))
    log.info("%s; stored %s", summary, stored)
    return IngestResult(cfg.source, n, meta.class_names, dict(meta.split_sizes), storage)


if __name__ == "__main__":
    main("ingest", run)
