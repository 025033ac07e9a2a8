"""Report: one self-contained HTML page per run, for people.

``reports/report.html`` puts together what the stages recorded: the verdict (promoted, kept,
refused and why), the data (kind, task, target and features, from the prepared meta.json),
every gate with its reason, the test metrics (classification: accuracy, macro F1, per-class
figures and the confusion matrix; regression: R^2, RMSE, MAE and a predicted-vs-actual plot
from predictions.csv), the training curves and the recipe's choices (model.json), the
compression trade-off, the data validation result (with links to our validation summary and
the Great Expectations Data Docs) and the champion's lineage. Plots are drawn with matplotlib
and inlined as PNG: the page needs no network, no JavaScript and no other file (the validation
pages it links to sit next to it).

The page names the run that wrote it: the Prefect flow run (the flow passes its name and id to
the stages in ``PIPELINE_FLOW_RUN_NAME`` and ``PIPELINE_FLOW_RUN_ID``, see
:func:`run_environment`), the DVC experiment when the flow knows its name
(``PIPELINE_EXPERIMENT``), the git commit, the date, and the params that differ from
``params.yaml`` at that commit (the overrides of the run).

The ``report`` stage runs last. A run that a stage stops never reaches it: the flow writes that
run's page, ``stopped.html``, with :func:`write_stopped`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import os
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from components import records, tasks
from components.config import PARAMS_FILE, Params, ParamsError, load_yaml, read_params_file
from components.stage import StageError, main, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("pipeline.report")

REPORT_FILE = "report.html"
# The stages whose results the report shows, in pipeline order.
STAGES = ("validate", "train", "evaluate", "compress", "gate", "package", "promote")
# How a flow tells the stages' processes which run they belong to (see run_environment).
FLOW_RUN_NAME_ENV = "PIPELINE_FLOW_RUN_NAME"
FLOW_RUN_ID_ENV = "PIPELINE_FLOW_RUN_ID"
EXPERIMENT_ENV = "PIPELINE_EXPERIMENT"
ABSENT = object()  # a param one side of params_changed lacks (null is a value)


@dataclass
class ReportInputs:
    """Everything the page shows; a missing piece is None and its section says so."""

    validation: dict | None = None
    train: dict | None = None
    history: list[dict] | None = None
    # The recipe's "train.key value: why" lines from model.json (components/recipe.py); None:
    # no model.json, or one written before the recipe
    recipe: list[str] | None = None
    evaluate: dict | None = None
    evaluate_gates: dict | None = None  # evaluate's verdicts on the network
    baselines: dict | None = None  # the classical baselines beside the network (baselines.json)
    confusion: list[tuple[str, str]] | None = None
    predictions: list[tuple[float, float]] | None = None  # regression: (actual, predicted)
    meta: dict | None = None  # the prepared data's meta.json: kind, task, target, features
    compress: dict | None = None
    gate: dict | None = None
    promote: dict | None = None
    bento: dict | None = None
    validation_links: dict[str, bool] = field(default_factory=dict)  # href -> exists
    stopped_at: str | None = None  # the stage a gate stopped the run in
    stop_reason: str | None = None
    run: RunIdentity | None = None  # which run wrote the page


@dataclass(frozen=True)
class RunIdentity:
    """Which run wrote a page: its Prefect flow run and DVC experiment (None: not known, e.g.
    ``dvc repro`` by hand), git commit, date, and the params that differ from git."""

    flow_run_name: str | None
    flow_run_id: str | None
    experiment: str | None
    git_commit: str | None  # None: not a git repository, or no commit yet
    written_at: str  # UTC, e.g. "2026-12-01 23:40:12 UTC"
    # (key, in git, in this run) per param that differs from params.yaml at the commit; None:
    # nothing to compare with (no commit, or params.yaml not in it)
    params_changed: tuple[tuple[str, object, object], ...] | None


def run_environment(flow_run_name: str, flow_run_id: str, experiment: str = "") -> dict:
    """The environment a flow sets so that the report its stages write names the run."""
    env = {FLOW_RUN_NAME_ENV: flow_run_name, FLOW_RUN_ID_ENV: flow_run_id}
    return env | ({EXPERIMENT_ENV: experiment} if experiment else {})


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _flatten(mapping: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def params_changed(root: Path, params_file: Path = PARAMS_FILE):
    """(key, value in git, value here) per param of ``params_file`` that is not as committed at
    HEAD, in file order; None when there is no commit or no committed params file to compare
    with."""
    import yaml

    committed = _git(root, "show", f"HEAD:./{Path(params_file).as_posix()}")
    if committed is None:
        return None
    try:
        before = _flatten(load_yaml(committed) or {})
        now = _flatten(read_params_file(Path(root) / params_file))
    except (yaml.YAMLError, ParamsError, AttributeError) as exc:
        log.warning("params not compared with git: %s", exc)
        return None
    keys = list(now) + [k for k in before if k not in now]
    return tuple(
        (k, before.get(k, ABSENT), now.get(k, ABSENT))
        for k in keys
        if before.get(k, ABSENT) != now.get(k, ABSENT)
    )


def run_identity(root: Path = Path("."), environ=None) -> RunIdentity:
    """Which run this process belongs to: the flow's environment (run_environment), the
    Prefect runner's flow run id as a fallback, and git."""
    environ = os.environ if environ is None else environ
    commit = (_git(root, "rev-parse", "HEAD") or "").strip() or None
    return RunIdentity(
        flow_run_name=environ.get(FLOW_RUN_NAME_ENV) or None,
        flow_run_id=environ.get(FLOW_RUN_ID_ENV) or environ.get("PREFECT__FLOW_RUN_ID") or None,
        experiment=environ.get(EXPERIMENT_ENV) or None,
        git_commit=commit,
        written_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        params_changed=params_changed(root),
    )


