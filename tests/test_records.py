"""The train and validate hand-offs are typed like the others: what they write reads back, and a
file that is not what the code writes is refused naming the file, the key and the stage."""

from __future__ import annotations

import json

import pytest

from components.records import (
    TrainSummary,
    ValidationSummary,
    parse_train,
    read_train,
    read_validation,
)
from components.stage import StageError, write_json


def test_train_summary_round_trips_and_names_what_train_logged(tmp_path):
    write_json(
        tmp_path / "train.json",
        TrainSummary(epochs_run=4, best_epoch=3, best_val_loss=0.25, best_val_rmse=1.5),
    )
    summary = read_train(tmp_path)
    assert summary.best("val_rmse") == 1.5 and summary.best("val_loss") == 0.25
    with pytest.raises(
        StageError, match=r"no best_val_accuracy: train logged \['val_loss', 'val_rmse'\]"
    ):
        summary.best("val_accuracy")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"epochs_run": 3, "best_epoch": 2, "best_val_loss": 0.1}, "needs one best_val_<metric>"),
        ({"epochs_run": 3, "best_epoch": 2, "best_val_accuracy": 0.9}, "best_val_loss"),
        ({"epochs_run": 3, "best_epoch": 2, "best_val_loss": 0.1, "best_val_accuracy": "high"},
         "must be a number"),
    ],
)  # fmt: skip
def test_a_train_json_this_code_did_not_write_is_refused(tmp_path, payload, expected):
    (tmp_path / "train.json").write_text(json.dumps(payload))
    with pytest.raises(StageError, match=expected) as err:
        read_train(tmp_path)
    assert "train.json" in str(err.value) and "train" in str(err.value)
    with pytest.raises(StageError, match="experiment e1: metrics/train.json"):
        parse_train(json.dumps(payload), "experiment e1: metrics/train.json")


def test_validation_summary_round_trips_and_refuses_unknown_keys(tmp_path):
    summary = ValidationSummary(success=False, evaluated_expectations=7, failed=("a check",))
    write_json(tmp_path / "validation.json", summary)
    assert read_validation(tmp_path) == summary
    (tmp_path / "validation.json").write_text(json.dumps({**summary.model_dump(), "extra": 1}))
    with pytest.raises(StageError, match="extra"):
        read_validation(tmp_path)
