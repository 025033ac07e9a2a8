"""The gates: absolute thresholds, the drop of compressed variants, no regression vs the champion.

The gate stage runs here on tiny ONNX classifiers made in the test (tests/gate_project.py), on
a test split labelled by one of them ("good": right on every image), so each model's accuracy
is known without training anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from components import champion as champ
from components import evaluate, gate, records
from components.config import Params
from components.dataset import ArraySet, load_arrays
from components.gates import champion_gates, drop_gates
from components.report import write_stopped
from components.stage import StageError
from components.tasks import CLASSIFICATION, REGRESSION
from components.tasks.classification import class_recall_gate
from tests.gate_project import (
    BAD_SEED,
    BIAS,
    FEATURES,
    GOOD_SEED,
    PREPROCESS,
    REGRESSION_PARAMS,
    TARGET,
    WEIGHT,
    labelled_split,
    project_params,
    regression_split,
    write_challenger,
    write_regression_challenger,
    write_regression_model,
    write_regression_split,
    write_test_split,
)
from tests.tiny_models import CLASS_NAMES, IMAGE_SHAPE, make_tiny_onnx


def champion_record(params: Params, metrics: dict, **changes) -> champ.ChampionRecord:
    """A champion measured on the project's current test split (unless changed)."""
    test = load_arrays(Path(params.paths.prepared_dir) / "test.npz")
    fields = {
        "run": "rchampion0001",
        "bento_tag": "tiny-classifier:rchampion0001",
        "archive": "artefacts/tiny-classifier-rchampion0001.bento",
        "archive_md5": None,
        "model": "tiny:int8-000000000000",
        "model_sha256": "0" * 64,
        "served_variant": "int8",
        "class_names": list(CLASS_NAMES),
        "input_shape": list(IMAGE_SHAPE),
        "test_split": champ.SplitInfo(
            sha256=champ.split_fingerprint(test, CLASS_NAMES), examples=len(test)
        ),
        "metrics": metrics,
        "packaged_at": "2026-11-01T00:00:00Z",
    } | changes
    run = champ.RunRecord(**fields)
    return champ.ChampionRecord(champion=run.run, lineage=[run.run], runs={run.run: run})


# -- the gate primitives ---------------------------------------------------------------------


def _metrics(accuracy=0.9, macro_f1=0.9, recalls=(0.9, 0.8, 1.0), supports=(5, 5, 5)) -> dict:
    per_class = {
        name: {"precision": 0.9, "recall": r, "f1": 0.9, "support": s}
        for name, r, s in zip(CLASS_NAMES, recalls, supports, strict=True)
    }
    return {"accuracy": accuracy, "macro_f1": macro_f1, "per_class": per_class}


def test_absolute_gates_give_a_verdict_and_a_reason_each(project):
    strict = project.evaluate.model_copy(update={"min_accuracy": 0.95, "min_class_recall": 0.85})
    gates = {g.name: g for g in CLASSIFICATION.gates(_metrics(), strict)}
    assert set(gates) == {"accuracy", "macro_f1", "min_class_recall"}
    assert not gates["accuracy"].passed
    assert gates["accuracy"].reason == "accuracy 0.9000 < min 0.9500"
    assert gates["macro_f1"].passed
    recall = gates["min_class_recall"]
    assert not recall.passed and recall.value == 0.8
    assert recall.reason == "lowest class recall 0.8000 (class 'b') < min 0.8500"
    assert recall.to_json() == {
        "value": 0.8,
        "threshold": 0.85,
        "op": ">=",
        "passed": False,
        "reason": recall.reason,
    }


def test_a_threshold_met_up_to_float_noise_passes(project):
    exact = project.evaluate.model_copy(update={"min_accuracy": 0.9})
    gates = CLASSIFICATION.gates(_metrics(accuracy=0.8999999999999), exact)
    assert gates[0].passed


def test_a_class_without_test_examples_fails_the_recall_gate(project):
    gate_ = class_recall_gate(_metrics(supports=(5, 0, 5))["per_class"], 0.0)
    assert not gate_.passed
    assert "class 'b' has no test examples" in gate_.reason


KEYS = ("accuracy", "macro_f1")


