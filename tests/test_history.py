"""A run history a person can read: the metrics files hold the few headline numbers runs are
compared by (every other record is a plain out), `make history` keeps them, and each chart of
`dvc plots show` is drawn once, from data, for either task.

Two real runs side by side (`make history` at 160 columns, `dvc metrics diff`, `dvc plots show`
after real flow runs) are tests/test_pipeline_e2e.py's; here dvc.yaml, the headline records and
`dvc plots show` over the files the stages' own code writes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from components import gate, records
from components.dataset import load_arrays
from components.evaluate import write_confusion_csv, write_per_class_csv, write_predictions_csv
from components.records import (
    CompressSummary,
    EvaluateMetrics,
    Headline,
    TrainSummary,
    compress_headline,
    evaluate_headline,
    train_headline,
)
from tests.conftest import REPO_ROOT
from tests.gate_project import (
    CLASS_NAMES,
    GOOD_SEED,
    REGRESSION_PARAMS,
    WEIGHT,
    project_params,
    regression_split,
    write_challenger,
    write_regression_challenger,
    write_regression_split,
)

CHARTS = (
    "loss",
    "validation",
    "confusion",
    "per_class",
    "compression_score",
    "compression_latency",
)


def _dvc_yaml() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())


def _declared(stage: dict, kind: str) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in stage.get(kind, [])]


def test_the_metrics_are_the_headline_files_and_the_records_plain_outs():
    stages = _dvc_yaml()["stages"]
    metrics = {name: _declared(s, "metrics") for name, s in stages.items() if "metrics" in s}
    assert metrics == {
        stage: [f"${{paths.metrics_dir}}/headline/{stage}.json"]
        for stage in ("train", "evaluate", "compress")
    }
    assert [name for name, s in stages.items() if "plots" in s] == []  # drawn once, top-level
    outs = {out for s in stages.values() for out in _declared(s, "outs")}
    for record in ("validation", "train", "evaluate", "evaluate_gates", "baselines", "compress"):
        assert f"${{paths.metrics_dir}}/{record}.json" in outs, record
    for record in ("gate", "promote"):  # persist: a verdict is never restored from a run-cache
        path = f"${{paths.metrics_dir}}/{record}.json"
        (entry,) = [o for o in stages[record]["outs"] if next(iter(o)) == path]
        assert next(iter(entry.values())) == {"cache": False, "persist": True}


def test_each_chart_reads_files_a_stage_writes_with_a_template_dvc_finds():
    spec = _dvc_yaml()
    outs = {out for s in spec["stages"].values() for out in _declared(s, "outs")}
    charts = {next(iter(p)): next(iter(p.values())) for p in spec["plots"]}
    assert tuple(charts) == CHARTS
    titles = [c["title"] for c in charts.values()]
    assert len(set(titles)) == len(titles)
    built_in = {"linear", "confusion", "scatter", "bar_horizontal"}
    for name, chart in charts.items():
        files = set(chart["y"]) | (set(chart["x"]) if isinstance(chart["x"], dict) else set())
        assert files <= outs, name
        template = chart.get("template", "linear")
        assert template in built_in or (REPO_ROOT / ".dvc" / "plots" / f"{template}.json").is_file()


def _classification_metrics() -> EvaluateMetrics:
    return EvaluateMetrics(
        task="classification", test_examples=4, accuracy=0.75, macro_precision=0.8,
        macro_recall=0.75, macro_f1=0.7, min_class_recall=0.5,
        per_class={"a": {"precision": 1.0, "recall": 0.5, "f1": 0.67, "support": 2}},
    )  # fmt: skip


def test_headline_records_hold_numbers_and_no_key_twice():
    train = train_headline(TrainSummary(epochs_run=5, best_epoch=3, best_val_loss=0.2,
                                        best_val_accuracy=0.9))  # fmt: skip
    network = evaluate_headline(_classification_metrics())
    served = compress_headline(
        CompressSummary(
            served_variant="int8",
            task="classification",
            variants={
                "fp32": {"size_bytes": 4096, "latency_ms_batch1": 0.1, "accuracy": 0.75},
                "int8": {"size_bytes": 1536, "latency_ms_batch1": 0.2, "accuracy": 0.74},
            },
        )
    )
    regression = evaluate_headline(
        EvaluateMetrics(task="regression", test_examples=4, r2=0.9, rmse=1.5, mae=1.0)
    )
    assert train.numbers() == {"best_epoch": 3}
    assert network.numbers() == {"accuracy": 0.75, "macro_f1": 0.7}
    assert served.numbers() == {"served_accuracy": 0.74, "served_kib": 1.5, "served_ms": 0.2}
    assert regression.numbers() == {"r2": 0.9, "rmse": 1.5, "mae": 1.0}
    keys = [k for h in (train, network, served) for k in h.numbers()]
    assert len(keys) == len(set(keys))  # DVC would show a shared key as <path>:<key>
    assert set(keys) | set(regression.numbers()) <= set(records.headline_keys())
    for bad in ({"task": "classification"}, {"passed": True}, {"per_class": {"a": 1.0}}):
        with pytest.raises(ValidationError, match="must be a number"):
            Headline(**bad)


def test_make_history_keeps_every_headline_column():
    make = (REPO_ROOT / "Makefile").read_text()
    kept = re.search(r"^HISTORY_METRICS := (.+)$", make, re.M).group(1).split("|")
    assert sorted(kept) == sorted(records.headline_keys())


# -- dvc plots show over what the stages write ------------------------------------------------


def _plots(metrics_dir: Path, root: Path) -> dict:
    """`dvc plots show --json` in a repository holding dvc.yaml, params.yaml, the templates and
    ``metrics_dir`` as its metrics/ folder."""
    repo = root / "plots-repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO_ROOT / name, repo / name)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)
    shutil.copytree(REPO_ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    shutil.copytree(metrics_dir, repo / "metrics")
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--json"],
        cwd=repo, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "WARNING" not in shown.stderr and "failed" not in shown.stderr, shown.stderr
    out = json.loads(shown.stdout)
    assert out.get("errors") is None, out["errors"]
    assert tuple(out["data"]) == CHARTS  # one each: no chart drawn twice
    return out["data"]


def _drawn(chart: list[dict]) -> list[dict]:
    """The rows a chart draws: its template leaves the other task's empty cells out."""
    (content,) = [c["content"] for c in chart]
    rows = content["data"]["values"]
    if "transform" in content:  # *_without_blanks
        assert "!== ''" in content["transform"][0]["filter"]
        rows = [r for r in rows if r.get("dvc_inferred_y_value") not in ("", None)]
    return rows


