"""Sequences: ``float32`` ``(N, T, F)``, standardised per feature on the training split.

Two sources. A time series (``.csv``/``.parquet``, rows in time order): split chronologically
(train, then val, then test: no window sees the future of another split), then cut into windows
of ``ingest.window`` steps that forecast ``ingest.target`` ``ingest.horizon`` steps later
(regression); validated on its rows as read, like a table. Or an ``.npz`` of per-sample
sequences ``x`` (N,T,F) or (N,T) with labels ``y`` (classification, stratified) or float values
(regression, random split); validated on one summary row per sequence.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np

from components import features
from components.dataset import (
    SPLITS,
    ArraySet,
    DatasetMeta,
    SeriesRowsWriter,
    SeriesWindows,
    clear_other_storage,
    sharded_path,
)
from components.kinds import table
from components.kinds.base import (
    DataKind,
    Prepared,
    Streamed,
    StreamedSplits,
    labels_to_indices,
    local_source,
    random_split,
    read_npz,
    sizes,
    stratified_split,
)
from components.kinds.checks import MISSING_PARAM, Check, Expectation, found, share
from components.kinds.table import (
    BUILTIN_TABLES,
    ROWS_SUITE,
    TABLE_SUFFIXES,
    check_features_servable,
    choose_columns,
    columns_phrase,
    counted_missing,
    dataset_head,
    encode_target,
    encode_with,
    encoded_checks,
    encoded_stats,
    feature_card,
    feature_labels,
    fit_spec,
    open_dataset,
    read_batches,
    read_frame,
    read_rows,
    rows_expectations,
    rows_stats,
    spec_columns,
)
from components.stage import StageError

SEQUENCES_SUITE = "sequences"


def windows(encoded: np.ndarray, target: np.ndarray, window: int, horizon: int) -> ArraySet:
    """Every run of ``window`` consecutive rows, labelled with the target ``horizon`` later:
    views of the rows, not copies (components/dataset.py SeriesWindows)."""
    return SeriesWindows(encoded, target, window, horizon)


def chronological_bounds(n: int, cfg) -> dict[str, tuple[int, int]]:
    """Row ranges of train, val and test in time order; each must hold one whole window."""
    n_test, n_val = round(n * cfg.test_fraction), round(n * cfg.val_fraction)
    bounds = {"train": (0, n - n_test - n_val), "val": (n - n_test - n_val, n - n_test),
              "test": (n - n_test, n)}  # fmt: skip
    need = cfg.window + cfg.horizon
    for split, (lo, hi) in bounds.items():
        if hi - lo < need:
            raise StageError(
                f"ingest.window {cfg.window} + horizon {cfg.horizon} needs at least {need} rows "
                f"in every split, but the {split} split of {cfg.source} has {hi - lo} (the series "
                f"has {n} rows): use a shorter window or a longer series"
            )
    return bounds


class TimeIndexFinder:
    """The columns among ``columns`` that count time rather than measure anything: integers
    that strictly increase row after row (a year, a step number), over the whole series fed to
    :meth:`update` in order, one frame or batch at a time. As an input such a column tells the
    network only where it is in the series, and every test window lies beyond the range it was
    trained on. (A date column is text or datetime, never a numeric input.)"""

    def __init__(self, columns: list[str]) -> None:
        self.last: dict[str, int | None] = dict.fromkeys(columns)  # a column left: still one

    def update(self, frame) -> None:
        import pandas as pd

        for c, last in list(self.last.items()):
            values = frame[c]
            if not (
                pd.api.types.is_integer_dtype(values)
                and values.is_monotonic_increasing
                and values.is_unique
                and (last is None or len(values) == 0 or values.iloc[0] > last)
            ):
                del self.last[c]
            elif len(values):
                self.last[c] = values.iloc[-1]

    @property
    def found(self) -> list[str]:
        return list(self.last)


def time_index_columns(frame, columns: list[str]) -> list[str]:
    """:class:`TimeIndexFinder`'s columns of a whole frame."""
    finder = TimeIndexFinder(columns)
    finder.update(frame)
    return finder.found


def series_columns(frame, cfg) -> tuple[str, list[str], list[str]]:
    """A time series' target, its candidate inputs (every numeric column, or those asked for)
    and the candidates to check for a time index (:class:`TimeIndexFinder`), checked against
    ``frame`` (the series, or its first rows)."""
    target_name, inputs = choose_columns(frame, cfg, numeric_only=True)
    if cfg.task == "classification":
        raise StageError("ingest.task classification: forecasting a time series is regression")
    if features.is_categorical(frame[target_name]):
        raise StageError(f"ingest.target {target_name!r}: a forecast target must be numeric")
    indexed = [] if cfg.features or cfg.time_index_as_input else inputs  # named: taken as asked
    return target_name, inputs, [c for c in indexed if c != target_name]


