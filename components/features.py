"""The preprocessing of tables and time series: fitted on the training split, applied everywhere.

:func:`fit` learns a small JSON spec from the training rows: each numeric column's mean and
standard deviation, each categorical column's categories. :func:`encode` turns rows into the
model's ``float32`` features with that spec: numbers standardised (a missing number becomes the
training mean, i.e. 0), categories one-hot (an unseen or missing category is all zeros).

The spec is stored in ``meta.json`` and in ``model.json``, and this module is copied into the
bento, so the served model applies exactly the transform the model was trained behind. It needs
numpy only (the edge bento has no pandas); :func:`fit` alone takes a pandas frame.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

SPEC_VERSION = 1
MAX_CATEGORIES = 100  # more distinct values than this is an ID or free text, not a category


class FeatureError(ValueError):
    """Rows that the fitted transform cannot encode; the message names the column and row."""


def is_categorical(series) -> bool:
    """Strings, booleans and pandas categories are one-hot encoded; numbers are standardised."""
    import pandas as pd

    return not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)


def fit(frame, columns: Sequence[str], max_categories: int = MAX_CATEGORIES) -> dict:
    """Learn the transform of ``columns`` from the training rows in ``frame`` (pandas)."""
    specs = []
    for name in columns:
        series = frame[name]
        if is_categorical(series):
            values = sorted({str(v) for v in series.dropna().tolist()})
            if len(values) > max_categories:
                raise FeatureError(
                    f"column {name!r} has {len(values)} distinct values: too many for a category "
                    f"(at most {max_categories}); leave it out with ingest.features"
                )
            specs.append({"name": name, "type": "categorical", "categories": values})
        else:
            numbers = series.astype("float64").to_numpy()
            finite = numbers[np.isfinite(numbers)]
            if finite.size == 0:
                raise FeatureError(f"column {name!r} has no numeric value in the training split")
            std = float(finite.std())
            specs.append(
                {"name": name, "type": "numeric", "mean": float(finite.mean()),
                 "std": std if std > 1e-12 else 1.0}
            )  # fmt: skip
    return {"version": SPEC_VERSION, "columns": specs, "features": feature_names(specs)}


class OnePassFit:
    """:func:`fit` over batches of training rows (pandas frames), in one pass and bounded memory:
    each column's kind is decided by its first batch; numeric columns keep a count, a mean and
    a sum of squared deviations, merged batch by batch (Chan et al.'s pairwise update, as
    stable as a two-pass variance); categorical ones the set of values seen (at most
    ``max_categories``). :meth:`spec` gives what :func:`fit` gives on the concatenated rows
    (means and deviations equal to rounding)."""

    def __init__(self, columns: Sequence[str], max_categories: int = MAX_CATEGORIES) -> None:
        self.columns = list(columns)
        self.max_categories = max_categories
        self.categorical: dict[str, bool] = {}
        self.values: dict[str, set[str]] = {}
        self.moments: dict[str, tuple[int, float, float]] = {}  # count, mean, M2

    def update(self, frame) -> None:
        for name in self.columns:
            series = frame[name]
            if self.categorical.setdefault(name, is_categorical(series)):
                seen = self.values.setdefault(name, set())
                seen.update(str(v) for v in series.dropna().unique().tolist())
                if len(seen) > self.max_categories:
                    raise FeatureError(
                        f"column {name!r} has more than {self.max_categories} distinct values: "
                        "too many for a category; leave it out with ingest.features"
                    )
                continue
            numbers = series.astype("float64").to_numpy()
            finite = numbers[np.isfinite(numbers)]
            if finite.size == 0:
                continue
            n_b, mean_b = finite.size, float(finite.mean())
            m2_b = float(((finite - mean_b) ** 2).sum())
            n_a, mean_a, m2_a = self.moments.get(name, (0, 0.0, 0.0))
            n = n_a + n_b
            delta = mean_b - mean_a
            self.moments[name] = (
                n,
                mean_a + delta * n_b / n,
                m2_a + m2_b + delta * delta * n_a * n_b / n,
            )

    def spec(self) -> dict:
        specs = []
        for name in self.columns:
            if self.categorical.get(name, False):
                specs.append({"name": name, "type": "categorical",
                              "categories": sorted(self.values.get(name, ()))})  # fmt: skip
                continue
            n, mean, m2 = self.moments.get(name, (0, 0.0, 0.0))
            if n == 0:
                raise FeatureError(f"column {name!r} has no numeric value in the training split")
            std = math.sqrt(m2 / n)
            specs.append({"name": name, "type": "numeric", "mean": mean,
                          "std": std if std > 1e-12 else 1.0})  # fmt: skip
        return {"version": SPEC_VERSION, "columns": specs, "features": feature_names(specs)}


def fit_numeric(rows: np.ndarray, names: Sequence[str]) -> list[dict]:
    """Column specs standardising each column of ``rows`` (training rows, ``(n, len(names))``).

    For arrays without a frame (per-sample sequences): no categories, no missing values.
    """
    rows = np.asarray(rows).astype(np.float64)
    std = rows.std(axis=0)
    return [
        {"name": name, "type": "numeric", "mean": float(rows[:, j].mean()),
         "std": float(std[j]) if std[j] > 1e-12 else 1.0}
        for j, name in enumerate(names)
    ]  # fmt: skip


def standardise(x: np.ndarray, column_specs: Sequence[Mapping]) -> np.ndarray:
    """``x`` (..., F) standardised with numeric column specs, as ``float32``."""
    mean = np.array([c["mean"] for c in column_specs])
    scale = np.array([c["std"] for c in column_specs])
    return ((x - mean) / scale).astype(np.float32)


def feature_names(column_specs: Sequence[Mapping]) -> list[str]:
    names: list[str] = []
    for col in column_specs:
        if col["type"] == "numeric":
            names.append(col["name"])
        else:
            names += [f"{col['name']}={c}" for c in col["categories"]]
    return names


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def encode(columns: Mapping[str, Sequence], spec: Mapping) -> np.ndarray:
    """Encode rows given column-wise (name -> values) into ``(N, n_features)`` float32."""
    specs = spec["columns"]
    lengths = {len(columns[c["name"]]) for c in specs if c["name"] in columns}
    missing = [c["name"] for c in specs if c["name"] not in columns]
    if missing:
        raise FeatureError(
            f"missing column(s) {missing}; the model needs {[c['name'] for c in specs]}"
        )
    if len(lengths) > 1:
        raise FeatureError("columns have different numbers of rows")
    n = lengths.pop() if lengths else 0
    return _stack([_block(col, columns[col["name"]], n) for col in specs], n)


def _stack(blocks: list[np.ndarray], n: int) -> np.ndarray:
    if not blocks:
        return np.zeros((n, 0), dtype=np.float32)
    return np.concatenate(blocks, axis=1).astype(np.float32)


def _block(col: Mapping, values: Sequence, n: int) -> np.ndarray:
    """One column's features, ``(n, 1)`` standardised or ``(n, k)`` one-hot, as float64."""
    if col["type"] == "numeric" and isinstance(values, np.ndarray):
        return ((_numbers(values, col) - col["mean"]) / col["std"])[:, None]
    if col["type"] == "numeric":
        out = np.empty(n, dtype=np.float64)
        for i, v in enumerate(values):
            if _is_missing(v):
                out[i] = col["mean"]
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise FeatureError(f"row {i}, column {col['name']!r}: expected a number, got {v!r}")
            if not math.isfinite(float(v)):
                raise FeatureError(f"row {i}, column {col['name']!r}: {v!r} is not finite")
            out[i] = float(v)
        return ((out - col["mean"]) / col["std"])[:, None]
    index = {c: j for j, c in enumerate(col["categories"])}
    onehot = np.zeros((n, len(index)), dtype=np.float64)
    for i, v in enumerate(values):
        if _is_missing(v):
            continue
        j = index.get(str(v))
        if j is not None:
            onehot[i, j] = 1.0
    return onehot


