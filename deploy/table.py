"""Serving table rows: JSON objects of column -> value, encoded as training encoded them.

Routes: ``/predict_row`` (one row) and ``/predict_rows`` (a list of them). The preprocessing is
the spec ingest fitted (``preprocess`` in the model card) applied by
``components/features.py`` (numpy only), which every bento ships: numbers standardised, a
missing one (null) the training mean, categories one-hot (an unseen one all zeros). The
sequence adapter encodes each time step with the same code.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from bentoml.exceptions import InvalidArgument
from pydantic import Field

from components.features import FeatureError, encode_records, feature_names
from deploy.common import BYTES_PER_NUMBER, DataKind, ModelCard, Route, ServiceInfo


def check_spec(spec: Any, input_shape: Sequence[int], kind: str, where: Any) -> None:
    """A preprocess spec must encode exactly the model's features (and, for a sequence
    model, its window)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("columns"), list):
        raise ValueError(
            f"{where}: a {kind} model needs its preprocess spec (components/features.py) with "
            "a list of columns; re-run the ingest stage"
        )
    try:
        for col in spec["columns"]:
            if col["type"] == "numeric":
                float(col["mean"]), float(col["std"])
            elif col["type"] != "categorical" or not isinstance(col["categories"], list):
                raise TypeError
        width = len(feature_names(spec["columns"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: the preprocess spec's columns are malformed") from None
    if width != input_shape[-1]:
        raise ValueError(
            f"{where}: the preprocess spec encodes {width} features but the model takes "
            f"{input_shape[-1]}"
        )
    window = spec.get("window")
    if window is not None and len(input_shape) == 2 and window != input_shape[0]:
        raise ValueError(
            f"{where}: the preprocess spec's window is {window} steps but the model takes "
            f"{input_shape[0]}"
        )


def read_records_shape(card: dict, where: Path, kind: str, layout: str) -> tuple[int, ...]:
    """The card's ``input_shape`` ([F] for a row, [T, F] for a sequence) and its spec."""
    shape = card.get("input_shape")
    rank = layout.count(",") + 1
    if not (
        isinstance(shape, list)
        and len(shape) == rank
        and all(isinstance(d, int) and d >= 1 for d in shape)
    ):
        raise ValueError(f"{where}: input_shape must be {layout} for a {kind} model")
    check_spec(card.get("preprocess"), shape, kind, where)
    return tuple(shape)


def json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false"}.get(
        type(value), type(value).__name__
    )


def _relocate(message: str, where: Callable[[int], str], field: str) -> str:
    """components/features.py names rows ``row 3, column 'age': ...``; name them as the
    request does (``rows[3], column 'age': ...``, ``window[3], ...``)."""
    found = re.match(r"row (\d+)(.*)", message, flags=re.S)
    if found:
        return where(int(found.group(1))) + found.group(2)
    return f"{field}: {message}"


def encode(records: list, spec: dict, field: str, where: Callable[[int], str]) -> np.ndarray:
    """JSON rows -> float32 features with ``spec``; every refusal names the row and column.

    ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (RFC 8259), though Python's and
    BentoML's parsers take them: refused in every column, as they are in pixels. A missing
    value is ``null``. A number whose encoded feature is not finite in float32 (``1e308``,
    ``3.5e39``, ``10**400``) is refused too: the model would answer NaN.
    """
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidArgument(
                f"{where(i)}: must be an object of column -> value, got {json_type(record)}"
            )
        for name, value in record.items():
            if value is not None and not isinstance(value, str | int | float):
                raise InvalidArgument(
                    f"{where(i)}, column {name!r}: must be a number, text, true/false or "
                    f"null, got {json_type(value)}"
                )
            problem = _number_problem(value)
            if problem:
                raise InvalidArgument(f"{where(i)}, column {name!r}: {problem}")
    try:
        # A number too large for float32 overflows in the cast: refused just below, by name.
        with np.errstate(over="ignore", invalid="ignore"):
            x = encode_records(records, spec)
    except FeatureError as exc:
        raise InvalidArgument(_relocate(str(exc), where, field)) from None
    if not np.isfinite(x).all():
        row, feature = (int(k) for k in np.argwhere(~np.isfinite(x))[0])
        name = _column_of(spec["columns"], feature)
        raise InvalidArgument(
            f"{where(row)}, column {name!r}: {records[row][name]!r} is out of range: "
            "standardised for the model it is not a finite float32"
        )
    return x


def _number_problem(value: Any) -> str | None:
    """Why a JSON number cannot be encoded at all (None when it can, or is no number)."""
    if isinstance(value, float) and not math.isfinite(value):
        return (
            f"{value!r} is not finite; NaN, Infinity and -Infinity are not JSON numbers "
            "(send null for a missing value)"
        )
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            return f"an integer of {len(str(abs(value)))} digits is out of range"
    return None


def _column_of(columns: list[dict], feature: int) -> str:
    """The input column that encoded feature number ``feature`` comes from."""
    for col in columns:
        width = 1 if col["type"] == "numeric" else len(col["categories"])
        if feature < width:
            return str(col["name"])
        feature -= width
    raise IndexError(feature)


def check_count(items: Any, what: str, field: str, max_items: int) -> None:
    if not isinstance(items, list):
        raise InvalidArgument(f"{field}: must be a list of {what}s, got {json_type(items)}")
    if not items:
        raise InvalidArgument(f"{field}: must hold at least 1 {what}")
    if len(items) > max_items:
        raise InvalidArgument(
            f"{field}: at most {max_items} {what}s per request (package.max_batch_size), "
            f"got {len(items)}"
        )


def encode_rows(rows: Any, spec: dict, max_rows: int, field: str = "rows") -> np.ndarray:
    """A list of ``{column: value}`` rows -> float32 ``(N, F)`` features, or raise."""
    check_count(rows, "row", field, max_rows)
    return encode(rows, spec, field, lambda i: f"{field}[{i}]")


def encode_row(row: Any, spec: dict, field: str = "row") -> np.ndarray:
    """One ``{column: value}`` row -> float32 ``(1, F)``, or raise."""
    return encode([row], spec, field, lambda i: field)


def records_limit(spec: dict, max_batch_size: int, steps: int = 1) -> int:
    """Body size (bytes) a full batch of rows (or sequences of ``steps`` rows) fits in, each
    row written as an object of column -> the longest value (a long float or category)."""
    per_row = 2
    for col in spec["columns"]:
        longest = max((len(json.dumps(str(c))) for c in col.get("categories") or ()), default=0)
        per_row += len(json.dumps(str(col["name"]))) + 4 + max(BYTES_PER_NUMBER, longest)
    return max_batch_size * steps * per_row + 64 * 1024


class RecordsInfo(ServiceInfo):
    columns: list[str] = Field(
        description="the input columns, in order: what a row (or one time step) holds"
    )
    preprocess: dict[str, Any] = Field(
        description="the transform applied before the model: each numeric column's training "
        "mean and std, each categorical column's categories (components/features.py)"
    )


def records_info(card: ModelCard) -> dict[str, Any]:
    spec = card.raw["preprocess"]
    return {"columns": [str(c["name"]) for c in spec["columns"]], "preprocess": spec}


EXAMPLE_ROW = {"size": 80.0, "rooms": None, "city": "north"}  # illustrative: /info has the columns
RowField = Annotated[
    dict[str, Any],
    Field(
        description="one row: an object of column -> value (numbers for numeric columns, "
        "text for categorical ones, null for a missing value); see /info for the columns",
        examples=[EXAMPLE_ROW],
    ),
]
RowsField = Annotated[
    list[Any],
    Field(
        description="a list of rows, each as for /predict_row; at most max_batch_size",
        examples=[[EXAMPLE_ROW, {**EXAMPLE_ROW, "size": 45.5, "city": "east"}]],
    ),
]


def example_value(column: dict, variant: int = 0) -> Any:
    """A valid value of one input column: near the training mean (``variant`` standard
    deviations off it, rounded), or one of the known categories (null when none is known)."""
    if column["type"] == "numeric":
        return float(f"{float(column['mean']) + variant * float(column['std']):.4g}")
    categories = column.get("categories") or [None]
    return categories[variant % len(categories)]


def example_row(spec: dict, variant: int = 0) -> dict[str, Any]:
    """A valid row for the model: every input column, with :func:`example_value`."""
    return {str(col["name"]): example_value(col, variant) for col in spec["columns"]}


def _one(row: Any, card: ModelCard) -> np.ndarray:
    return encode_row(row, card.raw["preprocess"])


def _many(rows: Any, card: ModelCard) -> np.ndarray:
    return encode_rows(rows, card.raw["preprocess"], card.max_batch_size)


TABLE = DataKind(
    name="table",
    routes=(
        Route("predict_row", "row", RowField, _one, many=False,
              doc="One row of column -> value: its class (classification) or value.",
              example=lambda card: example_row(card.raw["preprocess"])),
        Route("predict_rows", "rows", RowsField, _many, many=True,
              doc="Up to ``max_batch_size`` rows in one call; answers in the same order.",
              example=lambda card: [example_row(card.raw["preprocess"], v) for v in (0, 1)]),
    ),
    read_shape=lambda card, where: read_records_shape(card, where, "table", "[F]"),
    request_limit=lambda card: records_limit(card.raw["preprocess"], card.max_batch_size),
    info=RecordsInfo,
    info_fields=records_info,
)  # fmt: skip
