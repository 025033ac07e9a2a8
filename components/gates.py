"""What a gate is: one verdict with a one-line reason, and the gates every stage shares.

evaluate judges the network with its task's absolute gates; gate judges every ONNX variant
with the same ones, plus the drop from the network and the comparison with the champion; the
tuning flow judges an ensemble with them. Which metrics a gate reads comes from the task
(components/tasks/), never from a branch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EPS = 1e-9  # float noise: 0.9 measured as 0.8999999999 still meets a 0.9 threshold
# How people read a metric's key.
LABELS = {"accuracy": "accuracy", "macro_f1": "macro F1", "r2": "R^2", "rmse": "RMSE", "mae": "MAE"}


@dataclass(frozen=True)
class Gate:
    """One verdict: ``value`` compared with ``threshold`` by ``op``, and a one-line reason."""

    name: str
    value: float | None  # None: nothing to compare with (e.g. no champion yet)
    threshold: float | None
    passed: bool
    reason: str
    op: str = ">="  # how value must compare with threshold to pass: ">=" or "<="

    def to_json(self) -> dict:
        def num(x):
            return None if x is None else round(float(x), 6)

        return {
            "value": num(self.value),
            "threshold": num(self.threshold),
            "op": self.op,
            "passed": self.passed,
            "reason": self.reason,
        }


def at_least(name: str, label: str, value: float, limit: float, detail: str = "") -> Gate:
    """``value`` must reach ``limit``; the reason reads ``label value >= min limit``."""
    passed = value >= limit - EPS
    verb = ">=" if passed else "<"
    reason = f"{label} {value:.4f}{detail} {verb} min {limit:.4f}"
    return Gate(name, value, limit, passed, reason, ">=")


def failed_reasons(gates) -> list[str]:
    return [g.reason for g in gates if not g.passed]


def drop_gates(
    metrics: dict, reference: dict, max_drop: float, what: str, keys: Sequence[str], param: str
) -> tuple[Gate, ...]:
    """A compressed model may lose at most ``max_drop`` of each of ``keys`` vs ``reference``
    (gates ``<key>_drop``). ``param`` names the setting, when the reason should say it."""
    gates = []
    for key in keys:
        drop = reference[key] - metrics[key]
        passed = drop <= max_drop + EPS
        verb = "<=" if passed else ">"
        reason = (
            f"{LABELS[key]} drop vs {what} {drop:+.4f} ({reference[key]:.4f} -> "
            f"{metrics[key]:.4f}) {verb} max {max_drop:.4f}"
        )
        if param:
            reason += f" ({param})"
        gates.append(Gate(f"{key}_drop", drop, max_drop, passed, reason, "<="))
    return tuple(gates)


def champion_gates(
    metrics: dict,
    champion: dict | None,
    max_worse: float,
    champion_name: str,
    why_none: str,
    keys: Sequence[str],
) -> tuple[Gate, ...]:
    """Not worse than the champion: each of ``keys`` at least the champion's minus
    ``max_worse`` (gates ``vs_champion_<key>``). ``value`` is challenger - champion. Without
    a comparable champion one gate passes and says why (``why_none``)."""
    if champion is None:
        return (Gate("vs_champion", None, None, True, why_none),)
    gates = []
    for key in keys:
        label = LABELS[key]
        delta = metrics[key] - champion[key]
        passed = delta >= -max_worse - EPS
        if passed:
            reason = (
                f"{label} {metrics[key]:.4f} vs champion {champion_name} {champion[key]:.4f} "
                f"({delta:+.4f}, tolerance {max_worse:.4f})"
            )
        else:
            reason = (
                f"{label} {metrics[key]:.4f} is {-delta:.4f} below champion {champion_name} "
                f"{champion[key]:.4f}, more than the {max_worse:.4f} allowed"
            )
        gates.append(Gate(f"vs_champion_{key}", delta, -max_worse, passed, reason, ">="))
    return tuple(gates)
