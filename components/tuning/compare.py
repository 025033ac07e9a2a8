"""The study's outcome beside what it set out to beat: the defaults and the classical baselines.

Choosing uses the validation split only: the best trial's ``tune.metric`` beside the defaults
trial's (params.yaml as it is, the study's first trial, measured the same way). The test split
only reports, after the choice: the final run's test metrics (the best params' network, and the
model the bento serves, through the gates) beside the defaults trial's and the classical
baselines' (evaluate's ``metrics/baselines.json``, components/baselines.py). Each figure is
read through its typed record (components/records.py), from the workspace or from a trial's
DVC experiment.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydantic import ValidationError

from components import tasks
from components.records import (
    BASELINES_FILE,
    EVALUATE_FILE,
    Baselines,
    EvaluateMetrics,
    read_baselines,
    read_evaluate,
    read_gate,
)
from components.stage import StageError
from components.tuning.study import best_of, direction
from components.tuning.trials import experiment_ref


def experiment_record(root: Path, experiment: str, path: str, model):
    """``path`` (repository-relative) as the experiment recorded it, as ``model``; None when
    the experiment or the file is missing or is not such a record."""
    ref = experiment_ref(root, experiment)
    if ref is None:
        return None
    shown = subprocess.run(
        ["git", "show", f"{ref}:{path}"], cwd=root, capture_output=True, text=True, check=False
    )
    if shown.returncode != 0:
        return None
    try:
        return model.model_validate_json(shown.stdout)
    except ValidationError:
        return None


def _headline(record: EvaluateMetrics) -> dict[str, float]:
    numbers = record.numbers()
    return {k: numbers[k] for k in tasks.get(record.task).headline_keys if k in numbers}


def _trial_row(label: str, trial) -> dict:
    return {"label": label, "trial": trial.number, "value": trial.value}


def compare(
    root: Path, metrics_dir: str, study, tune, defaults_trial, final_run_passed: bool | None
) -> dict:
    """The comparison of the best trial with the defaults trial (validation) and of the final
    run with the defaults and the baselines (test). ``final_run_passed``: None when there was
    no final run, else whether it passed (its test metrics are reported only then: a run that
    stopped early may have left an older evaluate.json). Missing figures become notes."""
    maximise = direction(tune) == "maximize"
    best = best_of(study, tune)
    out: dict = {
        "metric": tune.metric,
        "better": "higher" if maximise else "lower",
        "validation": [],
        "test_keys": [],
        "test": [],
        "notes": [],
    }
    if defaults_trial is not None:
        out["validation"].append(_trial_row("defaults (params.yaml)", defaults_trial))
    else:
        out["notes"].append("the defaults trial did not finish: nothing to compare with")
    out["validation"].append(_trial_row("best", best))
    if defaults_trial is not None:
        gain = best.value - defaults_trial.value
        out["gain_over_defaults"] = gain if maximise else -gain
        out["best_is_defaults"] = best.number == defaults_trial.number

    metrics = Path(metrics_dir)
    evaluate_file = (metrics / EVALUATE_FILE).as_posix()
    rows, keys = [], None
    if defaults_trial is not None:
        record = experiment_record(
            root, defaults_trial.user_attrs.get("experiment", ""), evaluate_file, EvaluateMetrics
        )
        if record is not None:
            rows.append({"label": f"defaults, trial {defaults_trial.number}",
                         "metrics": _headline(record)})  # fmt: skip
            keys = tasks.get(record.task).headline_keys
    if final_run_passed:
        try:
            record = read_evaluate(root / metrics)
        except StageError as exc:
            out["notes"].append(f"the final run's test metrics: {exc}")
        else:
            keys = tasks.get(record.task).headline_keys
            rows.append({"label": "final run: network (best params)", "metrics": _headline(record)})
            try:  # what the bento serves, as the gate stage measured and passed it
                gate = read_gate(root / metrics)
            except StageError as exc:
                out["notes"].append(f"the final run's served model: {exc}")
            else:
                served = gate.served().model_dump()
                rows.append({
                    "label": f"final run: served {gate.served_variant} (gated)",
                    "metrics": {k: served[k] for k in keys if isinstance(served.get(k), float)},
                })  # fmt: skip
    else:
        record = experiment_record(
            root, best.user_attrs.get("experiment", ""), evaluate_file, EvaluateMetrics
        )
        if record is not None:
            rows.append({"label": f"best trial {best.number}", "metrics": _headline(record)})
            keys = tasks.get(record.task).headline_keys
        if final_run_passed is False:
            out["notes"].append("the final run did not pass: the best trial's own test figures")
    baselines, origin = _baselines(root, metrics, best, final_run_passed)
    if baselines is not None and baselines.baselines:
        ranked = sorted(
            baselines.baselines.items(), key=lambda kv: kv[0] != baselines.best
        )  # the best first
        for name, figures in ranked:
            rows.append({"label": f"baseline {name}", "metrics": dict(figures.metrics)})
        if origin:
            out["notes"].append(f"baselines: {origin}")
    else:
        out["notes"].append(
            "no classical baselines to compare with: evaluate fits them when "
            "evaluate.baselines is true (the final run does)"
        )
    if keys is None and rows:  # the baselines alone
        keys = tuple(rows[0]["metrics"])
    out["test_keys"] = list(keys or ())
    out["test"] = rows
    return out


def _baselines(root: Path, metrics: Path, best, final_run_passed: bool | None):
    """The baselines to report, and a note on where they come from when it is not the final
    run: the best trial's experiment (when trials fit them), else the workspace's last run."""
    if final_run_passed:
        try:
            return read_baselines(root / metrics), ""
        except StageError:
            return None, ""
    found = experiment_record(
        root, best.user_attrs.get("experiment", ""), (metrics / BASELINES_FILE).as_posix(),
        Baselines,
    )  # fmt: skip
    if found is not None and found.baselines:
        return found, f"fitted in trial {best.number}'s experiment"
    try:
        workspace = read_baselines(root / metrics)
    except StageError:
        return None, ""
    return workspace, f"{metrics / BASELINES_FILE} of the last pipeline run"


def format_comparison(comparison: dict) -> list[str]:
    """The comparison as the console (and the page's text) shows it."""
    metric, lines = comparison["metric"], []
    width = max([len(r["label"]) + 10 for r in comparison["validation"]] + [34])
    lines.append(
        f"  choosing, on the validation split ({metric}, {comparison['better']} is better):"
    )
    for row in comparison["validation"]:
        label = f"{row['label']}, trial {row['trial']}"
        lines.append(f"    {label:<{width}} {row['value']:.4f}")
    if "gain_over_defaults" in comparison:
        if comparison["best_is_defaults"]:
            lines.append("    the defaults are the best trial: no trial beat params.yaml")
        else:
            gain = comparison["gain_over_defaults"]
            word = "better" if gain > 0 else "worse" if gain < 0 else "no better"
            lines.append(f"    best vs defaults: {gain:+.4f} ({word})")
    keys = comparison["test_keys"]
    if comparison["test"]:
        lines.append("  reporting, on the test split (never used to choose):")
        lines.append(f"    {'':<{width}} " + " ".join(f"{k:>9}" for k in keys))
        for row in comparison["test"]:
            cells = " ".join(
                f"{row['metrics'][k]:9.4f}" if k in row["metrics"] else f"{'-':>9}" for k in keys
            )
            lines.append(f"    {row['label']:<{width}} {cells}")
    lines += [f"  note: {note}" for note in comparison["notes"]]
    return lines
