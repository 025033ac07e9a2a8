"""The study's time budget: ``make tune BUDGET=10m`` in seconds, and when a trial may start.

A budget is wall time for the trials, from the first trial's start: no trial starts after it,
and a trial's timeout never runs past it (the last one is killed at the deadline, FAIL). The
final run with the best params and the ensemble come after it and are not counted; the flow
says beforehand what the final run last cost, and at the end how long each part took.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
ACCEPTED = "seconds (600), or numbers with h, m or s (90s, 10m, 1h, 1h30m, 2.5m)"
_PART = r"(\d+(?:\.\d+)?)([hms])"


class BudgetError(ValueError):
    """A budget that is not a duration; the message names the accepted forms."""


def parse_duration(text: str | float | int, what: str = "BUDGET") -> float:
    """``"10m"`` -> 600.0. Plain seconds (``600``, ``"90"``), a number with a unit (``90s``,
    ``10m``, ``1h``, ``2.5m``) or units in order (``1h30m``); more than 0."""
    raw = str(text).strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", raw):
        seconds = float(raw)
    elif re.fullmatch(f"(?:{_PART})+", raw):
        parts = re.findall(_PART, raw)
        units = [unit for _, unit in parts]
        if len(set(units)) != len(units) or units != sorted(units, key="hms".index):
            raise BudgetError(f"{what} {text!r}: give each unit once, hours first; use {ACCEPTED}")
        seconds = sum(float(number) * UNITS[unit] for number, unit in parts)
    else:
        raise BudgetError(f"{what} {text!r} is not a duration: use {ACCEPTED}")
    if seconds <= 0:
        raise BudgetError(f"{what} {text!r}: a budget must be more than 0 seconds")
    return seconds


def format_duration(seconds: float) -> str:
    """600 -> ``10m``, 95 -> ``1m35s``, 3600 -> ``1h``, 3630 -> ``1h0m30s``, 4.2 -> ``4s``."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return (
            f"{hours}h{minutes}m{secs}s"
            if secs
            else f"{hours}h{minutes}m"
            if minutes
            else f"{hours}h"
        )
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


@dataclass(frozen=True)
class Budget:
    """What limits one ``make tune``: ``seconds`` of trials, and at most ``max_trials`` of them
    (None: as many as the time allows). ``origin`` says where the limits came from."""

    seconds: float
    max_trials: int | None
    origin: str

    def describe(self) -> str:
        count = "no trial limit" if self.max_trials is None else f"at most {self.max_trials} trials"
        return f"{format_duration(self.seconds)} of trials ({self.origin}), {count}"


def budget_for(
    timeout_seconds: float, n_trials: int, budget: str | float | None, count_given: bool
) -> Budget:
    """The run's budget: ``budget`` (``BUDGET=10m``) replaces ``tune.timeout_seconds`` and lifts
    the trial count unless one was given for this run too (``N_TRIALS``, ``--set
    tune.n_trials``); without it, params.yaml's ``tune.timeout_seconds`` and ``tune.n_trials``."""
    if budget is None:
        return Budget(timeout_seconds, n_trials, "tune.timeout_seconds, tune.n_trials")
    seconds = parse_duration(budget)
    shown = budget.strip() if isinstance(budget, str) else format_duration(seconds)
    return Budget(seconds, n_trials if count_given else None, f"BUDGET={shown}")


class Clock:
    """The budget's deadline as the trials run: whether another trial may start, and how long
    one may run. ``now`` is injectable for tests (``time.monotonic`` by default)."""

    def __init__(self, budget: Budget, trial_timeout: float, now: Callable[[], float] = None):
        self.budget, self.trial_timeout = budget, trial_timeout
        self._now = now or time.monotonic
        self.started = self._now()
        self.deadline = self.started + budget.seconds

    def remaining(self) -> float:
        return max(0.0, self.deadline - self._now())

    def elapsed(self) -> float:
        return self._now() - self.started

    def timeout(self) -> tuple[float, str]:
        """A trial starting now: its timeout, and the reason a trial killed at it gets:
        ``tune.trial_timeout_seconds``, or less when the budget ends sooner."""
        left = self.remaining()
        if left < self.trial_timeout:
            return left, f"the budget ({self.budget.origin}) ran out"
        return self.trial_timeout, "tune.trial_timeout_seconds"

    def why_not_start(self, started: int, quickest: float | None) -> str | None:
        """None when another trial may start now; otherwise why not. ``started``: trials this
        run started; ``quickest``: the shortest trial this run that finished (COMPLETE) took,
        seconds. A trial is not started when the time left is shorter: it would be killed
        unfinished and the budget would be spent for nothing."""
        if self.budget.max_trials is not None and started >= self.budget.max_trials:
            return f"{started} trial(s) started, the limit"
        left = self.remaining()
        if left <= 0:
            return f"the budget of {format_duration(self.budget.seconds)} is spent"
        if quickest is not None and left < quickest:
            return (
                f"{format_duration(left)} of the budget left, and the quickest finished trial "
                f"took {format_duration(quickest)}"
            )
        return None