def series_meta(kind: str, cfg, spec: dict, target_name: str, n: int, inputs: list[str],
                left_out: list[str]) -> tuple[DatasetMeta, str]:  # fmt: skip
    """meta.json of a time series and ingest's line for it."""
    spec.update(window=cfg.window, horizon=cfg.horizon, target=target_name)
    split_rows = {s: hi - lo for s, (lo, hi) in chronological_bounds(n, cfg).items()}
    meta = DatasetMeta(
        class_names=(),
        input_shape=(cfg.window, len(spec["features"])),
        source=cfg.source,
        split_sizes={s: rows - cfg.window - cfg.horizon + 1 for s, rows in split_rows.items()},
        kind=kind,
        task="regression",
        target=target_name,
        feature_names=tuple(spec["features"]),
        preprocess=spec,
    )
    index = (
        f"; time index {', '.join(map(repr, left_out))} not an input (ingest.time_index_as_input)"
        if left_out
        else ""
    )
    summary = (
        f"time series of {n} steps, {len(inputs)} inputs {inputs}{index}, window {cfg.window}, "
        f"forecast {target_name!r} {cfg.horizon} step(s) ahead; windows per split "
        f"{meta.split_sizes}"
    )
    return meta, summary


def prepare_time_series(kind: str, cfg, external_dir: Path) -> Prepared:
    """A time series in row order: chronological splits, then windows within each split."""
    frame = read_frame(cfg, external_dir)
    target_name, inputs, indexed = series_columns(frame, cfg)
    left_out = time_index_columns(frame, indexed)
    inputs = [c for c in inputs if c not in left_out]
    y, _ = encode_target(frame[target_name], "regression")
    n = len(frame)
    bounds = chronological_bounds(n, cfg)
    frame = frame[list(dict.fromkeys([*inputs, target_name]))]
    frames = {s: frame.iloc[lo:hi].reset_index(drop=True) for s, (lo, hi) in bounds.items()}
    spec = fit_spec(frames["train"], inputs)
    meta, summary = series_meta(kind, cfg, spec, target_name, n, inputs, left_out)
    splits = {
        s: windows(features.encode_frame(frames[s], spec), y[lo:hi], cfg.window, cfg.horizon)
        for s, (lo, hi) in bounds.items()
    }
    return Prepared(meta, splits, frame, frames, n, summary)


def stream_time_series(path: Path, cfg, kind: str) -> Streamed:
    """A .csv or .parquet time series read in batches (as a table is:
    components/kinds/table.py ``read_batches``), so that ingest's memory holds one batch, not
    the series. One pass checks the target, finds
    the time index columns and fits the preprocessing on the training rows (the series'
    first rows, :class:`features.OnePassFit`); a second pass keeps each batch's rows as read
    in their split's ``prepared/<split>.parquet`` and encodes them into its stored rows
    (:class:`~components.dataset.SeriesRowsWriter`). The splits, windows and targets are those
    of a whole read; the fitted means and deviations equal those to rounding (the last bits of
    a float64 sum depend on its order)."""
    dataset = open_dataset(path)
    head, n = dataset_head(dataset, path)
    target_name, candidates, indexed = series_columns(head, cfg)

    def open_splits() -> StreamedSplits:
        bounds = chronological_bounds(n, cfg)
        train_rows = bounds["train"][1]
        fitter, finder, missing = features.OnePassFit(candidates), TimeIndexFinder(indexed), 0
        columns = list(dict.fromkeys([*candidates, target_name]))
        for at, frame in read_batches(dataset, path, columns):
            target = frame[target_name]
            if features.is_categorical(target):
                raise StageError(f"ingest.target {target_name!r}: a forecast target must be "
                                 f"numeric (rows from {at} hold {target.dtype})")  # fmt: skip
            missing += int(target.isna().sum())
            finder.update(frame)
            if at < train_rows:
                try:
                    fitter.update(frame.iloc[: train_rows - at][candidates])
                except features.FeatureError as exc:
                    raise StageError(f"ingest.features: {exc}") from None
        if missing:
            raise StageError(f"target column {target_name!r} is empty in {missing} row(s): drop "
                             "or fill them first")  # fmt: skip
        left_out = finder.found
        inputs = [c for c in candidates if c not in left_out]
        try:
            fitted = [c for c in fitter.spec()["columns"] if c["name"] in inputs]
        except features.FeatureError as exc:
            raise StageError(f"ingest.features: {exc}") from None
        spec = {"version": features.SPEC_VERSION, "columns": fitted,
                "features": features.feature_names(fitted)}  # fmt: skip
        meta, summary = series_meta(kind, cfg, spec, target_name, n, inputs, left_out)
        columns = list(dict.fromkeys([*inputs, target_name]))

        def write_splits(prepared_dir: Path, kept: dict) -> None:
            """One more pass: each batch's rows go to the split they fall in (the splits are
            consecutive runs of rows), kept as read (``kept[split]``) and encoded."""
            with ExitStack() as stack:
                out = {
                    s: stack.enter_context(
                        SeriesRowsWriter(sharded_path(prepared_dir, s), hi - lo,
                                         len(spec["features"]), cfg.window, cfg.horizon)
                    )
                    for s, (lo, hi) in bounds.items()
                }  # fmt: skip
                for at, frame in read_batches(dataset, path, columns):
                    for split, (lo, hi) in bounds.items():
                        part = frame.iloc[max(lo - at, 0) : max(hi - at, 0)]
                        if part.empty:
                            continue
                        part = part.reset_index(drop=True)
                        if split in kept:
                            kept[split](part)
                        values = part[target_name].astype("float64").to_numpy()
                        out[split].write(features.encode_frame(part, spec), values)
            for split in bounds:
                clear_other_storage(prepared_dir, split, "shards")

        manifest = {"source": cfg.source, "rows": n, "columns": columns}
        summary += f" (read in batches of {table.BATCH_ROWS})"
        return StreamedSplits(meta, None, manifest, summary, keeps_rows=True,
                              write_splits=write_splits)  # fmt: skip

    return Streamed(n, 4 * (len(candidates) + 1), open_splits)


