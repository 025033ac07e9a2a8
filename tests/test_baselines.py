"""Classical baselines beside the network: fitted on the same train split, scored on the same
test split with the task's own metrics, recorded in baselines.json, and a gate that can require
the network to beat them. Real scikit-learn models on tiny data made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from components import baselines, evaluate, ingest, tasks, train
from components.config import parse_params
from components.dataset import ArraySet, DatasetMeta
from components.records import read_baselines
from components.stage import StageError
from tests.conftest import SERIES_OVERRIDES, TABLE_OVERRIDES, make_series, make_table, params_with


def _meta(x, kind, task, class_names=(), **extra) -> DatasetMeta:
    return DatasetMeta(
        class_names=class_names, input_shape=tuple(x.shape[1:]), source="made here",
        split_sizes={"train": 1, "val": 1, "test": 1}, kind=kind, task=task, **extra,
    )  # fmt: skip


def test_a_table_gets_a_linear_model_and_boosted_trees_scored_like_the_network():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (400, 3)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)  # linear: logistic regression should nail it
    train_set, test_set = ArraySet(x[:300], y[:300]), ArraySet(x[300:], y[300:])
    meta = _meta(x, "table", "classification", ("no", "yes"))
    task = tasks.get("classification")
    scores = baselines.fit_baselines(
        ("linear", "boosted_trees"), train_set, test_set, meta, task, 1.0, 10_000
    )
    by_name = {s.name: s for s in scores}
    assert set(by_name) == {"logistic_regression", "boosted_trees"}
    assert by_name["logistic_regression"].metrics["accuracy"] > 0.95
    assert set(by_name["boosted_trees"].metrics) == set(task.headline_keys)
    assert all(s.fit_seconds >= 0 and s.train_rows == 300 for s in scores)
    assert baselines.best(scores, task).name == "logistic_regression"
    # The lift gate: a network at chance trails the best baseline and fails, naming the param.
    gate = baselines.lift_gate({"accuracy": 0.5, "macro_f1": 0.5}, scores, task, 0.0)
    assert not gate.passed and "evaluate.min_lift_over_baseline" in gate.reason
    assert "logistic_regression" in gate.reason
    assert baselines.lift_gate({"accuracy": 1.0, "macro_f1": 1.0}, scores, task, 0.0).passed


def test_a_large_train_split_is_sampled_and_an_rbf_svc_left_out_when_too_big():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6000, 1, 4, 4)).astype(np.uint8)
    y = (x[:, 0, 0, 0] > 127).astype(np.int64)
    meta = _meta(x, "image", "classification", ("dark", "light"))
    task = tasks.get("classification")
    big = ArraySet(x[:5500], y[:5500])
    test_set = ArraySet(x[5500:], y[5500:])
    sampled = baselines.fit_baselines(
        ("linear", "rbf_svc"), big, test_set, meta, task, 1 / 255, 200
    )
    assert {s.name for s in sampled} == {"logistic_regression", "rbf_svc"}
    assert all(s.train_rows == 200 for s in sampled)
    whole = baselines.fit_baselines(("rbf_svc",), big, test_set, meta, task, 1 / 255, 10_000)
    assert whole == []  # 5,500 rows: over RBF_SVC_MAX_ROWS, left out rather than minutes spent


def test_a_large_test_split_is_scored_a_slice_at_a_time_with_the_same_scores(monkeypatch):
    """Scoring SCORE_ROWS at a time bounds the float64 copy (a whole shard took 160 MB) and
    changes no score."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (700, 1, 4, 4)).astype(np.uint8)
    y = (x[:, 0, 0, 0] > 127).astype(np.int64)
    meta = _meta(x, "image", "classification", ("dark", "light"))
    task = tasks.get("classification")
    train_set, test_set = ArraySet(x[:500], y[:500]), ArraySet(x[500:], y[500:])
    names = ("linear", "boosted_trees")
    whole = baselines.fit_baselines(names, train_set, test_set, meta, task, 1 / 255, 10_000)
    sliced_calls = []
    outputs = baselines._outputs
    monkeypatch.setattr(baselines, "SCORE_ROWS", 64)
    monkeypatch.setattr(baselines, "_outputs", lambda m, x, *a: sliced_calls.append(len(x))
                        or outputs(m, x, *a))  # fmt: skip
    sliced = baselines.fit_baselines(names, train_set, test_set, meta, task, 1 / 255, 10_000)
    assert [s.metrics for s in sliced] == [s.metrics for s in whole]
    assert max(sliced_calls) == 64 and sum(sliced_calls) == 2 * 200


