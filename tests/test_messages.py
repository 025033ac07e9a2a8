"""Messages that help: a class named by its value, an unreadable CSV by file, row and line, and a
failed validation check by the params.yaml key that sets its limit. Fast: no training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.config import parse_params
from components.dataset import ArraySet, DatasetMeta
from components.kinds.table import TableKind
from components.stage import StageError
from components.validate import check_splits
from tests.conftest import tiny_params_dict


def _ingest(tmp_path: Path, source: Path, **ingest):
    raw = tiny_params_dict(tmp_path, str(source))
    raw["ingest"].update(kind="table", target="y", task="classification", **ingest)
    return parse_params(raw).ingest


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / "data" / "external" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_a_class_too_small_to_split_is_named_by_its_value(tmp_path):
    rows = ["x,y", *(f"{i},cat" for i in range(6)), *(f"{i},dog" for i in range(6)), "1,eel"]
    source = _write(tmp_path, "animals.csv", ("\n".join(rows) + "\n").encode())
    with pytest.raises(StageError) as err:
        TableKind().prepare(_ingest(tmp_path, source), source.parent)
    assert "class 'eel' has 1 example(s)" in str(err.value)
    assert "index" not in str(err.value)


def test_a_truncated_csv_names_the_file_and_the_row(tmp_path):
    rows = "x1,x2,y\n" + "".join(f"{i},{i * 2},{'ab'[i % 2]}\n" for i in range(20)) + "20,4"
    source = _write(tmp_path, "cut.csv", rows.encode())
    with pytest.raises(StageError) as err:
        TableKind().prepare(_ingest(tmp_path, source), source.parent)
    said = str(err.value)
    assert said.startswith(f"{source}, row 21 (line 22): 2 field(s), but the header has 3"), said
    assert "cut short" in said


def test_a_ragged_row_inside_a_csv_names_its_row(tmp_path):
    rows = "x1,x2,y\n1,2,a\n3,4,b\n5,6,7,a\n" + "".join(f"{i},{i},b\n" for i in range(9))
    source = _write(tmp_path, "ragged.csv", rows.encode())
    with pytest.raises(StageError, match=r"ragged\.csv, row 3 \(line 4\): 4 field\(s\), but the "):
        TableKind().prepare(_ingest(tmp_path, source), source.parent)


def test_a_csv_that_is_not_utf8_names_the_line(tmp_path):
    rows = b"x,y\n1,a\n2,b\n3,caf\xe9\n"  # Latin-1
    source = _write(tmp_path, "latin.csv", rows)
    with pytest.raises(StageError, match=r"latin\.csv, line 4: not UTF-8 text .*byte 0xe9"):
        TableKind().prepare(_ingest(tmp_path, source), source.parent)


def test_a_failed_validation_check_names_the_param_that_sets_it(tmp_path):
    frame = pd.DataFrame({"x": [1.0, np.nan, 3.0, 4.0], "y": [0.0, 1.0, 2.0, 3.0]})
    meta = DatasetMeta(
        class_names=(),
        input_shape=(1,),
        source="t.csv",
        split_sizes={"train": 4},
        kind="table",
        task="regression",
        target="y",
        feature_names=("x",),
        preprocess={"columns": [{"name": "x"}]},
    )
    data = ArraySet(np.zeros((4, 1), np.float32), np.zeros(4, np.float32))
    params = parse_params(tiny_params_dict(tmp_path, "unused")).validate_
    result = check_splits({"train": data}, meta, params, frames={"train": frame})
    assert result.failed == (
        "train: column 'x': missing values <= 0.0% (1 of 4 rows, 25.0%; the limit is "
        "validate.max_missing_fraction in params.yaml)",
    )
