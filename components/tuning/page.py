"""What a study leaves for people: the trials table, the summary, the plots, reports/tuning.html.

The page is self-contained (plots inlined as PNG, no CDN, no JavaScript); the table goes to
reports/tuning/trials.csv and trials.json, the summary to reports/tuning/summary.json and, as
text, to the console.
"""

from __future__ import annotations

import csv
import json
from html import escape
from pathlib import Path

from components.config import TuneParams
from components.stage import replacing, write_text
from components.tuning.budget import format_duration
from components.tuning.compare import format_comparison
from components.tuning.study import (
    DEFAULTS_ATTR,
    best_of,
    best_overrides,
    direction,
    finished,
    shown,
)


def trials_table(study) -> list[dict]:
    """One row per trial: number, state, value, experiment, whether it measured the defaults,
    time, epochs, reason, params."""
    rows = []
    for t in study.trials:
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "experiment": t.user_attrs.get("experiment", ""),
                "defaults": DEFAULTS_ATTR in t.user_attrs,
                "seconds": t.user_attrs.get("seconds"),
                "epochs_run": t.user_attrs.get("epochs_run"),
                "last_epoch_reported": max(t.intermediate_values)
                if t.intermediate_values
                else None,
                "reason": t.user_attrs.get("reason", ""),
                **{
                    f"param:{k}": json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v
                    for k, v in t.params.items()
                },
            }
        )
    return rows


def summarise(
    study, tune: TuneParams, url: str, trials_before: int, trials_this_run: int, rows: list[dict]
) -> dict:
    """The study's summary: where it lives, its trials by state and its best trial."""
    complete = finished(study)
    summary: dict = {
        "study": tune.study_name,
        "storage": shown(url),  # never a password: the summary goes into reports/tuning*
        "sampler": tune.sampler,
        "metric": f"{tune.metric} ({direction(tune)}, validation split)",
        "trials_before": trials_before,
        "trials_this_run": trials_this_run,
        "trials_total": len(rows),
        "complete": len(complete),
        "pruned": sum(r["state"] == "PRUNED" for r in rows),
        "failed": sum(r["state"] == "FAIL" for r in rows),
    }
    if complete:
        best = best_of(study, tune)
        summary.update(
            best_trial=best.number,
            best_value=best.value,
            best_experiment=best.user_attrs.get("experiment"),
            best_params=" ".join(best_overrides(study, tune)),
        )
    return summary


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    csv_path, json_path = out_dir / "trials.csv", out_dir / "trials.json"
    with replacing(csv_path, "w") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items()}
            )
    write_text(json_path, json.dumps(rows, indent=2, default=str) + "\n")
    return csv_path, json_path


# Below this many finished trials the importances rank noise: the summary says so beside them.
FEW_FOR_IMPORTANCE = 10


def importances(study) -> dict[str, float]:
    """Optuna's parameter importance (PED-ANOVA); {} with too few finished trials."""
    import optuna

    if len(finished(study)) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def png_base64(fig, dpi: int = 90) -> str:
    """A matplotlib figure as base64 PNG text, for a ``data:`` URL (no file, no network); the
    figure is closed. No software stamp, so one figure always gives the same bytes."""
    import base64
    import io

    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_img(fig, alt: str, dpi: int = 100) -> str:
    """A matplotlib figure as an ``<img class="plot">`` with its PNG inline; the figure is
    closed."""
    return (
        f'<img class="plot" alt="{escape(alt)}" src="data:image/png;base64,{png_base64(fig, dpi)}">'
    )