def test_drop_gates_bound_the_loss_of_a_compressed_variant():
    reference = {"accuracy": 0.95, "macro_f1": 0.95}
    ok = drop_gates({"accuracy": 0.94, "macro_f1": 0.95}, reference, 0.01, "fp32", KEYS, "")
    assert all(g.passed for g in ok)
    bad = drop_gates({"accuracy": 0.90, "macro_f1": 0.95}, reference, 0.01, "fp32", KEYS, "")
    assert [g.passed for g in bad] == [False, True]
    assert bad[0].reason == "accuracy drop vs fp32 +0.0500 (0.9500 -> 0.9000) > max 0.0100"


def test_champion_gates_against_the_champion():
    champion = {"accuracy": 0.95, "macro_f1": 0.94}
    none = champion_gates(champion, None, 0.01, "None", "no champion yet: passes", KEYS)
    assert len(none) == 1 and none[0].passed and none[0].reason == "no champion yet: passes"
    within = champion_gates({"accuracy": 0.945, "macro_f1": 0.94}, champion, 0.01, "r1", "", KEYS)
    assert all(g.passed for g in within)
    worse = champion_gates({"accuracy": 0.93, "macro_f1": 0.95}, champion, 0.01, "r1", "", KEYS)
    assert [g.passed for g in worse] == [False, True]
    assert worse[0].reason == (
        "accuracy 0.9300 is 0.0200 below champion r1 0.9500, more than the 0.0100 allowed"
    )
    assert worse[0].value == pytest.approx(-0.02) and worse[0].threshold == -0.01


# -- reading metrics files written by another version ----------------------------------------


def test_an_evaluate_json_of_the_first_format_is_refused_with_what_to_do(tmp_path):
    old = {"accuracy": 0.97, "macro_f1": 0.97, "gates": {}, "passed": True, "per_class": {}}
    path = tmp_path / "evaluate.json"
    path.write_text(json.dumps(old))  # no "format": the layout of the first version
    with pytest.raises(StageError, match=r"format 1, this code reads format 3.*dvc repro evaluate"):
        records.read_evaluate(tmp_path)
    path.write_text(
        json.dumps({"format": 3, "task": "classification", "accuracy": 0.9, "test_examples": 9})
    )
    with pytest.raises(StageError, match=r"lacks macro_f1, min_class_recall"):
        records.read_evaluate(tmp_path)
    path.write_text("{not json")
    with pytest.raises(StageError, match=r"not valid JSON"):
        records.read_evaluate(tmp_path)
    with pytest.raises(StageError, match=r"not found: run the evaluate stage"):
        records.read_evaluate(tmp_path / "missing")


def test_a_compress_json_without_sizes_is_refused(project):
    write_challenger(project, GOOD_SEED)
    path = Path(project.paths.metrics_dir) / "compress.json"
    path.write_text(json.dumps({"variants": {"int8": {"accuracy": 0.9}}}))
    with pytest.raises(StageError, match=r"variants\.int8\.size_bytes: Field required"):
        gate.run(project)
    assert not (Path(project.paths.metrics_dir) / "gate.json").exists()


def test_a_champion_record_of_another_format_is_refused(project):
    path = Path(project.paths.champion_file)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"champion": "r1", "bento": "x:r1"}))
    with pytest.raises(StageError, match=r"champion record format None; this code reads format 1"):
        champ.load_record(path)
    path.write_text(json.dumps({"format": 1, "champion": "r1", "runs": {}}))
    with pytest.raises(StageError, match=r"champion 'r1' has no entry under 'runs'"):
        champ.load_record(path)


# -- the gate stage --------------------------------------------------------------------------


def test_first_run_without_a_champion_passes_and_says_so(project):
    measured = write_challenger(project, BAD_SEED)
    result = gate.run(project)
    assert result.passed and result.baseline.source == "none"
    written = json.loads((Path(project.paths.metrics_dir) / "gate.json").read_text())
    assert written["passed"] and written["failed"] == []
    served = written["variants"]["int8"]
    assert served["served"] and served["accuracy"] == pytest.approx(measured["accuracy"], abs=1e-6)
    assert served["gates"]["vs_champion"] == {
        "value": None,
        "threshold": None,
        "op": ">=",
        "passed": True,
        "reason": "no champion yet: the first challenger passes by definition",
    }
    assert "vs_champion" not in written["variants"]["fp32"]["gates"]  # only the served one
    rows = (Path(project.paths.metrics_dir) / "compression.csv").read_text().splitlines()
    assert (
        rows[0]
        == "variant,size_kib,latency_ms,accuracy,macro_f1,min_class_recall,r2,rmse,mae,served"
    )
    assert [r.split(",")[0] for r in rows[1:]] == ["fp32", "int8"]


