"""The vocabulary of validation that kinds speak: a check's outcome, and an expectation.

An :class:`Expectation` names a Great Expectations expectation class by its name (GX is
imported only by the validate stage, and slowly), the summary-table column it checks, the
description that becomes the check's name, and how a failure is put into words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# The params.yaml keys that set the limits of the checks every kind shares, named by a failed
# check so the user knows what to change.
MIN_ROWS_PARAM = "validate.min_rows_per_class"
MISSING_PARAM = "validate.max_missing_fraction"

# Turns a failed expectation's GX result (and our context: class names) into "found ...".
Detail = Callable[[dict, dict], str]


@dataclass(frozen=True)
class Check:
    """One evaluated expectation (GX or numpy) on one split."""

    split: str
    description: str  # what was expected, e.g. "pixel max <= 255"
    passed: bool
    detail: str = ""  # what was found, when it failed
    param: str = ""  # the params.yaml key that sets the limit, when one does

    def __str__(self) -> str:
        text = f"{self.split}: {self.description}"
        # A failed check names the param that sets its limit: what the user may change.
        said = [self.detail] if self.detail else []
        if self.param and not self.passed:
            said.append(f"the limit is {self.param} in params.yaml")
        return f"{text} ({'; '.join(said)})" if said else text


@dataclass(frozen=True)
class Expectation:
    """``great_expectations.expectations.<type>(column=column, description=..., **options)``."""

    type: str  # e.g. "ExpectColumnValuesToBeInSet"
    column: str
    description: str
    detail: Detail
    options: dict = field(default_factory=dict)
    param: str = ""  # the params.yaml key its limit comes from, e.g. "validate.min_rows_per_class"


def fmt(value) -> str:
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def found(pick: Callable[[list], object], noun: str = "image") -> Detail:
    """Detail for a column check: the worst offending value and how many rows failed."""

    def detail(result: dict, _ctx: dict) -> str:
        values = [v for v in result.get("partial_unexpected_list", []) if v is not None]
        worst = f"found {fmt(pick(values))} in " if values else ""
        return f"{worst}{result['unexpected_count']} of {count(result['element_count'], noun)}"

    return detail


def share(noun: str) -> Detail:
    """Detail for a ``mostly`` check: how many rows failed, and their share."""

    def detail(result: dict, _ctx: dict) -> str:
        n, total = result["unexpected_count"], result["element_count"]
        return f"{n} of {count(total, noun)}, {n / total:.1%}" if total else f"no {noun}s"

    return detail


def labels_detail(result: dict, _ctx: dict) -> str:
    values = sorted({fmt(v) for v in result.get("partial_unexpected_list", [])})
    return f"found {', '.join(values)} in {count(result['unexpected_count'], 'image')}"