def plots(rows: list[dict], ranked: dict[str, float], metric: str, maximise: bool) -> dict:
    """The objective over trials (with the best so far) and the params' importance, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out = {}
    done = [r for r in rows if r["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if done:
        xs, ys = [r["number"] for r in done], [r["value"] for r in done]
        ax.scatter(xs, ys, label="trial", color="#4477aa")
        best, line = None, []
        for y in ys:
            best = y if best is None else (max(best, y) if maximise else min(best, y))
            line.append(best)
        ax.step(xs, line, where="post", color="#cc6677", label="best so far")
    for r in rows:
        if r["state"] == "PRUNED":
            ax.axvline(r["number"], color="#bbbbbb", lw=0.8, ls=":")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} (validation)")
    if done:  # no finished trial: nothing labelled (an empty legend only warns)
        ax.legend(loc="best", fontsize=8)
    out["objective"] = png_base64(fig)
    if ranked:
        fig, ax = plt.subplots(figsize=(6, 0.4 + 0.35 * len(ranked)))
        names = list(ranked)[::-1]
        ax.barh(names, [ranked[n] for n in names], color="#228833")
        ax.set_xlabel("importance (PED-ANOVA, normalised)")
        out["importance"] = png_base64(fig)
    return out


def write_page(path: Path, summary: dict, rows: list[dict], images: dict) -> Path:
    """reports/tuning.html: self-contained (plots inlined as PNG, no CDN, no JavaScript)."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return escape("" if v is None else json.dumps(v) if isinstance(v, list) else str(v))

    columns = list(dict.fromkeys(k for row in rows for k in row if k != "reason"))
    head = "".join(f"<th>{escape(c.removeprefix('param:'))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    facts = "".join(
        f"<tr><th>{escape(k)}</th><td>{cell(v)}</td></tr>"
        for k, v in summary.items()
        if not isinstance(v, dict)
    )
    ensemble = summary.get("ensemble") or {}
    ens_rows = ""
    for label, m in (
        ("best single model", ensemble.get("best_single")),
        ("ensemble", ensemble.get("ensemble")),
    ):
        if m:
            ens_rows += (
                f"<tr><td>{label}</td><td>{m['accuracy']:.4f}</td><td>{m['macro_f1']:.4f}</td>"
                f"<td>{m['size_bytes'] / 1024:.1f}</td><td>{m['latency_ms_batch1']:.4f}</td></tr>"
            )
    ens_html = (
        "<h2>Ensemble vs the best single model (test split)</h2><table><tr><th>model</th>"
        "<th>accuracy</th><th>macro F1</th><th>KiB</th><th>ms at batch 1</th></tr>"
        f"{ens_rows}</table><p>{escape(ensemble.get('verdict', ''))}</p>"
        if ens_rows
        else f"<p>{escape(ensemble.get('note', ''))}</p>"
    )
    comparison_html = comparison_table(summary.get("comparison") or {})
    pics = "".join(
        f'<h2>{escape(title)}</h2><img alt="{escape(title)}" src="data:image/png;base64,{b64}">'
        for title, b64 in (
            ("Objective over trials", images.get("objective")),
            ("Parameter importance", images.get("importance")),
        )
        if b64
    )
    write_text(
        path,
        "<!doctype html><html><head><meta charset='utf-8'><title>Tuning: "
        f"{escape(summary['study'])}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
        "font-size:13px;text-align:left}</style></head><body>"
        f"<h1>Tuning study {escape(summary['study'])}</h1><table>{facts}</table>"
        f"{comparison_html}{pics}"
        f"<h2>Trials</h2><table><tr>{head}</tr>{body}</table>{ens_html}</body></html>\n",
    )
    return path