def _numbers(values: np.ndarray, col: Mapping) -> np.ndarray:
    """A float64 column as the per-value loop of :func:`encode` reads one, in one pass: NaN
    is missing (the column's mean), an infinity fails naming its first row."""
    values = np.asarray(values, dtype=np.float64)
    out = np.where(np.isnan(values), col["mean"], values)  # the one new array; values untouched
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argmax(bad))
        raise FeatureError(f"row {i}, column {col['name']!r}: {float(out[i])!r} is not finite")
    return out


def encode_frame(frame, spec: Mapping) -> np.ndarray:
    """Encode a pandas frame (training side), each column in one pass: not a Python object per
    value, as JSON rows are (:func:`encode_records`)."""
    blocks = []
    for col in spec["columns"]:
        if col["name"] not in frame.columns:
            raise FeatureError(f"missing column {col['name']!r}")
        series = frame[col["name"]]
        if col["type"] == "numeric":
            blocks.append(_block(col, series.astype("float64").to_numpy(), len(frame)))
        else:
            blocks.append(_one_hot(series, col))
    return _stack(blocks, len(frame))


def _one_hot(series, col: Mapping) -> np.ndarray:
    """A categorical column of a frame one-hot, as :func:`_block` encodes its values: a missing
    value (what :func:`fit` drops) and an unseen one are all zeros; the others are matched as
    ``str(value)``, through a pandas hash index instead of a dict lookup per value."""
    import pandas as pd

    onehot = np.zeros((len(series), len(col["categories"])), dtype=np.float64)
    present = series.notna().to_numpy()
    strings = [str(v) for v in series[present].tolist()]  # tolist: the values _block sees
    codes = pd.Index(col["categories"], dtype=object).get_indexer(strings)
    found = codes >= 0
    onehot[np.flatnonzero(present)[found], codes[found]] = 1.0
    return onehot


def encode_records(records: Sequence[Mapping], spec: Mapping) -> np.ndarray:
    """Encode JSON rows (serving side): a list of ``{column: value}`` objects."""
    names = [c["name"] for c in spec["columns"]]
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise FeatureError(f"row {i}: expected an object of column -> value, got {record!r}")
        absent = [n for n in names if n not in record]
        if absent:
            raise FeatureError(f"row {i} lacks column(s) {absent} (use null for a missing value)")
        unknown = sorted(set(record) - set(names))
        if unknown:
            raise FeatureError(f"row {i} has unknown column(s) {unknown}; known: {names}")
    return encode({n: [r[n] for r in records] for n in names}, spec)