def prepare_npz(kind: str, cfg, external_dir: Path) -> Prepared:
    """Per-sample sequences: ``x`` (N, T, F) or (N, T), ``y`` labels (or values)."""
    path = local_source(cfg.source, external_dir)
    x, labels, names = read_npz(path)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or not np.issubdtype(x.dtype, np.number):
        raise StageError(f"{path}: sequences x must be numeric (N, T, F) or (N, T), got {x.shape}")
    if len(x) != len(labels):
        raise StageError(f"{path}: {len(x)} sequences but {len(labels)} labels")
    if labels.ndim != 1:
        raise StageError(f"{path}: y must be one label or value per sequence, got {labels.shape}")
    if not np.all(np.isfinite(x)):
        raise StageError(f"{path}: x holds {int((~np.isfinite(x)).sum())} NaN or infinite values")
    if cfg.task == "regression" or (
        cfg.task == "auto" and np.issubdtype(labels.dtype, np.floating)
    ):
        if not np.issubdtype(labels.dtype, np.number) or not np.all(np.isfinite(labels)):
            raise StageError(f"{path}: regression targets y must be finite numbers")
        task, y, class_names = "regression", labels.astype(np.float32), ()
        idx = random_split(len(y), cfg.test_fraction, cfg.val_fraction, cfg.seed)
    else:
        task = "classification"
        y, class_names = labels_to_indices(labels, names, str(path))
        if len(class_names) < 2:
            raise StageError(f"{path}: {len(class_names)} class(es): need at least 2")
        idx = stratified_split(y, cfg.test_fraction, cfg.val_fraction, cfg.seed, class_names)
    steps, width = x.shape[1:]
    names = [f"f{j}" for j in range(width)]
    columns = features.fit_numeric(x[idx["train"]].reshape(-1, width), names)
    spec = {"version": features.SPEC_VERSION, "columns": columns, "window": steps}
    spec["features"] = features.feature_names(columns)
    encoded = features.standardise(x, columns)
    splits = {s: ArraySet(encoded[i], y[i]) for s, i in idx.items()}
    meta = DatasetMeta(
        class_names=class_names,
        input_shape=(steps, width),
        source=cfg.source,
        split_sizes=sizes(splits),
        kind=kind,
        task=task,
        feature_names=tuple(spec["features"]),
        preprocess=spec,
    )
    summary = (
        f"{len(x)} sequences of {steps} steps x {width} features ({task}), "
        f"splits {meta.split_sizes}"
    )
    return Prepared(meta, splits, ArraySet(x, labels), None, len(x), summary)


def sequence_table(data: ArraySet):
    """One row per sequence: label, steps, features and whether it holds a NaN."""
    import pandas as pd

    n = len(data)
    flat = data.x.reshape(n, -1).astype(np.float64)
    return pd.DataFrame(
        {
            "label": data.y,
            "steps": np.full(n, data.x.shape[1], np.int64),
            "features": np.full(n, data.x.shape[2] if data.x.ndim == 3 else 1, np.int64),
            "has_nan": ~np.isfinite(flat).all(axis=1) if flat.size else np.zeros(n, bool),
        }
    )