def test_a_worse_challenger_fails_with_the_reason_and_the_report_says_so(project):
    write_challenger(project, BAD_SEED)
    record = champion_record(project, {"accuracy": 1.0, "macro_f1": 1.0})
    champ.save_record(project.paths.champion_file, record)
    before = Path(project.paths.champion_file).read_bytes()

    with pytest.raises(
        StageError, match=r"gate failed for the int8 model: accuracy 0\.\d+ is"
    ) as failure:
        gate.run(project)

    written = json.loads((Path(project.paths.metrics_dir) / "gate.json").read_text())
    assert not written["passed"]
    assert written["champion"]["run"] == "rchampion0001"
    assert written["champion"]["source"] == "recorded"
    assert any("below champion rchampion0001 1.0000" in r for r in written["failed"])
    assert Path(project.paths.champion_file).read_bytes() == before  # the gate never writes it
    # The flow writes the stopped run's page from the stage's reason (flows/pipeline.py).
    page = write_stopped(project, "gate", str(failure.value)).read_text()
    assert "Refused at gate" in page and "below champion rchampion0001" in page


def test_a_better_challenger_passes_the_vs_champion_gate(project):
    write_challenger(project, GOOD_SEED)
    champ.save_record(
        project.paths.champion_file, champion_record(project, {"accuracy": 0.5, "macro_f1": 0.5})
    )
    result = gate.run(project)
    assert result.passed
    reasons = [g.reason for g in result.variants["int8"].gates if g.name.startswith("vs_champion")]
    assert reasons[0] == (
        "accuracy 1.0000 vs champion rchampion0001 0.5000 (+0.5000, tolerance 0.0500)"
    )


def test_only_the_served_variant_decides(project):
    write_challenger(project, GOOD_SEED, fp32_seed=BAD_SEED)  # fp32 export broken, int8 fine
    strict = project_params(Path.cwd(), **{"evaluate.min_accuracy": 0.9})
    result = gate.run(strict)
    assert result.passed
    assert not result.variants["fp32"].passed and result.variants["int8"].passed


def test_a_champion_of_other_classes_is_not_comparable(project):
    write_challenger(project, BAD_SEED)
    record = champion_record(
        project, {"accuracy": 1.0, "macro_f1": 1.0}, class_names=["0", "1", "2", "3"]
    )
    champ.save_record(project.paths.champion_file, record)
    result = gate.run(project)
    assert result.passed and result.baseline.source == "not comparable"
    assert "classifies other data" in result.baseline.note


def test_a_changed_test_split_needs_the_champion_model_and_says_where_to_get_it(project):
    write_challenger(project, BAD_SEED)
    record = champion_record(project, {"accuracy": 1.0, "macro_f1": 1.0})
    record.runs["rchampion0001"].test_split.sha256 = "f" * 64  # measured on another split
    champ.save_record(project.paths.champion_file, record)
    with pytest.raises(StageError, match=r"not in the BentoML store.*dvc pull artefacts"):
        gate.run(project)


def test_unknown_class_and_empty_test_split_are_clear_errors(project):
    write_challenger(project, GOOD_SEED)
    test = load_arrays(Path(project.paths.prepared_dir) / "test.npz")
    write_test_split(project, ArraySet(test.x, np.full_like(test.y, 7)))
    with pytest.raises(StageError, match=r"label 7, which the model does not know"):
        gate.run(project)
    write_test_split(project, ArraySet(test.x[:0], test.y[:0]))
    with pytest.raises(StageError, match=r"test split is empty"):
        gate.run(project)
    assert not (Path(project.paths.metrics_dir) / "gate.json").exists()


