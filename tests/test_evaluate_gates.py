"""The gates: absolute thresholds, the drop of compressed variants, no regression vs the champion.

The gate stage runs here on tiny ONNX classifiers made in the test (tests/test_package.py), on
a test split labelled by one of them ("good": right on every image), so each model's accuracy
is known without training anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from components import champion as champ
from components import evaluate, gate
from components.config import Params, parse_params
from components.dataset import DatasetMeta, ImageSet, load_images, save_images
from components.stage import StageError
from tests.conftest import tiny_params_dict
from tests.test_package import CLASS_NAMES, IMAGE_SHAPE, make_tiny_onnx

GOOD_SEED, BAD_SEED = 0, 1

# Loose enough for the random "bad" model (about chance, 1/3) to pass as a first champion.
GATE_PARAMS = {
    "evaluate": {
        "min_accuracy": 0.2,
        "min_macro_f1": 0.1,
        "min_class_recall": 0.0,
        "max_regression": 0.05,
    },
    "compress": {"max_accuracy_drop": 0.2},
}


# -- building a tiny project on disk ---------------------------------------------------------


def project_params(root: Path, **overrides) -> Params:
    raw = tiny_params_dict(root, "unused")
    for section, values in GATE_PARAMS.items():
        raw[section].update(values)
    for key, value in overrides.items():
        section, leaf = key.split(".")
        raw[section][leaf] = value
    raw["paths"]["champion_file"] = str(root / "deploy" / "champion.json")
    return parse_params(raw)


def labelled_split(model_file: Path, per_class: int = 12, seed: int = 0) -> ImageSet:
    """Random images, labelled by what ``model_file`` predicts; ``per_class`` of each class."""
    rng = np.random.default_rng(seed)
    # Sparse bright pixels: the linear model's classes then all occur (dense noise is one class).
    x = ((rng.random((4000, *IMAGE_SHAPE)) < 0.1) * 255).astype(np.uint8)
    y = gate.onnx_predict(model_file, x)
    keep = np.concatenate([np.flatnonzero(y == k)[:per_class] for k in range(len(CLASS_NAMES))])
    assert len(keep) == per_class * len(CLASS_NAMES), "the model never predicts some class"
    return ImageSet(x[keep], y[keep].astype(np.int64))


def write_test_split(params: Params, split: ImageSet) -> None:
    prepared = Path(params.paths.prepared_dir)
    save_images(split, prepared / "test.npz")
    DatasetMeta(CLASS_NAMES, IMAGE_SHAPE, "test", {"test": len(split)}).save(prepared / "meta.json")


def write_challenger(params: Params, int8_seed: int, fp32_seed: int | None = None) -> dict:
    """ONNX variants + the compress.json and evaluate.json a real run would leave; metrics."""
    onnx_dir = Path(params.paths.model_dir) / "onnx"
    shutil.rmtree(onnx_dir, ignore_errors=True)
    make_tiny_onnx(onnx_dir / "int8.onnx", int8_seed)
    make_tiny_onnx(onnx_dir / "fp32.onnx", int8_seed if fp32_seed is None else fp32_seed)
    test = load_images(Path(params.paths.prepared_dir) / "test.npz")
    measured = {
        v: gate.measure(onnx_dir / f"{v}.onnx", test, CLASS_NAMES) for v in ("fp32", "int8")
    }
    metrics_dir = Path(params.paths.metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    variants = {
        v: {
            "size_bytes": (onnx_dir / f"{v}.onnx").stat().st_size,
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "latency_ms_batch1": 0.05,
        }
        for v, m in measured.items()
    }
    (metrics_dir / "compress.json").write_text(
        json.dumps({"variants": variants, "served_variant": "int8"})
    )
    network = measured["fp32"]  # the network answers like its fp32 export
    result = evaluate.EvaluateResult(network, evaluate.absolute_gates(network, params.evaluate))
    (metrics_dir / "evaluate.json").write_text(
        json.dumps(
            {
                "format": evaluate.EVALUATE_FORMAT,
                **evaluate.metrics_payload(network),
                "gates": {g.name: g.to_json() for g in result.gates},
                "passed": result.passed,
                "failed": [],
            }
        )
    )
    return measured["int8"]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Params:
    """A project root (the cwd) with a test split labelled by the good model."""
    monkeypatch.chdir(tmp_path)
    params = project_params(tmp_path)
    good = make_tiny_onnx(tmp_path / "reference" / "good.onnx", GOOD_SEED)
    write_test_split(params, labelled_split(good))
    return params


def champion_record(params: Params, metrics: dict, **changes) -> champ.ChampionRecord:
    """A champion measured on the project's current test split (unless changed)."""
    test = load_images(Path(params.paths.prepared_dir) / "test.npz")
    fields = {
        "run": "rchampion0001",
        "bento_tag": "tiny-classifier:rchampion0001",
        "archive": "artefacts/tiny-classifier-rchampion0001.bento",
        "archive_md5": None,
        "model": "tiny:int8-000000000000",
        "model_sha256": "0" * 64,
        "served_variant": "int8",
        "class_names": list(CLASS_NAMES),
        "image_shape": list(IMAGE_SHAPE),
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
    gates = {g.name: g for g in evaluate.absolute_gates(_metrics(), strict)}
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
    gates = evaluate.absolute_gates(_metrics(accuracy=0.8999999999999), exact)
    assert gates[0].passed


def test_a_class_without_test_examples_fails_the_recall_gate(project):
    gate_ = evaluate.class_recall_gate(_metrics(supports=(5, 0, 5))["per_class"], 0.0)
    assert not gate_.passed
    assert "class 'b' has no test examples" in gate_.reason


def test_drop_gates_bound_the_loss_of_a_compressed_variant():
    reference = {"accuracy": 0.95, "macro_f1": 0.95}
    ok = evaluate.drop_gates({"accuracy": 0.94, "macro_f1": 0.95}, reference, 0.01, "fp32")
    assert all(g.passed for g in ok)
    bad = evaluate.drop_gates({"accuracy": 0.90, "macro_f1": 0.95}, reference, 0.01, "fp32")
    assert [g.passed for g in bad] == [False, True]
    assert bad[0].reason == "accuracy drop vs fp32 +0.0500 (0.9500 -> 0.9000) > max 0.0100"


def test_regression_gates_against_the_champion():
    champion = {"accuracy": 0.95, "macro_f1": 0.94}
    none = evaluate.regression_gates(champion, None, 0.01, "None", "no champion yet: passes")
    assert len(none) == 1 and none[0].passed and none[0].reason == "no champion yet: passes"
    within = evaluate.regression_gates(
        {"accuracy": 0.945, "macro_f1": 0.94}, champion, 0.01, "r1", ""
    )
    assert all(g.passed for g in within)
    worse = evaluate.regression_gates(
        {"accuracy": 0.93, "macro_f1": 0.95}, champion, 0.01, "r1", ""
    )
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
    with pytest.raises(StageError, match=r"format 1, this code reads format 2.*dvc repro evaluate"):
        evaluate.read_evaluate_json(path)
    path.write_text(json.dumps({"format": 2, "accuracy": 0.9}))
    with pytest.raises(StageError, match=r"lacks macro_f1, min_class_recall"):
        evaluate.read_evaluate_json(path)
    path.write_text("{not json")
    with pytest.raises(StageError, match=r"not valid JSON"):
        evaluate.read_evaluate_json(path)
    with pytest.raises(StageError, match=r"not found: run the evaluate stage"):
        evaluate.read_evaluate_json(tmp_path / "missing.json")


def test_a_compress_json_without_sizes_is_refused(project):
    write_challenger(project, GOOD_SEED)
    path = Path(project.paths.metrics_dir) / "compress.json"
    path.write_text(json.dumps({"variants": {"int8": {"accuracy": 0.9}}}))
    with pytest.raises(StageError, match=r"variant 'int8' lacks size_bytes"):
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
    assert served["gates"]["no_regression"] == {
        "value": None,
        "threshold": None,
        "op": ">=",
        "passed": True,
        "reason": "no champion yet: the first challenger passes by definition",
    }
    assert "no_regression" not in written["variants"]["fp32"]["gates"]  # only the served one
    rows = (Path(project.paths.metrics_dir) / "compression.csv").read_text().splitlines()
    assert rows[0] == "variant,size_kib,latency_ms,accuracy,macro_f1,min_class_recall,served"
    assert [r.split(",")[0] for r in rows[1:]] == ["fp32", "int8"]


def test_a_worse_challenger_fails_with_the_reason_and_the_report_says_so(project):
    write_challenger(project, BAD_SEED)
    record = champion_record(project, {"accuracy": 1.0, "macro_f1": 1.0})
    champ.save_record(project.paths.champion_file, record)
    before = Path(project.paths.champion_file).read_bytes()

    with pytest.raises(StageError, match=r"gate failed for the int8 model: accuracy 0\.\d+ is"):
        gate.run(project)

    written = json.loads((Path(project.paths.metrics_dir) / "gate.json").read_text())
    assert not written["passed"]
    assert written["champion"]["run"] == "rchampion0001"
    assert written["champion"]["source"] == "recorded"
    assert any("below champion rchampion0001 1.0000" in r for r in written["failed"])
    assert Path(project.paths.champion_file).read_bytes() == before  # the gate never writes it
    page = (Path(project.paths.reports_dir) / "report.html").read_text()
    assert "Refused at gate" in page and "below champion rchampion0001" in page


def test_a_better_challenger_passes_the_no_regression_gate(project):
    write_challenger(project, GOOD_SEED)
    champ.save_record(
        project.paths.champion_file, champion_record(project, {"accuracy": 0.5, "macro_f1": 0.5})
    )
    result = gate.run(project)
    assert result.passed
    reasons = [g.reason for g in result.variants["int8"].gates if g.name.startswith("no_reg")]
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
    test = load_images(Path(project.paths.prepared_dir) / "test.npz")
    write_test_split(project, ImageSet(test.x, np.full_like(test.y, 7)))
    with pytest.raises(StageError, match=r"label 7, which the model does not know"):
        gate.run(project)
    write_test_split(project, ImageSet(test.x[:0], test.y[:0]))
    with pytest.raises(StageError, match=r"test split is empty"):
        gate.run(project)
    assert not (Path(project.paths.metrics_dir) / "gate.json").exists()


def test_a_failed_evaluate_json_is_never_gated_into_a_package(project):
    write_challenger(project, GOOD_SEED)
    path = Path(project.paths.metrics_dir) / "evaluate.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "passed": False}))
    with pytest.raises(StageError, match=r"failed its gates: nothing to package"):
        gate.run(project)


def test_the_fingerprint_follows_the_content_not_the_file():
    x = np.zeros((2, 1, 2, 2), np.uint8)
    base = champ.split_fingerprint(ImageSet(x, np.array([0, 1])), ("a", "b"))
    assert base == champ.split_fingerprint(ImageSet(x.copy(), np.array([0, 1])), ("a", "b"))
    assert base != champ.split_fingerprint(ImageSet(x, np.array([1, 0])), ("a", "b"))
    assert base != champ.split_fingerprint(ImageSet(x, np.array([0, 1])), ("a", "c"))
