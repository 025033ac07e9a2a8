"""A new data kind is one new module: a kind defined in tests/signal_kind.py, named in params,
goes through ingest, validate (in its own process, as DVC runs it), train and evaluate with no
edit to any stage; and the registry names what it cannot find."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from components import evaluate, ingest, kinds, train, validate
from components.config import ParamsError, parse_params
from components.dataset import DatasetMeta, load_arrays, meta_path, split_path
from components.kinds import registry
from components.stage import StageError
from tests.conftest import REPO_ROOT, params_with

SIGNAL_KIND = "tests.signal_kind:SignalKind"
LENGTH = 32
SIGNAL_OVERRIDES = {
    "ingest": {"kind": SIGNAL_KIND},
    "train": {"model": "mlp", "hidden_units": [16], "max_epochs": 8, "learning_rate": 0.02},
    "evaluate": {"min_accuracy": 0.9, "min_macro_f1": 0.9, "min_class_recall": 0.8},
}


def write_signals(external: Path, per_class: int = 30, seed: int = 0) -> Path:
    """Slow and fast sine waves with random phase and noise: class 'slow' and class 'fast'."""
    rng = np.random.default_rng(seed)
    t = np.arange(LENGTH)
    rows, labels = [], []
    for label, period in enumerate((16.0, 4.0)):
        for _ in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            rows.append(3 * np.sin(2 * np.pi * t / period + phase) + rng.normal(0, 0.3, LENGTH))
            labels.append(label)
    path = external / "signals.npz"
    external.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=np.array(rows), y=np.array(labels), class_names=np.array(["slow", "fast"]))
    return path


def signal_params(root: Path, *extra: dict):
    source = write_signals(root / "data" / "external")
    return parse_params(params_with(root, str(source), SIGNAL_OVERRIDES, *extra))


def run_stage(stage: str, params, root: Path) -> subprocess.CompletedProcess:
    """``python -m components.<stage>`` in ``root`` with these params, as dvc.yaml runs it."""
    (root / "params.yaml").write_text(
        yaml.safe_dump(params.model_dump(by_alias=True, mode="json"), sort_keys=False)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"components.{stage}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_new_kind_goes_through_every_stage_without_editing_one(tmp_path):
    params = signal_params(tmp_path)
    result = ingest.run(params)
    assert result.n_examples == 60
    meta = DatasetMeta.load(meta_path(params.paths.prepared_dir))
    assert (meta.kind, meta.input_shape, meta.class_names) == (
        SIGNAL_KIND,
        (LENGTH,),
        ("slow", "fast"),
    )
    test = load_arrays(split_path(params.paths.prepared_dir, "test"))
    assert test.x.dtype == np.float32 and np.bincount(test.y).tolist() == [8, 8]  # stratified

    # Validate in its own process: the kind is found through meta.json's reference alone.
    done = run_stage("validate", params, tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((Path(params.paths.metrics_dir) / "validation.json").read_text())
    # per split: 1 dtype check + 2 signal expectations + 1 class-count expectation
    assert summary == {"success": True, "evaluated_expectations": 3 * 4, "failed": []}
    docs = Path(params.paths.reports_dir) / "validation" / "validations"
    assert any("signals" in p.name for p in docs.rglob("*.html"))

    trained = train.run(params)
    assert trained.best_val_accuracy is not None
    described = json.loads((Path(params.paths.model_dir) / "model.json").read_text())
    assert described["kind"] == SIGNAL_KIND and described["config"]["input_scale"] == 1.0

    evaluated = evaluate.run(params)
    assert evaluated.passed, [g.reason for g in evaluated.gates]
    assert evaluated.metrics["accuracy"] >= 0.9

    # Nothing in the stages knows this kind: it came from params and tests/signal_kind.py.
    for stage in (ingest, validate, train, evaluate):
        assert "signal" not in Path(stage.__file__).read_text().lower()


def test_the_new_kind_is_validated_by_its_own_suite(tmp_path):
    params = signal_params(tmp_path)
    ingest.run(params)
    splits = {s: load_arrays(split_path(params.paths.prepared_dir, s)) for s in ("train", "val")}
    x = splits["val"].x.copy()
    x[0, 3] = np.nan
    meta = DatasetMeta.load(meta_path(params.paths.prepared_dir))
    broken = {**splits, "val": type(splits["val"])(x.astype(np.float64), splits["val"].y)}
    result = validate.check_splits(broken, meta, params.validate_)
    assert result.failed == (
        "val: signal dtype == float32 (found float64)",
        "val: signals with NaN == 0 (1 of 16 signals, 6.2%)",
    )
    assert result.stats["train"]["examples"] == 28


@pytest.mark.parametrize(
    ("train_kw", "message"),
    [
        ({"model": "cnn"}, r"train.model: cnn needs images, but .*signals.npz is a signal; "
                           "use mlp"),
        ({"augment": {"crop_padding": 2, "max_rotation_degrees": 0, "horizontal_flip": False}},
         "train.augment: crops, rotations and flips are for images, not a signal"),
    ],
)  # fmt: skip
def test_the_kind_decides_which_models_and_augmentation_apply(tmp_path, train_kw, message):
    params = signal_params(tmp_path)
    ingest.run(params)
    raw = params.model_dump(by_alias=True, mode="json")
    raw["train"].update(train_kw)
    with pytest.raises(StageError, match=message):
        train.run(parse_params(raw))
    assert not (Path(params.paths.model_dir) / "model.pt").exists()


def test_a_kind_registered_in_process_answers_to_its_short_name(tmp_path, monkeypatch):
    from tests.signal_kind import SignalKind

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))  # leave no trace
    kinds.register(SignalKind, "signal")
    params = signal_params(tmp_path, {"ingest": {"kind": "signal"}})
    ingest.run(params)
    assert DatasetMeta.load(meta_path(params.paths.prepared_dir)).kind == "signal"


def test_an_unknown_kind_is_named_where_it_is_set(tmp_path):
    with pytest.raises(ParamsError, match="unknown data kind 'signals'"):
        signal_params(tmp_path, {"ingest": {"kind": "signals"}})
    params = signal_params(tmp_path, {"ingest": {"kind": "tests.no_such_kind:Kind"}})
    with pytest.raises(
        ValueError, match=r"ingest.kind: data kind 'tests.no_such_kind:Kind': cannot"
    ):
        ingest.run(params)
    not_a_kind = signal_params(tmp_path, {"ingest": {"kind": "tests.signal_kind:SUITE"}})
    with pytest.raises(ValueError, match="is not a DataKind subclass"):
        ingest.run(not_a_kind)


@pytest.mark.parametrize("kind", ["image", "table", "sequence"])
def test_card_fields_are_what_the_package_card_adds_for_the_kind(tmp_path, kind):
    """The kind's card fields can replace package.py's branch on the kind, field for field."""
    from components.bento_card import model_card

    spec = {"version": 1, "columns": [{"name": "a", "type": "numeric", "mean": 0, "std": 1}],
            "features": ["a"]}  # fmt: skip
    shape = {"image": (1, 8, 8), "table": (1,), "sequence": (4, 1)}[kind]
    extra = {} if kind == "image" else {"target": "a", "feature_names": ("a",), "preprocess": spec}
    meta = DatasetMeta(("x", "y"), shape, "test", {"train": 3}, kind=kind, **extra)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not really a model")
    card = model_card(onnx_file, meta, "m", "fp32")
    common = {"model", "model_sha256", "served_variant", "kind", "task", "class_names",
              "input_shape"}  # fmt: skip
    assert {k: v for k, v in card.items() if k not in common} == kinds.get(kind).card_fields(meta)
