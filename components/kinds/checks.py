"""The vocabulary of validation that kinds speak: a check's outcome, and an expectation.

An :class:`Expectation` names a Great Expectations expectation class by its name (GX is
imported only by the validate stage, and slowly), the summary-table column it checks, the
description that becomes the check's name, and how a failure is put into words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# Turns a failed expectation's GX result (and our context: class names) into "found ...".
Detail = Callable[[dict, dict], str]


@dataclass(frozen=True)
class Check:
    """One evaluated expectation (GX or numpy) on one split."""

    split: str
    description: str  # what was expected, e.g. "pixel max <= 255"
    passed: bool
    detail: str = ""  # what was found, when it failed

    def __str__(self) -> str:
        text = f"{self.split}: {self.description}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class Expectation:
    """``great_expectations.expectations.<type>(column=column, description=..., **options)``."""

    type: str  # e.g. "ExpectColumnValuesToBeInSet"
    column: str
    description: str
    detail: Detail
    options: dict = field(default_factory=dict)


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