def comparison_table(comparison: dict) -> str:
    """The comparison with the defaults and the baselines as HTML: the validation figures that
    chose, then the test figures that only report."""
    if not comparison.get("validation"):
        return f"<p>{escape(comparison.get('note', ''))}</p>" if comparison else ""
    metric = escape(comparison["metric"])
    valid = "".join(
        f"<tr><td>{escape(r['label'])}</td><td>{r['trial']}</td><td>{r['value']:.4f}</td></tr>"
        for r in comparison["validation"]
    )
    keys = comparison["test_keys"]
    test = "".join(
        f"<tr><td>{escape(r['label'])}</td>"
        + "".join(
            f"<td>{r['metrics'][k]:.4f}</td>" if k in r["metrics"] else "<td></td>" for k in keys
        )
        + "</tr>"
        for r in comparison["test"]
    )
    head = "".join(f"<th>{escape(k)}</th>" for k in keys)
    notes = "".join(f"<li>{escape(n)}</li>" for n in comparison["notes"])
    gain = comparison.get("gain_over_defaults")
    verdict = (
        ""
        if gain is None
        else "<p>The defaults are the best trial.</p>"
        if comparison.get("best_is_defaults")
        else f"<p>Best vs defaults: {gain:+.4f} {metric} ({comparison['better']} is better).</p>"
    )
    return (
        "<h2>Compared with the defaults and the baselines</h2>"
        f"<h3>Choosing: validation split, {metric} ({escape(comparison['better'])} is better)</h3>"
        f"<table><tr><th>run</th><th>trial</th><th>{metric}</th></tr>{valid}</table>{verdict}"
        "<h3>Reporting: test split (never used to choose)</h3>"
        f"<table><tr><th>model</th>{head}</tr>{test}</table>"
        + (f"<ul>{notes}</ul>" if notes else "")
    )


def write_report(
    page: Path, out_dir: Path, summary: dict, rows: list[dict], study, tune: TuneParams
) -> Path:
    """The trials table and summary.json into ``out_dir`` and the page at ``page``; the
    params' importance is added to ``summary``. Returns the page's path."""
    write_table(rows, out_dir)
    ranked = importances(study)
    summary["importance"] = {k: round(v, 4) for k, v in ranked.items()}
    summary["importance_trials"] = len(finished(study))
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    images = plots(rows, ranked, tune.metric, direction(tune) == "maximize")
    return write_page(page, summary, rows, images)


def format_summary(summary: dict, page: Path) -> str:
    """The summary as the console shows it at the end of a study."""
    lines = ["", "Tuning summary"]
    for key in (
        "study",
        "storage",
        "sampler",
        "metric",
        "trials_before",
        "trials_this_run",
        "complete",
        "pruned",
        "failed",
        "best_trial",
        "best_value",
        "best_experiment",
        "best_params",
        "final_run",
        "final_run_model",
        "budget",
        "stopped",
    ):
        if key in summary:
            lines.append(f"  {key.replace('_', ' ')}: {summary[key]}")
    spent = [
        f"{label} {format_duration(summary[key])}"
        for label, key in (
            ("trials", "seconds_trials"),
            ("final run", "seconds_final_run"),
            ("ensemble", "seconds_ensemble"),
        )
        if summary.get(key) is not None
    ]
    if spent:
        lines.append(f"  time: {', '.join(spent)}")
    if summary.get("importance"):
        n = summary.get("importance_trials")
        few = n is not None and n < FEW_FOR_IMPORTANCE
        lines.append(
            f"  importance{f' ({n} finished trials: too few to rely on)' if few else ''}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in summary["importance"].items())
        )
    ens = summary.get("ensemble") or {}
    for label in ("best_single", "ensemble"):
        m = ens.get(label)
        if m:
            lines.append(
                f"  {label.replace('_', ' ')}: accuracy {m['accuracy']:.4f}, macro F1 "
                f"{m['macro_f1']:.4f}, {m['size_bytes'] / 1024:.0f} KiB, "
                f"{m['latency_ms_batch1']:.3f} ms at batch 1"
            )
    if ens.get("verdict") or ens.get("note"):
        lines.append(f"  ensemble: {ens.get('verdict') or ens.get('note')}")
    if ens.get("bento"):
        lines.append(f"  ensemble bento: {ens['bento']}")
    comparison = summary.get("comparison") or {}
    if comparison.get("validation"):
        lines.append("Compared with the defaults and the baselines")
        lines += format_comparison(comparison)
    elif comparison.get("note"):
        lines.append(f"  {comparison['note']}")
    if summary.get("best_experiment"):
        name = summary["best_experiment"]
        lines.append(f"  reproduce the best trial: dvc exp apply {name} && dvc repro")
    lines.append(f"  report: {page}")
    return "\n".join(lines)