def test_persistence_carries_the_last_observed_target_forward_in_target_units():
    # One input, the target itself, standardised with mean 20 and std 5 as ingest would.
    values = np.array([10.0, 20.0, 30.0, 25.0, 15.0, 20.0])
    encoded = ((values - 20) / 5)[:, None]
    x = np.stack([encoded[i : i + 2] for i in range(4)]).astype(np.float32)  # windows of 2
    y = values[2:].astype(np.float32)
    spec = {"columns": [{"name": "load", "type": "numeric", "mean": 20.0, "std": 5.0}],
            "features": ["load"]}  # fmt: skip
    meta = _meta(x, "sequence", "regression", target="load", preprocess=spec)
    outputs = baselines.persistence_outputs(ArraySet(x, y), meta)
    np.testing.assert_allclose(outputs, values[1:5], rtol=1e-6)
    other = _meta(x, "sequence", "regression", target="price", preprocess=spec)
    assert baselines.persistence_outputs(ArraySet(x, y), other) is None


@pytest.mark.parametrize(
    ("overrides", "make", "expected"),
    [
        ({**TABLE_OVERRIDES, "ingest": {"kind": "table", "target": "price"}}, make_table,
         {"ridge", "boosted_trees"}),
        (SERIES_OVERRIDES, make_series, {"ridge", "persistence"}),
    ],
    ids=["table_regression", "time_series"],
)  # fmt: skip
def test_the_evaluate_stage_writes_the_kinds_baselines_and_can_gate_on_them(
    tmp_path, overrides, make, expected
):
    source = tmp_path / "data" / "external" / "rows.csv"
    source.parent.mkdir(parents=True)
    make(n=240).to_csv(source, index=False)
    raw = params_with(tmp_path, str(source), overrides)
    params = parse_params(raw)
    ingest.run(params)
    train.run(params)
    evaluate.run(params)
    record = read_baselines(Path(params.paths.metrics_dir))
    assert set(record.baselines) == expected
    assert record.best in expected and record.lift is not None
    task = tasks.get("regression")
    assert record.lift == pytest.approx(
        record.network["r2"] - record.baselines[record.best].metrics["r2"], abs=1e-5
    )
    assert set(record.network) == set(task.headline_keys)

    # A lift no model can reach: the stage fails naming the gate, the baseline and the param.
    raw["evaluate"]["min_lift_over_baseline"] = 1.0
    with pytest.raises(StageError, match=r"lift over the best baseline .* < min 1\.0000") as err:
        evaluate.run(parse_params(raw))
    assert "evaluate.min_lift_over_baseline" in str(err.value) and record.best in str(err.value)
    gates = json.loads((Path(params.paths.metrics_dir) / "evaluate_gates.json").read_text())
    assert "min_lift_over_baseline" in json.dumps(gates)


def test_a_lift_gate_without_baselines_is_refused_with_the_params():
    from tests.conftest import REPO_ROOT, tiny_params_dict

    raw = tiny_params_dict(REPO_ROOT, "unused")
    raw["evaluate"].update(baselines=False, min_lift_over_baseline=0.0)
    with pytest.raises(ValueError, match="min_lift_over_baseline needs evaluate.baselines"):
        parse_params(raw)


def test_the_report_shows_the_baselines_beside_the_network():
    from components.report import ReportInputs, render

    inputs = ReportInputs(
        evaluate={"accuracy": 0.97, "macro_f1": 0.97, "test_examples": 10, "per_class": {}},
        baselines={
            "network": {"accuracy": 0.97, "macro_f1": 0.97},
            "baselines": {
                "rbf_svc": {
                    "metrics": {"accuracy": 0.95, "macro_f1": 0.95},
                    "fit_seconds": 5.7,
                    "train_rows": 3500,
                },
            },  # fmt: skip
            "best": "rbf_svc",
            "lift": 0.02,
        },
    )
    page = render(inputs)
    assert "baseline: rbf_svc" in page and "0.9500" in page
    assert "beats the best classical baseline, rbf_svc" in page and "+0.0200" in page
