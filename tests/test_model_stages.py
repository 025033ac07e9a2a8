"""train -> evaluate -> compress on tiny data, with the real Lightning Trainer and ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components import compress, evaluate, ingest, train
from components.config import parse_params
from components.dataset import ArraySet, load_arrays, save_arrays, split_path
from components.metrics import classification_metrics
from components.model import NetConfig, build_model, load_model
from components.report import write_stopped
from components.stage import StageError
from tests.conftest import TINY_CLASSES, make_images, tiny_params_dict


def _params(root: Path, npz: Path):
    raw = tiny_params_dict(root, str(npz))
    raw["paths"]["external_dir"] = str(npz.parent)
    return parse_params(raw)


@pytest.fixture(scope="module")
def tiny_npz_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "tiny.npz"
    x, y = make_images()
    np.savez(path, x=x, y=y, class_names=np.array(TINY_CLASSES))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_npz_module):
    """One tiny pipeline up to train, shared by the tests of this module."""
    params = _params(tmp_path_factory.mktemp("run"), tiny_npz_module)
    ingest.run(params)
    return params, train.run(params)


def test_train_writes_weights_metrics_and_history(trained):
    params, result = trained
    model_dir = Path(params.paths.model_dir)
    assert result.epochs_run == params.train.max_epochs
    # Weights load without unpickling arbitrary objects.
    state = torch.load(model_dir / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    history = (Path(params.paths.metrics_dir) / "train_history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,val_loss,val_accuracy,val_rmse"
    assert len(history) == 1 + result.epochs_run
    assert all(row.split(",")[1] for row in history[1:])  # every epoch has its own train loss
    metrics = json.loads((Path(params.paths.metrics_dir) / "train.json").read_text())
    assert metrics["best_val_accuracy"] > 0.6  # the tiny classes are easy; chance is 1/3


def test_same_seed_gives_bit_identical_metrics(trained, tmp_path):
    params, _ = trained
    again = _params(tmp_path, Path(params.ingest.source))
    ingest.run(again)
    train.run(again)
    first = (Path(params.paths.metrics_dir) / "train_history.csv").read_text()
    second = (Path(again.paths.metrics_dir) / "train_history.csv").read_text()
    assert first == second
    a = torch.load(Path(params.paths.model_dir) / "model.pt", weights_only=True)
    b = torch.load(Path(again.paths.model_dir) / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_writes_metrics_confusion_and_gates(trained):
    params, _ = trained
    result = evaluate.run(params)
    assert result.passed
    written = json.loads((Path(params.paths.metrics_dir) / "evaluate.json").read_text())
    written |= json.loads((Path(params.paths.metrics_dir) / "evaluate_gates.json").read_text())
    assert set(written["gates"]) == {"accuracy", "macro_f1", "min_class_recall"}
    assert all(g["reason"] and g["passed"] for g in written["gates"].values())
    assert written["format"] == 1 and written["failed"] == []  # evaluate_gates.json's format
    assert written["accuracy"] == pytest.approx(result.metrics["accuracy"], abs=1e-6)
    rows = (Path(params.paths.metrics_dir) / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 1 + written["test_examples"]
    per_class = (Path(params.paths.metrics_dir) / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,precision,recall,f1,support"
    assert [r.split(",")[0] for r in per_class[1:]] == list(TINY_CLASSES)


def test_failed_gate_names_the_metric(trained):
    params, _ = trained
    model, _ = load_model(params.paths.model_dir)
    test = load_arrays(split_path(params.paths.prepared_dir, "test"))
    strict = params.evaluate.model_copy(update={"min_accuracy": 1.01})
    predicted = np.zeros(len(test), dtype=np.int64)
    result = evaluate.evaluate(np.eye(3)[predicted], test, ("a", "b", "c"), strict)
    assert not result.passed
    assert "accuracy" in [g.name for g in result.gates if not g.passed]


def test_a_failed_evaluate_gate_stops_the_stage_and_writes_the_report(trained, tmp_path):
    params, _ = trained
    paths = params.paths.model_copy(
        update={"metrics_dir": tmp_path / "metrics", "reports_dir": tmp_path / "reports"}
    )
    strict = params.model_copy(
        update={
            "paths": paths,
            "evaluate": params.evaluate.model_copy(update={"min_class_recall": 1.01}),
        }
    )
    with pytest.raises(
        StageError, match=r"evaluation gate failed: lowest class recall .* < min 1\.0100"
    ) as failure:
        evaluate.run(strict)
    written = json.loads((tmp_path / "metrics" / "evaluate_gates.json").read_text())
    assert not written["passed"] and written["failed"][0].startswith("lowest class recall")
    # The flow writes the stopped run's page from the stage's reason (flows/pipeline.py).
    page = write_stopped(strict, "evaluate", str(failure.value)).read_text()
    assert (
        "Refused at evaluate" in page and "Not reached: the run stopped at <b>evaluate</b>" in page
    )


def test_evaluate_refuses_unknown_class_and_empty_split(trained):
    params, _ = trained
    test = load_arrays(split_path(params.paths.prepared_dir, "test"))
    unknown = ArraySet(test.x, np.full_like(test.y, 5))
    with pytest.raises(StageError, match="label 5, which the model does not know"):
        evaluate.evaluate(np.eye(3)[test.y], unknown, ("a", "b", "c"), params.evaluate)
    empty = ArraySet(test.x[:0], test.y[:0])
    with pytest.raises(StageError, match="test split is empty"):
        evaluate.evaluate(np.eye(3)[test.y[:0]], empty, ("a", "b", "c"), params.evaluate)


def _tensor_bytes(path: Path) -> int:
    """Bytes of the tensors (weights, biases, scales) an ONNX file stores."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def test_compress_exports_checks_and_quantizes(trained):
    params, _ = trained
    result = compress.run(params)
    onnx_dir = Path(params.paths.model_dir) / "onnx"
    assert (onnx_dir / "fp32.onnx").is_file() and (onnx_dir / "int8.onnx").is_file()
    # int8 stores the weights in a quarter of the bytes. (The whole file of a 900-parameter net
    # is mostly graph, and the int8 graph has more nodes: compare the stored tensors.)
    assert _tensor_bytes(onnx_dir / "int8.onnx") < 0.5 * _tensor_bytes(onnx_dir / "fp32.onnx")
    assert result.variants["int8"].size_bytes == (onnx_dir / "int8.onnx").stat().st_size
    # The fp32 export answers like PyTorch on the test split.
    model, _ = load_model(params.paths.model_dir)
    test = load_arrays(split_path(params.paths.prepared_dir, "test"))
    torch_logits = model(torch.from_numpy(test.x).float()).detach().numpy()
    onnx_logits = compress.run_onnx(onnx_dir / "fp32.onnx", test.x)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    written = json.loads((Path(params.paths.metrics_dir) / "compress.json").read_text())
    assert set(written["variants"]) == {"fp32", *params.compress.variants}  # int8 among them


def test_calibration_takes_at_most_the_training_split(trained, tmp_path):
    params, _ = trained
    train_set = load_arrays(split_path(params.paths.prepared_dir, "train"))
    assert np.array_equal(compress.pick_calibration(train_set, 10_000), train_set.x)
    some = compress.pick_calibration(train_set, 8)
    assert len(some) == 8 and np.array_equal(some, compress.pick_calibration(train_set, 8))


def test_too_many_pooling_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="train.channels"):
        build_model(NetConfig("cnn", (1, 8, 8), 3, (4, 4, 4, 4), (8,), 0.0, False, "relu"))


def test_metrics_match_hand_computed_values():
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], ("a", "b"))
    assert m["accuracy"] == 0.75
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    assert m["macro_recall"] == pytest.approx(0.75)


def test_saved_split_round_trips(tmp_path):
    images = ArraySet(np.zeros((2, 1, 3, 3), np.uint8), np.array([0, 1]))
    save_arrays(images, tmp_path / "s.npz")
    back = load_arrays(tmp_path / "s.npz")
    assert np.array_equal(back.x, images.x) and back.y.tolist() == [0, 1]