# -- reading ---------------------------------------------------------------------------------


def _json(path: Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(
            f"{path} is not valid JSON ({exc}): re-run the stage that writes it"
        ) from None
    return value if isinstance(value, dict) else None


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):  # "null", "" in a history row: not measured that epoch
        return math.nan


def _history(path: Path) -> list[dict] | None:
    if not Path(path).is_file():
        return None
    with Path(path).open() as fh:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _confusion(path: Path) -> list[tuple[str, str]] | None:
    if not Path(path).is_file():
        return None
    with Path(path).open() as fh:
        return [(row["actual"], row["predicted"]) for row in csv.DictReader(fh)]


def _predictions(path: Path) -> list[tuple[float, float]] | None:
    if not Path(path).is_file():
        return None
    with Path(path).open() as fh:
        rows = [(_number(r.get("actual")), _number(r.get("predicted"))) for r in csv.DictReader(fh)]
    return [(a, p) for a, p in rows if math.isfinite(a) and math.isfinite(p)] or None


def _recipe(path: Path) -> list[str] | None:
    """model.json's recipe choices (read as plain JSON: the report does not load the network,
    components/model.py ``ModelCard`` is the record's schema)."""
    card = _json(path)
    recipe = (card or {}).get("recipe")
    choices = recipe.get("choices") if isinstance(recipe, dict) else None
    if not isinstance(choices, list):
        return None
    return [str(line) for line in choices]


def gather(
    params: Params,
    stopped_at: str | None = None,
    stop_reason: str | None = None,
    root: Path = Path("."),
):
    """Read what the stages up to ``stopped_at`` (all, when None) recorded, and which run this
    is (``root``: the repository, for git)."""
    paths = params.paths
    metrics = Path(paths.metrics_dir)
    reached = STAGES if stopped_at is None else STAGES[: STAGES.index(stopped_at) + 1]
    inputs = ReportInputs(stopped_at=stopped_at, stop_reason=stop_reason)
    inputs.run = run_identity(root)
    inputs.meta = _json(Path(paths.prepared_dir) / "meta.json")
    if "validate" in reached:
        inputs.validation = _json(metrics / "validation.json")
        docs = Path(paths.reports_dir) / "validation"
        inputs.validation_links = {
            "validation/summary.html": (docs / "summary.html").is_file(),
            "validation/index.html": (docs / "index.html").is_file(),
        }
    if "train" in reached:
        inputs.train = _json(metrics / "train.json")
        inputs.history = _history(metrics / "train_history.csv")
        inputs.recipe = _recipe(Path(paths.model_dir) / "model.json")
    if "evaluate" in reached:
        inputs.evaluate = _json(metrics / records.EVALUATE_FILE)
        inputs.evaluate_gates = _json(metrics / records.EVALUATE_GATES_FILE)
        inputs.baselines = _json(metrics / records.BASELINES_FILE)
        inputs.confusion = _confusion(metrics / "confusion.csv")
        inputs.predictions = _predictions(metrics / "predictions.csv")
    if "compress" in reached:
        inputs.compress = _json(metrics / "compress.json")
    if "gate" in reached:
        inputs.gate = _json(metrics / "gate.json")
    if "package" in reached:
        inputs.bento = _json(Path(paths.artefacts_dir) / "bento.json")
    if "promote" in reached:
        inputs.promote = _json(metrics / "promote.json")
    return inputs


# -- plots -----------------------------------------------------------------------------------