def test_a_failed_evaluate_json_is_never_gated_into_a_package(project):
    write_challenger(project, GOOD_SEED)
    path = Path(project.paths.metrics_dir) / "evaluate_gates.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "passed": False}))
    with pytest.raises(StageError, match=r"failed its gates: nothing to package"):
        gate.run(project)


def test_the_fingerprint_follows_the_content_not_the_file():
    x = np.zeros((2, 1, 2, 2), np.uint8)
    base = champ.split_fingerprint(ArraySet(x, np.array([0, 1])), ("a", "b"))
    assert base == champ.split_fingerprint(ArraySet(x.copy(), np.array([0, 1])), ("a", "b"))
    assert base != champ.split_fingerprint(ArraySet(x, np.array([1, 0])), ("a", "b"))
    assert base != champ.split_fingerprint(ArraySet(x, np.array([0, 1])), ("a", "c"))


# -- regression: a table with a numeric target (tests/gate_project.py) ----------------------


@pytest.fixture
def regression_project(tmp_path, monkeypatch) -> Params:
    monkeypatch.chdir(tmp_path)
    params = project_params(tmp_path, **REGRESSION_PARAMS)
    write_regression_split(params, regression_split())
    return params


def regression_champion(params: Params, metrics: dict, **changes) -> champ.ChampionRecord:
    """A regression champion measured on the regression project's current test split."""
    test = load_arrays(Path(params.paths.prepared_dir) / "test.npz")
    fields = {
        "class_names": [],
        "input_shape": [len(FEATURES)],
        "test_split": champ.SplitInfo(sha256=champ.split_fingerprint(test, ()), examples=len(test)),
        "task": "regression",
        "kind": "table",
        "target": TARGET,
        "preprocess_sha256": champ.preprocess_fingerprint(PREPROCESS, FEATURES),
    } | changes
    return champion_record(params, metrics, **fields)