def _write_history(metrics: Path, metric: str) -> None:
    from components.train import HISTORY_FILE, write_history_csv

    rows = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, metric: 0.5 + e / 10}
        for e in (1, 2, 3)
    ]
    write_history_csv(metrics / HISTORY_FILE, rows)


def test_a_classification_run_draws_every_chart_from_data(project, tmp_path):
    write_challenger(project, GOOD_SEED)
    gate.run(project)  # compression.csv
    metrics = Path(project.paths.metrics_dir)
    _write_history(metrics, "val_accuracy")
    test = load_arrays(Path(project.paths.prepared_dir) / "test.npz")
    served = gate.onnx_predict(Path(project.paths.model_dir) / "onnx" / "int8.onnx", test.x)
    write_confusion_csv(metrics / "confusion.csv", test.y, served, CLASS_NAMES)
    write_per_class_csv(
        metrics / "per_class.csv", records.read_evaluate(metrics).numbers()["per_class"]
    )
    write_predictions_csv(metrics / "predictions.csv")  # regression's: the header only

    charts = _plots(metrics, tmp_path)
    for name in CHARTS:
        assert _drawn(charts[name]), f"{name} draws nothing"
    assert {r["field"] for r in _drawn(charts["validation"])} == {"val_accuracy"}
    assert {r["field"] for r in _drawn(charts["compression_score"])} == {"accuracy"}
    assert {r["field"] for r in _drawn(charts["loss"])} == {"train_loss", "val_loss"}
    assert len(_drawn(charts["confusion"])) == len(test)
    assert len(_drawn(charts["compression_latency"])) == 2  # fp32 and int8


def test_a_regression_run_draws_its_own_metric_and_no_blank(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = project_params(tmp_path, **REGRESSION_PARAMS)
    write_regression_split(params, regression_split())
    write_regression_challenger(params, int8_weight=WEIGHT * 0.98)  # the real evaluate stage
    gate.run(params)
    metrics = Path(params.paths.metrics_dir)
    _write_history(metrics, "val_rmse")

    assert set(records.read_headline(metrics, "evaluate").numbers()) == {"r2", "rmse", "mae"}
    charts = _plots(metrics, tmp_path)
    assert {r["field"] for r in _drawn(charts["validation"])} == {"val_rmse"}
    assert {r["field"] for r in _drawn(charts["compression_score"])} == {"r2"}
    assert _drawn(charts["loss"]) and _drawn(charts["compression_latency"])
    # Classification's charts: their files hold only a header, so DVC draws nothing for them
    # (the predicted-vs-actual plot is the report's).
    assert charts["confusion"] == [] and charts["per_class"] == []