def _png(fig, alt: str) -> str:
    """A matplotlib figure as an <img> with an inline PNG (no file, no network)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def _labels_clash(fig, ax) -> bool:
    """Would the x tick labels of ``ax``, drawn level, run into each other or past the axes'
    right edge (into a colour bar's labels)? Measured on the figure as it is drawn."""
    fig.draw_without_rendering()  # places the labels; only the save draws the pixels
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
    gap = 2  # pixels between two labels
    right = ax.get_window_extent(renderer).x1
    return any(a.x1 + gap > b.x0 for a, b in zip(boxes, boxes[1:], strict=False)) or bool(
        boxes and boxes[-1].x1 > right + gap
    )


HISTORY_METRICS = {"acc": "Accuracy", "rmse": "RMSE", "mae": "MAE", "r2": "R^2"}


def figure_history(history: list[dict]) -> tuple[Figure, str]:
    """Loss per epoch, and the validation metric: accuracy (classification) or RMSE
    (regression: train logs val_rmse in the target's units)."""
    fig, (loss_ax, acc_ax) = _figure(1, 2, figsize=(9, 3.2))
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    shown = []
    for name in history[0]:
        values = [row[name] for row in history]
        if all(math.isnan(v) for v in values if isinstance(v, float)):
            continue  # the other task's column, or an epoch field: nothing to draw
        if "loss" in name:
            loss_ax.plot(epochs, values, marker="o", label=name)
        elif any(key in name for key in HISTORY_METRICS):
            acc_ax.plot(epochs, values, marker="o", label=name)
            shown.append(next(v for k, v in HISTORY_METRICS.items() if k in name))
    what = " and ".join(dict.fromkeys(shown)) or "Accuracy"
    loss_ax.set(title="Loss per epoch", xlabel="epoch")
    acc_ax.set(title=f"{what} per epoch", xlabel="epoch")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return fig, f"training and validation loss and {what.lower()} per epoch"


def plot_history(history: list[dict]) -> str:
    """:func:`figure_history` as an inline PNG."""
    return _png(*figure_history(history))


def figure_predictions(pairs: list[tuple[float, float]]) -> tuple[Figure, str]:
    """Regression: predicted against actual values (the diagonal is a perfect model), and
    the residuals' histogram."""
    import numpy as np

    actual = np.array([a for a, _ in pairs])
    predicted = np.array([p for _, p in pairs])
    fig, (ax, hist_ax) = _figure(1, 2, figsize=(9, 3.6))
    ax.scatter(actual, predicted, s=12, alpha=0.6, color="tab:blue")
    low = float(min(actual.min(), predicted.min()))
    high = float(max(actual.max(), predicted.max()))
    ax.plot([low, high], [low, high], color="crimson", linestyle="--", label="predicted = actual")
    ax.set(title="Predicted vs actual (test split)", xlabel="actual", ylabel="predicted")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist_ax.hist(predicted - actual, bins=min(30, max(5, len(pairs) // 5)), color="tab:orange")
    hist_ax.axvline(0, color="black", linewidth=1)
    hist_ax.set(title="Residuals (predicted - actual)", xlabel="residual", ylabel="examples")
    hist_ax.grid(alpha=0.3)
    for axes in (ax, hist_ax):  # at most 5 ticks: a target in millions or in 1e-4 reads wide
        axes.locator_params(axis="x", nbins=5)
    return fig, "predicted vs actual values of the test split, and the residuals"


def plot_predictions(pairs: list[tuple[float, float]]) -> str:
    """:func:`figure_predictions` as an inline PNG."""
    return _png(*figure_predictions(pairs))


def figure_confusion(pairs: list[tuple[str, str]], class_names: list[str]) -> tuple[Figure, str]:
    import numpy as np

    index = {name: i for i, name in enumerate(class_names)}
    k = len(class_names)
    counts = np.zeros((k, k), dtype=int)
    for actual, predicted in pairs:
        if actual in index and predicted in index:
            counts[index[actual], index[predicted]] += 1
    size = min(9, 2.5 + 0.45 * k)
    fig, ax = _figure(figsize=(size, size * 0.85))
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the actual class")
    ticks = range(k)
    ax.set_xticks(ticks, class_names)
    ax.set_yticks(ticks, class_names)
    if _labels_clash(fig, ax):  # names wider than their cells: one under each column, upright
        ax.tick_params(axis="x", labelrotation=90)
    ax.set(xlabel="predicted", ylabel="actual", title="Confusion matrix (test split)")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    color = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, counts[i, j], ha="center", va="center", color=color, fontsize=8)
    return fig, "confusion matrix of the test split"


def plot_confusion(pairs: list[tuple[str, str]], class_names: list[str]) -> str:
    """:func:`figure_confusion` as an inline PNG."""
    return _png(*figure_confusion(pairs, class_names))


def figure_per_class(per_class: dict, min_recall: float | None) -> tuple[Figure, str]:
    import numpy as np

    names = list(per_class)
    y = np.arange(len(names))
    fig, ax = _figure(figsize=(7, 1.2 + 0.32 * len(names)))
    height = 0.27
    for offset, key in zip((-height, 0, height), ("precision", "recall", "f1"), strict=True):
        ax.barh(y + offset, [per_class[n][key] for n in names], height, label=key)
    if min_recall is not None:
        ax.axvline(min_recall, color="crimson", linestyle="--", label="min class recall")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.05), title="Per-class figures (test split)", xlabel="score")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig, "per-class precision, recall and F1"


def plot_per_class(per_class: dict, min_recall: float | None) -> str:
    """:func:`figure_per_class` as an inline PNG."""
    return _png(*figure_per_class(per_class, min_recall))


def figure_compression(
    variants: dict, metric: str = "accuracy", served: str | None = None
) -> tuple[Figure, str]:
    """Size against the test metric (``accuracy``, or ``r2`` for regression), and latency.

    Variants often lie close together (same accuracy, similar size), so the points are told
    apart by marker and colour in a legend beside the axes, never by labels on the points,
    and the latency bars are horizontal, each named on its own line.
    """
    label = {"accuracy": "accuracy", "r2": "R^2"}.get(metric, metric)
    names = [n for n in variants if isinstance(variants[n].get(metric), int | float)]
    markers = "osD^vP<>Xph*"
    fig, (acc_ax, lat_ax) = _figure(
        1, 2, figsize=(10, max(3.4, 1.0 + 0.32 * len(variants))), width_ratios=(1.25, 1)
    )
    for i, name in enumerate(names):
        v = variants[name]
        acc_ax.scatter(
            v["size_bytes"] / 1024,
            v[metric],
            s=140 if name == served else 60,
            marker="*" if name == served else markers[i % len(markers)],
            color=f"C{i % 10}",
            label=f"{name} (served)" if name == served else name,
            edgecolors="black" if name == served else "none",
            zorder=3,
        )
    acc_ax.set(title=f"Test {label} vs model size", xlabel="size (KiB)", ylabel=label)
    acc_ax.margins(x=0.15, y=0.25)
    acc_ax.grid(alpha=0.3)
    if names:
        acc_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8)
    shown = [(n, variants[n].get("latency_ms_batch1")) for n in variants]
    shown = [(n, v) for n, v in shown if v is not None]
    colours = [f"C{names.index(n) % 10}" if n in names else "tab:orange" for n, _ in shown]
    bars = [f"{n} (served)" if n == served else n for n, _ in shown]
    lat_ax.barh(bars, [v for _, v in shown], color=colours)
    lat_ax.invert_yaxis()  # the table's order, top to bottom
    lat_ax.tick_params(axis="y", labelsize=8)
    lat_ax.set(title="Latency at batch 1 (ms, 1 thread)", xlabel="ms")
    lat_ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig, f"compression trade-off: size, {label} and latency"


