"""A data kind that is not built in: 1-D signals from an .npz (``x`` (N, L), ``y`` labels).

It lives outside components/ on purpose: tests/test_kind_plugin.py names it in params
(``ingest.kind: tests.signal_kind:SignalKind``) and takes it through the stages, none of which
is edited for it. Each signal is standardised with the training split's mean and spread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.dataset import ArraySet, DatasetMeta
from components.kinds import DataKind, Prepared
from components.kinds.base import (
    labels_to_indices,
    local_source,
    read_npz,
    sizes,
    stratified_split,
    take,
)
from components.kinds.checks import Check, Expectation, found, share
from components.stage import StageError

SUITE = "signals"


class SignalKind(DataKind):
    noun = "signal"
    plural = "signals"
    example_rank = 1  # (L,): one row of samples; the families that read rows read it

    def prepare(self, cfg, external_dir: Path) -> Prepared:
        path = local_source(cfg.source, external_dir)
        x, labels, names = read_npz(path)
        if x.ndim != 2 or len(x) != len(labels):
            raise StageError(f"{path}: signals must be x (N, L) with one label each")
        y, class_names = labels_to_indices(labels, names, str(path))
        idx = stratified_split(y, cfg.test_fraction, cfg.val_fraction, cfg.seed)
        train = x[idx["train"]].astype(np.float64)
        mean, std = float(train.mean()), float(train.std()) or 1.0
        splits = take(((x - mean) / std).astype(np.float32), y, idx)
        meta = DatasetMeta(
            class_names=class_names,
            input_shape=(x.shape[1],),
            source=cfg.source,
            split_sizes=sizes(splits),
            kind=self.name,
            preprocess={"mean": mean, "std": std},
        )
        return Prepared(meta, splits, ArraySet(x, labels), None, len(x), f"{len(x)} signals")

    def expectations(self, meta: DatasetMeta, params) -> dict[str, list[Expectation]]:
        (length,) = meta.input_shape
        return {
            SUITE: [
                Expectation("ExpectColumnValuesToBeInSet", "length", f"signal length == {length}",
                            found(max, "signal"), {"value_set": [length]}),
                Expectation("ExpectColumnValuesToBeInSet", "has_nan", "signals with NaN == 0",
                            share("signal"), {"value_set": [False]}),
            ]
        }  # fmt: skip

    def summary_tables(self, data: ArraySet, meta: DatasetMeta, frame=None) -> dict:
        n = len(data)
        return {
            SUITE: pd.DataFrame(
                {
                    "label": data.y,
                    "length": np.full(n, data.x.shape[1], np.int64),
                    "has_nan": ~np.isfinite(data.x).all(axis=1),
                }
            )
        }

    def array_checks(self, split: str, data: ArraySet, meta: DatasetMeta) -> list[Check]:
        return [Check(split, "signal dtype == float32", data.x.dtype == np.float32,
                      f"found {data.x.dtype}")]  # fmt: skip

    def card_fields(self, meta: DatasetMeta) -> dict:
        return {"signal_length": meta.input_shape[0], "standardised_by": meta.preprocess}
