"""Serving sequences: ``T`` time steps (the window the model was trained on), oldest first.

Routes: ``/forecast`` (one window: a time-series forecast, or its class) and
``/predict_sequences`` (a list of them). A step is a list of one value per input column, in
the order /info lists them, or an object of column -> value; it is encoded like a table row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
from bentoml.exceptions import InvalidArgument
from pydantic import Field

from deploy.common import DataKind, ModelCard, Route
from deploy.table import (
    RecordsInfo,
    check_count,
    encode,
    example_value,
    json_type,
    read_records_shape,
    records_info,
    records_limit,
)


def encode_sequences(
    sequences: Any, spec: dict, input_shape: tuple[int, int], max_items: int,
    field: str = "sequences",
) -> np.ndarray:  # fmt: skip
    """A list of sequences, each ``T`` steps (see :func:`encode_window`) -> ``(N, T, F)``."""
    check_count(sequences, "sequence", field, max_items)
    names = [f"{field}[{i}]" for i in range(len(sequences))]
    return _encode_steps(sequences, spec, input_shape, names, field)


def encode_window(
    window: Any, spec: dict, input_shape: tuple[int, int], field: str = "window"
) -> np.ndarray:
    """One sequence of exactly ``T`` steps -> float32 ``(1, T, F)``, or raise."""
    return _encode_steps([window], spec, input_shape, [field], field)


def _encode_steps(
    sequences: list, spec: dict, input_shape: tuple[int, int], names: list[str], field: str
) -> np.ndarray:
    steps = input_shape[0]
    columns = [c["name"] for c in spec["columns"]]
    shape = f"{len(columns)} values (one per column {columns}) or an object of column -> value"
    records: list = []
    for sequence, where in zip(sequences, names, strict=True):
        if not isinstance(sequence, list):
            raise InvalidArgument(
                f"{where}: must be a list of {steps} steps, each {shape}; got {json_type(sequence)}"
            )
        if len(sequence) != steps:
            raise InvalidArgument(
                f"{where}: must hold exactly {steps} steps (the window the model was trained "
                f"on), got {len(sequence)}"
            )
        for t, step in enumerate(sequence):
            if isinstance(step, list):
                if len(step) != len(columns):
                    raise InvalidArgument(
                        f"{where}[{t}]: a step holds {shape}; got {len(step)} values"
                    )
                step = dict(zip(columns, step, strict=True))
            elif not isinstance(step, dict):
                raise InvalidArgument(f"{where}[{t}]: a step holds {shape}; got {json_type(step)}")
            records.append(step)
    x = encode(records, spec, field, lambda k: f"{names[k // steps]}[{k % steps}]")
    return x.reshape(len(sequences), steps, x.shape[-1])


class SequenceInfo(RecordsInfo):
    window: int = Field(description="the steps each sequence must hold")


EXAMPLE_WINDOW = [[50.2, 0.9], [51.0, 0.7], [52.3, 0.5]]  # illustrative: /info has T and F
WindowField = Annotated[
    list[Any],
    Field(
        description="one sequence of exactly T steps (the window, see /info), oldest first; "
        "each step a list of one value per column, in the order /info lists them, or an "
        "object of column -> value",
        examples=[EXAMPLE_WINDOW],
    ),
]
SequencesField = Annotated[
    list[Any],
    Field(
        description="a list of sequences, each as for /forecast; at most max_batch_size",
        examples=[[EXAMPLE_WINDOW, EXAMPLE_WINDOW[::-1]]],
    ),
]


def example_window(spec: dict, steps: int, reverse: bool = False) -> list[list[Any]]:
    """A valid window for the model: ``steps`` steps, oldest first, each a list of one value
    per input column, swinging one standard deviation about the training mean."""
    swing = (0, 1, 0, -1)
    window = [[example_value(col, swing[t % 4]) for col in spec["columns"]] for t in range(steps)]
    return window[::-1] if reverse else window


def _one(window: Any, card: ModelCard) -> np.ndarray:
    return encode_window(window, card.raw["preprocess"], card.input_shape)


def _many(sequences: Any, card: ModelCard) -> np.ndarray:
    return encode_sequences(
        sequences, card.raw["preprocess"], card.input_shape, card.max_batch_size
    )


def _read_shape(card: dict, where: Path) -> tuple[int, ...]:
    return read_records_shape(card, where, "sequence", "[T, F]")


SEQUENCE = DataKind(
    name="sequence",
    routes=(
        Route("forecast", "window", WindowField, _one, many=False,
              doc="One sequence of T steps: the forecast value (regression) or its class.",
              example=lambda card: example_window(card.raw["preprocess"], card.input_shape[0])),
        Route("predict_sequences", "sequences", SequencesField, _many, many=True,
              doc="Up to ``max_batch_size`` sequences in one call; answers in the same order.",
              example=lambda card: [
                  example_window(card.raw["preprocess"], card.input_shape[0], reverse)
                  for reverse in (False, True)
              ]),
    ),
    read_shape=_read_shape,
    request_limit=lambda card: records_limit(
        card.raw["preprocess"], card.max_batch_size, card.input_shape[0]
    ),
    info=SequenceInfo,
    info_fields=lambda card: {**records_info(card), "window": card.input_shape[0]},
)  # fmt: skip