def plot_compression(variants: dict, metric: str = "accuracy", served: str | None = None) -> str:
    """:func:`figure_compression` as an inline PNG."""
    return _png(*figure_compression(variants, metric, served))


# -- HTML ------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2230;
background:#f6f7fa}
main{max-width:1000px;margin:0 auto;padding:1.5em}
h1{margin:.2em 0}h2{margin-top:1.6em;border-bottom:2px solid #dde1ea;padding-bottom:.2em}
section{background:#fff;border:1px solid #dde1ea;border-radius:8px;padding:.6em 1.2em 1.2em;
margin:1em 0}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #dde1ea;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f0f2f7}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.nowrap{white-space:nowrap}
.badge{display:inline-block;padding:.15em .6em;border-radius:4px;font-weight:600;color:#fff}
.pass{background:#1a7f37}.fail{background:#c62828}.info{background:#5a6478}
.verdict{font-size:1.15em;padding:.8em 1em;border-radius:8px;color:#fff;margin:1em 0}
.verdict.pass{background:#1a7f37}.verdict.fail{background:#c62828}.verdict.info{background:#5a6478}
tr.failed td{background:#fdecea}img.plot{max-width:100%;height:auto;display:block;margin:.6em 0}
.muted{color:#5a6478}code{background:#f0f2f7;padding:.05em .3em;border-radius:3px}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _f(value, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _e(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and value > 1):
        return str(int(value))
    return f"{value:.{digits}f}"


def _badge(passed: bool | None, yes: str = "PASS", no: str = "FAIL") -> str:
    if passed is None:
        return '<span class="badge info">n/a</span>'
    return f'<span class="badge {"pass" if passed else "fail"}">{yes if passed else no}</span>'


def _gate_rows(subject: str, gates: dict) -> list[str]:
    rows = []
    for name, g in gates.items():
        op = g.get("op", ">=")
        threshold = g.get("threshold")
        limit = "&ndash;" if threshold is None else f"{_e(op)} {_f(threshold)}"
        css = "" if g.get("passed") else ' class="failed"'
        rows.append(
            f"<tr{css}><td>{_e(subject)}</td><td>{_e(name)}</td><td class=num>"
            f"{_f(g.get('value'))}</td><td class=nowrap>{limit}</td>"
            f"<td>{_badge(g.get('passed'))}</td><td>{_e(g.get('reason', ''))}</td></tr>"
        )
    return rows


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _not_reached(stage: str, inputs: ReportInputs) -> str:
    if inputs.stopped_at is not None:
        where = _e(inputs.stopped_at)
        return f'<p class="muted">Not reached: the run stopped at <b>{where}</b>.</p>'
    return f'<p class="muted">No result: {_e(stage)} has not written its file.</p>'


def _headline(inputs: ReportInputs) -> tuple[str, str]:
    """(css class, sentence) of the run's outcome."""
    if inputs.stopped_at is not None:
        return "fail", f"Refused at {inputs.stopped_at}: {inputs.stop_reason or 'a gate failed'}"
    promote = inputs.promote or {}
    run = promote.get("run", "?")
    if promote.get("promoted"):
        before = promote.get("champion_before")
        was = f" (was {before})" if before else " (the first champion)"
        return "pass", f"Promoted: run {run} is the champion{was}. {promote.get('reason', '')}"
    if promote.get("inputs_differ"):  # the reason says what differs and how to take it anyway
        return "info", f"Not promoted: {promote.get('reason', '')}"
    if promote:
        return "info", f"Not promoted ({promote.get('outcome')}): {promote.get('reason', '')}"
    return "info", "The run has not been through promotion."


def _task(inputs: ReportInputs) -> str:
    """classification or regression: what evaluate measured, else what the data is."""
    if inputs.evaluate:
        return tasks.of_metrics(inputs.evaluate).name
    return (inputs.meta or {}).get("task") or "classification"


def data_facts(meta: dict | None) -> str:
    """One paragraph on the data: kind, task, target, input shape and the model's features."""
    if not meta:
        return ""
    kind, task = meta.get("kind", "image"), meta.get("task", "classification")
    shape = [int(d) for d in meta.get("input_shape") or []]
    classes = meta.get("class_names") or []
    facts = []
    if kind == "image" and len(shape) == 3:
        facts.append("images of {}x{} pixels, {} channel(s)".format(*shape[1:], shape[0]))
    elif kind == "sequence" and len(shape) == 2:
        facts.append(f"sequences of {shape[0]} steps of {shape[1]} values")
    else:
        facts.append(f"{'a table' if kind == 'table' else _e(kind)}")
    if not tasks.get(task).has_classes:
        facts.append(f"regression of <code>{_e(meta.get('target', ''))}</code>")
    else:
        target = f" of <code>{_e(meta['target'])}</code>" if meta.get("target") else ""
        facts.append(f"classification{target} into {len(classes)} classes")
    sizes = meta.get("split_sizes") or {}
    if sizes:
        facts.append("examples: " + ", ".join(f"{_e(k)} {_e(v)}" for k, v in sizes.items()))
    text = "Data: " + "; ".join(facts) + "."
    features = list(meta.get("feature_names") or [])
    if features:
        shown = ", ".join(_e(f) for f in features[:12])
        more = f" and {len(features) - 12} more" if len(features) > 12 else ""
        columns = [c.get("name") for c in (meta.get("preprocess") or {}).get("columns", [])]
        source = (
            f" (encoded from the columns {', '.join(_e(c) for c in columns)})" if columns else ""
        )
        text += f" {len(features)} features{source}: {shown}{more}."
    return f'<p class="data">{text}</p>'


GATES_HEAD = (
    "<table><tr><th>model</th><th>gate</th><th>value</th><th>threshold</th><th>verdict</th>"
    "<th>reason</th></tr>"
)


def section_gates(inputs: ReportInputs) -> str:
    """The served variant's gates and the network's (they decide), then the others folded."""
    lead, others, folded = [], [], 0
    if inputs.gate:
        variants = inputs.gate.get("variants", {})
        for name in sorted(variants):
            v = variants[name]
            if v.get("served"):
                lead += _gate_rows(f"{name} ONNX (served)", v.get("gates", {}))
            else:
                others += _gate_rows(f"{name} ONNX (not served)", v.get("gates", {}))
                folded += 1
    if inputs.evaluate_gates and "gates" in inputs.evaluate_gates:
        lead += _gate_rows("network (PyTorch)", inputs.evaluate_gates["gates"])
    if not lead and not others:
        return "<h2>Gates</h2>" + _not_reached("evaluate", inputs)
    champion = ""
    if inputs.gate:
        c = inputs.gate.get("champion", {})
        champion = f"<p>Compared with the champion: {_e(c.get('note', ''))}.</p>"
    rest = ""
    if others:
        failing = sum('class="failed"' in row for row in others)
        rest = (
            f"<details><summary>{_plural(folded, 'variant')} not served: {len(others)} gates, "
            f"{failing} failing (shown for comparison; they decide nothing)</summary>"
            + GATES_HEAD
            + "".join(others)
            + "</table></details>"
        )
    return (
        "<h2>Gates</h2><p>The served model's verdicts and the trained network's decide.</p>"
        + champion
        + GATES_HEAD
        + "".join(lead)
        + "</table>"
        + rest
    )


REGRESSION_COLUMNS = {"r2": "R^2", "rmse": "RMSE", "mae": "MAE"}


def _metric_rows(inputs: ReportInputs, keys) -> str:
    columns = [("network (PyTorch)", inputs.evaluate)]
    if inputs.gate:
        for name, v in inputs.gate.get("variants", {}).items():
            columns.append((f"{name} ONNX" + (" (served)" if v.get("served") else ""), v))
    for name, b in ((inputs.baselines or {}).get("baselines") or {}).items():
        columns.append((f"baseline: {name}", b.get("metrics", {})))
    return "".join(
        f"<tr><td>{_e(label)}</td>"
        + "".join(f"<td class=num>{_f(m.get(k))}</td>" for k in keys)
        + "</tr>"
        for label, m in columns
    )


def baselines_sentence(inputs: ReportInputs) -> str:
    """One line: the best classical baseline and the network's lift over it."""
    record = inputs.baselines or {}
    if not record.get("best"):
        return ""
    figures = record["baselines"][record["best"]]
    lift = record.get("lift")
    verb = "beats" if lift is not None and lift > 0 else "does not beat"
    return (
        f"<p>The network {verb} the best classical baseline, {_e(record['best'])} (fitted on "
        f"{_e(figures.get('train_rows'))} training examples in {_f(figures.get('fit_seconds'), 1)}"
        f" s): lift {_e(f'{lift:+.4f}')} (evaluate.min_lift_over_baseline gates it when set).</p>"
    )


def section_regression_metrics(inputs: ReportInputs) -> str:
    ev = inputs.evaluate
    head = "".join(f"<th>{_e(label)}</th>" for label in REGRESSION_COLUMNS.values())
    target = ev.get("target") or (inputs.meta or {}).get("target")
    units = f" (MAE and RMSE in the units of <code>{_e(target)}</code>)" if target else ""
    parts = [
        f"<h2>Test metrics</h2><p>{_e(ev.get('test_examples', '?'))} test examples{units}; "
        "R^2 is the share of the target's variance explained (1 is perfect, 0 is predicting "
        "the mean).</p>",
        f"<table><tr><th>model</th>{head}</tr>{_metric_rows(inputs, REGRESSION_COLUMNS)}</table>",
        baselines_sentence(inputs),
    ]
    if inputs.predictions:
        parts.append(plot_predictions(inputs.predictions))
    return "".join(parts)


def section_metrics(inputs: ReportInputs) -> str:
    ev = inputs.evaluate
    if not ev:
        return "<h2>Test metrics</h2>" + _not_reached("evaluate", inputs)
    if not tasks.of_metrics(ev).has_classes:
        return section_regression_metrics(inputs)
    keys = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "min_class_recall")
    head = "".join(f"<th>{_e(k.replace('_', ' '))}</th>" for k in keys)
    body = _metric_rows(inputs, keys)
    per_class = ev.get("per_class", {})
    threshold = ((ev.get("gates") or {}).get("min_class_recall") or {}).get("threshold")
    class_rows = "".join(
        f"<tr><td>{_e(n)}</td><td class=num>{_f(c['precision'])}</td><td class=num>"
        f"{_f(c['recall'])}</td><td class=num>{_f(c['f1'])}</td><td class=num>{c['support']}"
        "</td></tr>"
        for n, c in per_class.items()
    )
    parts = [
        f"<h2>Test metrics</h2><p>{_e(ev.get('test_examples', '?'))} test examples.</p>",
        f"<table><tr><th>model</th>{head}</tr>{body}</table>",
        baselines_sentence(inputs),
    ]
    if per_class:
        parts.append(plot_per_class(per_class, threshold))
        parts.append(
            "<details><summary>Per-class table (network)</summary><table><tr><th>class</th>"
            "<th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
            f"{class_rows}</table></details>"
        )
    if inputs.confusion:
        parts.append(plot_confusion(inputs.confusion, list(per_class)))
    return "".join(parts)


def section_recipe(choices: list[str] | None) -> str:
    """The recipe's choices: one row per train param it chose, with the value and why."""
    if choices is None:
        return ""
    if not choices:
        return (
            "<h3>Recipe</h3><p class=muted>The recipe chose nothing: every train param it "
            "could choose was set (params.yaml, <code>--set</code> or a tuning trial).</p>"
        )
    rows = []
    for line in choices:
        setting, _, why = line.partition(": ")
        key, _, value = setting.partition(" ")
        rows.append(
            f"<tr><td class=nowrap><code>{_e(key)}</code></td><td class=nowrap>{_e(value)}</td>"
            f"<td>{_e(why)}</td></tr>"
        )
    return (
        "<h3>Recipe</h3><p>What train chose for the values left <code>auto</code> / "
        "<code>null</code> (components/recipe.py; a value that is set is used as it is):</p>"
        "<table><tr><th>param</th><th>chosen</th><th>why</th></tr>" + "".join(rows) + "</table>"
    )


def section_training(inputs: ReportInputs) -> str:
    if not inputs.history:
        return "<h2>Training</h2>" + _not_reached("train", inputs)
    t = inputs.train or {}
    facts = ", ".join(f"{_e(k.replace('_', ' '))} {_f(v)}" for k, v in t.items())
    return (
        f"<h2>Training</h2><p>{facts}</p>"
        + plot_history(inputs.history)
        + section_recipe(inputs.recipe)
    )


def section_compression(inputs: ReportInputs) -> str:
    comp = inputs.compress
    if not comp or not isinstance(comp.get("variants"), dict):
        return "<h2>Compression</h2>" + _not_reached("compress", inputs)
    measured = (inputs.gate or {}).get("variants", {})
    regression = not tasks.get(_task(inputs)).has_classes
    # compress.json's own figures, overridden by what the gate measured on the test split.
    keys = ("r2", "rmse", "mae") if regression else ("accuracy", "macro_f1")
    labels = [REGRESSION_COLUMNS[k] for k in keys] if regression else ["accuracy", "macro F1"]
    variants = {}
    rows = []
    for name, v in comp["variants"].items():
        if not isinstance(v, dict) or not isinstance(v.get("size_bytes"), int | float):
            continue
        ours = measured.get(name, {})
        m = {**v, **{k: ours[k] for k in keys if k in ours}}
        variants[name] = m
        served = name == comp.get("served_variant")
        rows.append(
            f"<tr><td>{_e(name)}{' (served)' if served else ''}</td>"
            f"<td class=num>{m['size_bytes'] / 1024:.1f}</td>"
            f"<td class=num>{_f(m.get('latency_ms_batch1'), 3)}</td>"
            + "".join(f"<td class=num>{_f(m.get(k))}</td>" for k in keys)
            + "</tr>"
        )
    gate = comp.get("gate") or {}
    drop = ""
    for key, label in (("int8_r2_drop", "R^2"), ("int8_accuracy_drop", "accuracy")):
        if isinstance(comp.get(key), int | float):
            drop = (
                f"<p>int8 {label} drop vs fp32: {_f(comp[key])} (max "
                f"{_f(gate.get('max_accuracy_drop'))}) {_badge(gate.get('passed'))}</p>"
            )
            break
    head = "".join(f"<th>{_e(label)}</th>" for label in labels)
    plot = plot_compression(variants, keys[0], comp.get("served_variant")) if variants else ""
    return (
        "<h2>Compression</h2><table><tr><th>variant</th><th>size (KiB)</th>"
        f"<th>latency batch 1 (ms)</th>{head}</tr>" + "".join(rows) + "</table>" + drop + plot
    )


def section_validation(inputs: ReportInputs) -> str:
    v = inputs.validation
    if not v:
        return "<h2>Data validation</h2>" + _not_reached("validate", inputs)
    links = []
    for href, label in (
        ("validation/summary.html", "our validation summary (every check)"),
        ("validation/index.html", "Great Expectations Data Docs (each suite on each split)"),
    ):
        if inputs.validation_links.get(href):
            links.append(f'<li><a href="{_e(href)}">{_e(label)}</a></li>')
        else:
            links.append(f"<li>{_e(label)}: not built</li>")
    failed = "".join(f"<li>{_e(f)}</li>" for f in v.get("failed", []))
    return (
        f"<h2>Data validation</h2><p>{_badge(v.get('success'), 'PASSED', 'FAILED')} "
        f"{_e(v.get('evaluated_expectations', '?'))} checks on the prepared splits.</p>"
        + (f"<p>Failed:</p><ul>{failed}</ul>" if failed else "")
        + f"<ul>{''.join(links)}</ul>"
    )


def _value(value) -> str:
    if value is ABSENT:
        return '<span class="muted">(absent)</span>'
    return f"<code>{_e(json.dumps(value, default=str))}</code>"


def section_run(run: RunIdentity | None) -> str:
    """Which run wrote the page, and its params that differ from git."""
    if run is None:
        return ""
    flow = "&ndash; (not run by the Prefect flow: <code>dvc repro</code> or a stage by hand)"
    if run.flow_run_name or run.flow_run_id:
        ident = f" (<code>{_e(run.flow_run_id)}</code>)" if run.flow_run_id else ""
        flow = f"{_e(run.flow_run_name or 'unnamed')}{ident}"
    if run.experiment:
        experiment = (
            f"<code>{_e(run.experiment)}</code> (<code>dvc exp apply {_e(run.experiment)}</code>)"
        )
    elif run.flow_run_name:
        experiment = "named after the flow run, when it saves one (<code>dvc exp show</code>)"
    else:
        experiment = "&ndash;"
    commit = f"<code>{_e(run.git_commit)}</code>" if run.git_commit else "&ndash; (no commit)"
    rows = [
        ("Prefect flow run", flow),
        ("DVC experiment", experiment),
        ("git commit", commit),
        ("written", _e(run.written_at)),
    ]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    if run.params_changed is None:
        params = '<p class="muted">Params: no git commit of params.yaml to compare with.</p>'
    elif not run.params_changed:
        params = "<p>Params: as committed in git (no param differs from HEAD).</p>"
    else:
        changed = "".join(
            f"<tr><td><code>{_e(k)}</code></td><td>{_value(a)}</td><td>{_value(b)}</td></tr>"
            for k, a, b in run.params_changed
        )
        params = (
            f"<p>Params that differ from git (HEAD): {len(run.params_changed)}</p>"
            f"<table><tr><th>param</th><th>in git</th><th>this run</th></tr>{changed}</table>"
        )
    return f'<table class="run">{table}</table>{params}'


def section_champion(inputs: ReportInputs) -> str:
    p = inputs.promote
    if not p:
        stays = ""
        if inputs.stopped_at is not None:
            run = ((inputs.gate or {}).get("champion") or {}).get("run")
            who = f"the champion stays {_e(run)}" if run else "the champion stays as it was"
            stays = f"<p>This run was not packaged: {who} (<code>make champion</code>).</p>"
        return "<h2>Champion</h2>" + _not_reached("promote", inputs) + stays
    lineage = " &rarr; ".join(_e(r) for r in p.get("lineage", [])) or "&ndash;"
    return (
        f"<h2>Champion</h2><table><tr><th>this run</th><td>{_e(p.get('run'))} "
        f"(<code>{_e(p.get('bento_tag'))}</code>)</td></tr>"
        f"<tr><th>outcome</th><td>{_e(p.get('outcome'))}: {_e(p.get('reason'))}</td></tr>"
        f"<tr><th>champion before / after</th><td>{_e(p.get('champion_before'))} / "
        f"{_e(p.get('champion_after'))}</td></tr>"
        f"<tr><th>lineage (oldest first)</th><td>{lineage}</td></tr></table>"
        "<p>Serve the champion: <code>make serve</code>; back to the previous one: "
        "<code>make rollback</code>; see all runs: <code>make champion</code>.</p>"
    )


def render(inputs: ReportInputs) -> str:
    """The whole page as one string."""
    css, headline = _headline(inputs)
    run = (inputs.promote or {}).get("run") or (inputs.bento or {}).get("model_version")
    title = f"Pipeline report{f': run {run}' if run else ''}"
    served = (inputs.gate or {}).get("served_variant")
    facts = []
    if inputs.bento:
        facts.append(f"bento <code>{_e(inputs.bento.get('tag'))}</code>")
    if served:
        facts.append(f"serves the {_e(served)} model")
    if inputs.gate:
        split = inputs.gate.get("test_split", {})
        facts.append(
            f"test split {_e(split.get('examples'))} examples, fingerprint "
            f"<code>{_e(str(split.get('sha256', ''))[:12])}</code>"
        )
    body = "".join(
        [
            f"<h1>{_e(title)}</h1>",
            f'<div class="verdict {css}">{_e(headline)}</div>',
            section_run(inputs.run),
            f"<p class=muted>{'; '.join(facts)}</p>" if facts else "",
            data_facts(inputs.meta),
            f"<section>{section_gates(inputs)}</section>",
            f"<section>{section_metrics(inputs)}</section>",
            f"<section>{section_training(inputs)}</section>",
            f"<section>{section_compression(inputs)}</section>",
            f"<section>{section_validation(inputs)}</section>",
            f"<section>{section_champion(inputs)}</section>",
        ]
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def write_report(
    params: Params, stopped_at: str | None = None, stop_reason: str | None = None
) -> Path:
    """Gather, render and write ``reports/report.html``; return its path."""
    if stopped_at is not None and stopped_at not in STAGES:
        raise ValueError(f"unknown stage {stopped_at!r}; expected one of {STAGES}")
    page = render(gather(params, stopped_at, stop_reason))
    path = Path(params.paths.reports_dir) / REPORT_FILE
    write_text(path, page)
    log.info("report: %s", path)
    return path


STOPPED_FILE = "stopped.html"
# The report inputs each stage's files fill (see gather).
STAGE_INPUTS = {
    "validate": ("validation",),
    "train": ("train", "history", "recipe"),
    "evaluate": ("evaluate", "evaluate_gates", "confusion", "predictions"),
    "compress": ("compress",),
    "gate": ("gate",),
    "package": ("bento",),
    "promote": ("promote",),
}


def write_stopped(params: Params, stopped_at: str, reason: str) -> Path:
    """The page of a run that a stage stopped: its reason, and what the stages before it wrote.

    Written to ``reports/stopped.html``, beside the last good run's ``report.html`` (an output
    of the report stage, which this run never reached). The stopped stage's own files are the
    last good run's again (a failed stage puts them back), so the page leaves them out: the
    reason holds the numbers that stopped it.
    """
    if stopped_at not in STAGES:
        raise ValueError(f"unknown stage {stopped_at!r}; expected one of {STAGES}")
    inputs = gather(params, stopped_at, reason)
    for name in STAGE_INPUTS[stopped_at]:
        setattr(inputs, name, None)
    path = Path(params.paths.reports_dir) / STOPPED_FILE
    write_text(path, render(inputs))
    return path


def run(params: Params) -> Path:
    return write_report(params)


if __name__ == "__main__":
    main("report", run)