def test_evaluate_measures_a_regression_model_in_target_units(regression_project):
    params = regression_project
    write_regression_model(params)
    result = evaluate.run(params)
    assert result.passed
    test = load_arrays(Path(params.paths.prepared_dir) / "test.npz")
    expected = test.x.astype(np.float64) @ WEIGHT + BIAS  # the net de-standardised its output
    rmse = float(np.sqrt(((expected - test.y) ** 2).mean()))
    metrics_dir = Path(params.paths.metrics_dir)
    written = json.loads((metrics_dir / "evaluate.json").read_text())
    written |= json.loads((metrics_dir / "evaluate_gates.json").read_text())
    assert written["task"] == "regression" and written["target"] == TARGET
    assert written["rmse"] == pytest.approx(rmse, abs=1e-4) and written["r2"] > 0.99
    assert written["mae"] <= written["rmse"] and written["test_examples"] == len(test)
    assert "accuracy" not in written and "per_class" not in written and written["passed"]
    assert set(written["gates"]) == {"r2"}
    assert written["gates"]["r2"]["reason"].endswith(">= min 0.5000 (evaluate.min_r2)")
    assert records.read_evaluate(metrics_dir).r2 == written["r2"]
    rows = (metrics_dir / "predictions.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted,residual" and len(rows) == 1 + len(test)
    actual, predicted, residual = (float(v) for v in rows[1].split(","))
    assert actual == pytest.approx(test.y[0], abs=1e-4)
    assert predicted == pytest.approx(expected[0], abs=1e-4)
    assert residual == pytest.approx(predicted - actual, abs=1e-4)
    # The classification plots DVC declares are still written, empty but for their header.
    assert (metrics_dir / "confusion.csv").read_text() == "actual,predicted\n"
    assert (metrics_dir / "per_class.csv").read_text() == "class,precision,recall,f1,support\n"


def test_a_regression_model_below_min_r2_fails_naming_the_param(regression_project):
    params = regression_project
    write_regression_model(params, weight=np.zeros(len(FEATURES)))  # the mean, at best
    with pytest.raises(
        StageError,
        match=r"^evaluation gate failed: R\^2 -?0\.\d{4} < min 0\.5000 \(evaluate\.min_r2\)$",
    ) as failure:
        evaluate.run(params)
    written = json.loads((Path(params.paths.metrics_dir) / "evaluate_gates.json").read_text())
    assert not written["passed"] and written["gates"]["r2"]["value"] < 0.5
    page = write_stopped(params, "evaluate", str(failure.value)).read_text()
    assert "Refused at evaluate: evaluation gate failed: R^2" in page


def test_evaluate_refuses_a_model_of_another_task_or_target(regression_project, tmp_path):
    params = regression_project
    write_regression_model(params)
    described = Path(params.paths.model_dir) / "model.json"
    raw = json.loads(described.read_text())
    described.write_text(json.dumps({**raw, "task": "classification"}))
    with pytest.raises(StageError, match=r"trained for classification but the data is regression"):
        evaluate.run(params)
    described.write_text(json.dumps({**raw, "target": "rent"}))
    with pytest.raises(StageError, match=r"predicts 'rent' but the data's target is 'price'"):
        evaluate.run(params)
    assert not (Path(params.paths.metrics_dir) / "evaluate.json").exists()


def test_regression_targets_and_outputs_must_be_finite(regression_project):
    split = regression_split(n=6)
    with pytest.raises(StageError, match=r"1 target\(s\) that are not finite numbers \(first at"):
        REGRESSION.check_test(np.where(np.arange(6) == 2, np.nan, split.y), ())
    outputs = np.ones((6, 1))
    outputs[4] = np.inf
    with pytest.raises(StageError, match=r"not a finite number for 1 of 6 test examples"):
        evaluate.evaluate(outputs, split, (), regression_project.evaluate, REGRESSION)
    with pytest.raises(StageError, match=r"one value per example"):
        evaluate.evaluate(np.ones((6, 3)), split, (), regression_project.evaluate, REGRESSION)


def test_a_regression_evaluate_json_needs_its_own_keys(tmp_path):
    path = tmp_path / "evaluate.json"
    path.write_text(json.dumps({"format": 3, "task": "regression", "r2": 0.9, "test_examples": 9}))
    with pytest.raises(StageError, match=r"lacks rmse, mae"):
        records.read_evaluate(tmp_path)
    path.write_text(json.dumps({"format": 3, "task": "ranking", "test_examples": 9}))
    with pytest.raises(StageError, match=r"task: Input should be 'classification' or 'regression'"):
        records.read_evaluate(tmp_path)


def test_gate_judges_regression_variants_by_r2(regression_project):
    params = regression_project
    measured = write_regression_challenger(params)
    result = gate.run(params)
    assert result.passed and result.baseline.source == "none"
    metrics_dir = Path(params.paths.metrics_dir)
    written = json.loads((metrics_dir / "gate.json").read_text())
    assert written["task"] == "regression" and written["kind"] == "table"
    assert written["target"] == TARGET and written["class_names"] == []
    assert written["preprocess_sha256"] == champ.preprocess_fingerprint(PREPROCESS, FEATURES)
    assert set(written["network"]) == {"r2", "rmse", "mae"}
    served = written["variants"]["int8"]
    assert served["r2"] == pytest.approx(measured["r2"], abs=1e-6) and "accuracy" not in served
    assert set(served["gates"]) == {"r2", "r2_drop", "vs_champion"}
    assert set(written["variants"]["fp32"]["gates"]) == {"r2", "r2_drop"}
    rows = (metrics_dir / "compression.csv").read_text().splitlines()
    assert (
        rows[0]
        == "variant,size_kib,latency_ms,accuracy,macro_f1,min_class_recall,r2,rmse,mae,served"
    )
    assert [r.split(",")[0] for r in rows[1:]] == ["fp32", "int8"]


def test_a_regression_variant_losing_too_much_r2_fails(regression_project):
    params = regression_project
    write_regression_challenger(params, int8_weight=WEIGHT * 0.6)
    with pytest.raises(
        StageError,
        match=r"gate failed for the int8 model: R\^2 drop vs the network \+0\.\d{4} "
        r"\(0\.\d{4} -> 0\.\d{4}\) > max 0\.0500 \(compress\.max_accuracy_drop\)",
    ):
        gate.run(params)


def test_a_better_regression_champion_on_the_same_split_refuses_the_challenger(regression_project):
    strict = {**REGRESSION_PARAMS, "evaluate.max_drop_vs_champion": 0.005}
    params = project_params(Path.cwd(), **strict)
    measured = write_regression_challenger(params, int8_weight=WEIGHT * 0.9)  # R^2 about 0.99
    better = {"r2": 1.0, "rmse": 0.0, "mae": 0.0}
    champ.save_record(params.paths.champion_file, regression_champion(params, better))
    with pytest.raises(StageError, match=r"R\^2 0\.\d{4} is 0\.\d{4} below champion rchampion0001"):
        gate.run(params)
    written = json.loads((Path(params.paths.metrics_dir) / "gate.json").read_text())
    assert written["champion"]["source"] == "recorded"
    assert written["champion"]["metrics"] == better
    gates = written["variants"]["int8"]["gates"]
    assert set(gates) == {"r2", "r2_drop", "vs_champion_r2"}
    assert gates["vs_champion_r2"]["value"] == pytest.approx(measured["r2"] - 1.0, abs=1e-6)
    within = {"r2": measured["r2"] + 0.004, "rmse": 0.1, "mae": 0.1}  # tolerance 0.005
    champ.save_record(params.paths.champion_file, regression_champion(params, within))
    assert gate.run(params).passed


@pytest.mark.parametrize(
    "changes, note",
    [
        ({"task": "classification", "kind": "image", "target": "", "input_shape": [1, 8, 8],
          "class_names": ["a", "b", "c"], "preprocess_sha256": None},
         "is an image classification of ['a', 'b', 'c'], inputs 1x8x8, this run a table "
         "regression of 'price', inputs 3"),
        ({"target": "rent"}, "is a table regression of 'rent', inputs 3, this run a table"),
        ({"kind": "sequence"}, "is a sequence regression of 'price'"),
        ({"input_shape": [4]}, "is a table regression of 'price', inputs 4, this run a table"),
        ({"task": "classification", "class_names": ["cheap", "dear"]},
         "is a table classification 'price' of ['cheap', 'dear'], inputs 3, this run a table "
         "regression of 'price'"),
        ({"test_split": champ.SplitInfo(sha256="f" * 64, examples=40),
          "preprocess_sha256": "e" * 64},
         "encodes its inputs with another preprocessing fit"),
    ],
    ids=[
        "other-task",
        "other-target",
        "other-kind",
        "other-shape",
        "classes-of-the-target",
        "other-preprocessing",
    ],
)  # fmt: skip
def test_a_champion_predicting_other_data_is_not_comparable(regression_project, changes, note):
    params = regression_project
    write_regression_challenger(params)
    record = regression_champion(params, {"r2": 1.0, "rmse": 0.0, "mae": 0.0}, **changes)
    champ.save_record(params.paths.champion_file, record)
    result = gate.run(params)
    assert result.passed and result.baseline.source == "not comparable"
    assert note in result.baseline.note and "this gate passes" in result.baseline.note


def test_gate_refuses_an_evaluate_json_of_the_other_task(regression_project):
    params = regression_project
    write_regression_challenger(params)
    write_test_split(params, labelled_split(make_tiny_onnx(Path("good.onnx"), GOOD_SEED)))
    with pytest.raises(StageError, match=r"evaluate.json holds regression metrics but the data"):
        gate.run(params)


def test_the_fingerprint_works_for_float_targets():
    split = regression_split(n=5)
    base = champ.split_fingerprint(split, ())
    assert base == champ.split_fingerprint(ArraySet(split.x.copy(), split.y.copy()), ())
    nudged = split.y.copy()
    nudged[3] += 1e-3
    assert base != champ.split_fingerprint(ArraySet(split.x, nudged), ())
    labels = ArraySet(split.x, np.arange(5, dtype=np.int64))
    assert champ.split_fingerprint(labels, ()) != champ.split_fingerprint(
        ArraySet(split.x, labels.y.astype(np.float32)), ()
    )
    assert champ.preprocess_fingerprint(None, ()) is None  # images: raw pixels in
    assert champ.preprocess_fingerprint(PREPROCESS, FEATURES) != champ.preprocess_fingerprint(
        {**PREPROCESS, "columns": [{**PREPROCESS["columns"][0], "mean": 1.0}]}, FEATURES
    )