def is_time_series(meta: DatasetMeta) -> bool:
    """A forecast names its target column; per-sample sequences have none."""
    return bool(meta.target)


class SequenceKind(DataKind):
    name = "sequence"
    noun = "sequence"
    example_rank = 2  # (T, F)
    baselines = ("linear", "persistence")  # autoregressive on the window; last value carried

    # Never chosen by ``ingest.kind: auto``: a .csv is a table and an .npz images unless told.

    def prepare(self, cfg, external_dir: Path) -> Prepared:
        if Path(cfg.source).suffix.lower() == ".npz":
            return prepare_npz(self.name, cfg, external_dir)
        return prepare_time_series(self.name, cfg, external_dir)

    def stream(self, cfg, external_dir: Path) -> Streamed | None:
        if cfg.source in BUILTIN_TABLES:
            return None
        path = local_source(cfg.source, external_dir)
        if path.suffix.lower() not in TABLE_SUFFIXES:  # per-sample sequences (.npz): read whole
            return None
        return stream_time_series(path, cfg, self.name)

    def raw_splits(self, prepared_dir: Path, meta: DatasetMeta, splits=SPLITS,
                   max_rows: int | None = None):  # fmt: skip
        return read_rows(prepared_dir, splits, max_rows) if is_time_series(meta) else None

    def rows_stats(self, prepared_dir: Path, meta: DatasetMeta, split: str):
        return rows_stats(prepared_dir, split) if is_time_series(meta) else None

    def counted_checks(self, split: str, counted: dict, meta: DatasetMeta, params) -> list:
        return counted_missing(split, counted, meta, params) if is_time_series(meta) else []

    def reencode(self, raw, spec, test: ArraySet, target: str, class_names=()) -> ArraySet:
        x = encode_with(raw, spec)
        values = raw[target].astype("float64").to_numpy()
        return windows(x, values, int(spec["window"]), int(spec["horizon"]))

    def expectations(self, meta: DatasetMeta, params) -> dict[str, list[Expectation]]:
        if is_time_series(meta):
            return {ROWS_SUITE: rows_expectations(meta, params)}
        steps, width = (tuple(meta.input_shape) + (1,))[:2]
        return {
            SEQUENCES_SUITE: [
                Expectation("ExpectColumnValuesToBeInSet", "steps", f"sequence steps == {steps}",
                            found(max, "sequence"), {"value_set": [steps]}),
                Expectation("ExpectColumnValuesToBeInSet", "features",
                            f"sequence features == {width}", found(max, "sequence"),
                            {"value_set": [width]}),
                Expectation("ExpectColumnValuesToBeInSet", "has_nan",
                            f"sequences with NaN <= {params.max_missing_fraction:.1%}",
                            share("sequence"),
                            {"value_set": [False], "mostly": 1.0 - params.max_missing_fraction},
                            param=MISSING_PARAM),
            ]
        }  # fmt: skip

    def summary_tables(self, data: ArraySet, meta: DatasetMeta, frame=None) -> dict:
        if is_time_series(meta):
            return {ROWS_SUITE: frame}
        return {SEQUENCES_SUITE: sequence_table(data)}

    def array_checks(self, split: str, data: ArraySet, meta: DatasetMeta) -> list[Check]:
        return encoded_checks(split, data, meta)

    def split_stats(self, data: ArraySet, tables, meta, class_counts) -> dict:
        return encoded_stats(data, meta, class_counts)

    def card_fields(self, meta: DatasetMeta) -> dict:
        return feature_card(meta)

    def input_columns(self, meta: DatasetMeta) -> list[dict] | None:
        return spec_columns(meta)

    def check_servable(self, meta: DatasetMeta, meta_file) -> None:
        check_features_servable(self.name, 2, meta, meta_file)

    def shape_labels(self, card: dict) -> dict[str, str]:
        return {**feature_labels(card), "window": str(card["input_shape"][0])}

    def inputs_phrase(self, card: dict) -> str:
        return (
            f"sequences of {card['input_shape'][0]} steps of columns {columns_phrase(card)} "
            "(encoded first by the preprocessing fitted on the training data, model.json "
            "`preprocess`)"
        )

    def routes_phrase(self, card: dict, role: str) -> str:
        return (
            f'`POST /forecast {{"window": [step x {card["input_shape"][0]}]}}` (a step: one '
            'value per column, or {column: value}), `POST /predict_sequences {"sequences": '
            f"[...]}}` (at most {card['max_batch_size']}), `POST /info` (columns, preprocessing)"
        )
