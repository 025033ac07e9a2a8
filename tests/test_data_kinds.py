"""Tables and sequences through ingest, validate and train: splits, the fitted transform, the
networks, and the bad inputs that must stop before any training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components import features, ingest, train, validate
from components.config import parse_params
from components.dataset import DatasetMeta, load_arrays, meta_path, split_path, table_path
from components.stage import StageError
from tests.conftest import SERIES_OVERRIDES, TABLE_OVERRIDES, make_series, make_table, params_with


def _write(tmp_path: Path, frame: pd.DataFrame, name: str) -> Path:
    path = tmp_path / "data" / "external" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def _table_params(tmp_path: Path, target: str, name: str = "table.csv", frame=None, **ingest_kw):
    path = _write(tmp_path, make_table() if frame is None else frame, name)
    raw = params_with(
        tmp_path, str(path), TABLE_OVERRIDES, {"ingest": {"target": target, **ingest_kw}}
    )
    return parse_params(raw)


def _meta(params) -> DatasetMeta:
    return DatasetMeta.load(meta_path(params.paths.prepared_dir))


# ---------------------------------------------------------------- tables


@pytest.mark.parametrize(
    ("values", "dtype", "names", "codes"),
    [
        (["b", "a", "b", "c"], None, ("a", "b", "c"), [1, 0, 1, 2]),
        (["b", "a", "b"], "string", ("a", "b"), [1, 0, 1]),
        ([10, 2, 10], None, ("10", "2"), [0, 1, 0]),  # names sort as text, as they always did
        ([True, False, True], None, ("False", "True"), [1, 0, 1]),
        (["y", "x", "y"], pd.CategoricalDtype(["y", "x"]), ("x", "y"), [1, 0, 1]),
        ([0.0, -0.0, 1.5], None, ("-0.0", "0.0", "1.5"), [1, 0, 2]),  # floats: per row
        (["1", 1, 1.0], object, ("1", "1.0"), [0, 0, 1]),  # mixed objects: per row
    ],
)
def test_class_targets_are_named_by_their_text_whatever_the_column_type(values, dtype, names,
                                                                         codes):  # fmt: skip
    """A typed column's classes are named once per distinct value (a million rows: their codes,
    not a million strings), with the same names and indices as str of every row gives."""
    from components.kinds.table import encode_target

    y, class_names = encode_target(pd.Series(values, dtype=dtype, name="t"), "classification")
    assert class_names == names and y.tolist() == codes and y.dtype == np.int64


def test_table_classification_encodes_with_a_transform_fitted_on_train_only(tmp_path):
    params = _table_params(tmp_path, "kind", features=["x1", "x2", "color"])
    ingest.run(params)
    meta = _meta(params)
    assert (meta.kind, meta.task, meta.target) == ("table", "classification", "kind")
    assert meta.class_names == ("high", "low", "mid")
    assert meta.feature_names == ("x1", "x2", "color=blue", "color=green", "color=red")
    assert meta.input_shape == (5,)

    frames = {
        s: pd.read_parquet(table_path(params.paths.prepared_dir, s)) for s in ("train", "test")
    }
    spec = meta.preprocess
    x1 = next(c for c in spec["columns"] if c["name"] == "x1")
    assert x1["mean"] == pytest.approx(frames["train"]["x1"].mean())  # train only, not all rows
    assert x1["mean"] != pytest.approx(make_table()["x1"].mean())

    # The served path (JSON rows) encodes exactly like the training data was encoded.
    test = load_arrays(split_path(params.paths.prepared_dir, "test"))
    rows = frames["test"].drop(columns=["kind"]).to_dict(orient="records")
    assert np.array_equal(features.encode_records(rows, spec), test.x)
    assert test.x.dtype == np.float32 and test.y.dtype == np.int64


def test_table_task_auto_picks_regression_for_a_continuous_target(tmp_path):
    params = _table_params(tmp_path, "price", name="table.parquet", features=["x1", "x2", "color"])
    ingest.run(params)
    meta = _meta(params)
    assert (meta.task, meta.class_names, meta.num_outputs) == ("regression", (), 1)
    train_split = load_arrays(split_path(params.paths.prepared_dir, "train"))
    assert train_split.y.dtype == np.float32


def test_builtin_sklearn_table_loads_offline(tmp_path):
    raw = params_with(tmp_path, "sklearn:diabetes", TABLE_OVERRIDES)
    result = ingest.run(parse_params(raw))
    assert result.n_examples == 442
    assert DatasetMeta.load(meta_path(tmp_path / "data/prepared")).task == "regression"


def test_table_regression_trains_an_mlp_that_learns(tmp_path):
    frame = make_table(n=240)
    params = _table_params(tmp_path, "price", frame=frame, features=["x1", "x2", "color"])
    raw = params.model_dump(by_alias=True, mode="json")
    raw["train"].update(max_epochs=30, hidden_units=[32], learning_rate=0.01)
    params = parse_params(raw)
    ingest.run(params)
    result = train.run(params)
    assert result.best_val_accuracy is None
    summary = json.loads((Path(params.paths.metrics_dir) / "train.json").read_text())
    target_std = frame["price"].std()
    assert summary["best_val_rmse"] < 0.35 * target_std  # far better than guessing the mean
    described = json.loads((Path(params.paths.model_dir) / "model.json").read_text())
    assert described["task"] == "regression" and described["preprocess"]["columns"]
    assert described["config"]["target_std"] > 1  # the net answers in price units
    history = (Path(params.paths.metrics_dir) / "train_history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,val_loss,val_accuracy,val_rmse"
    assert history[1].split(",")[3] == "" and float(history[1].split(",")[4]) > 0


def test_validate_checks_a_table_and_names_the_column_with_missing_values(tmp_path):
    frame = make_table()
    frame.loc[::4, "x2"] = np.nan  # a quarter missing
    params = _table_params(tmp_path, "kind", frame=frame, features=["x1", "x2", "color"])
    ingest.run(params)
    test = load_arrays(split_path(params.paths.prepared_dir, "test"))
    assert np.isfinite(test.x).all()  # imputed with the training mean
    splits = [
        pd.read_parquet(table_path(params.paths.prepared_dir, s)) for s in ("train", "val", "test")
    ]
    assert sum(int(f["x2"].isna().sum()) for f in splits) == int(frame["x2"].isna().sum())
    with pytest.raises(StageError, match=r"column 'x2': missing values <= 0.0%"):
        validate.run(params)
    summary = json.loads((Path(params.paths.metrics_dir) / "validation.json").read_text())
    assert not summary["success"] and all("x2" in f for f in summary["failed"])

    raw = params.model_dump(by_alias=True, mode="json")
    raw["validate"]["max_missing_fraction"] = 0.6
    assert validate.run(parse_params(raw)).success


# ---------------------------------------------------------------- sequences


def test_time_series_is_split_in_time_and_windowed(tmp_path):
    series = make_series()
    path = _write(tmp_path, series, "series.csv")
    params = parse_params(params_with(tmp_path, str(path), SERIES_OVERRIDES))
    ingest.run(params)
    meta = _meta(params)
    assert (meta.kind, meta.task, meta.input_shape) == ("sequence", "regression", (8, 2))
    assert meta.feature_names == ("load", "temp")  # numeric columns only: the date is left out
    frames = {
        s: pd.read_parquet(table_path(params.paths.prepared_dir, s))
        for s in ("train", "val", "test")
    }
    assert sum(len(f) for f in frames.values()) == len(series)
    # Chronological: train first, test last; a window's target is `horizon` after it.
    assert np.allclose(frames["test"]["load"], series["load"][-len(frames["test"]) :])
    assert np.allclose(frames["train"]["load"], series["load"][: len(frames["train"])])
    train_split = load_arrays(split_path(params.paths.prepared_dir, "train"))
    assert len(train_split) == len(frames["train"]) - 8 - 1 + 1
    assert train_split.y[0] == pytest.approx(series["load"][8])
    spec = meta.preprocess
    first = features.encode_frame(frames["train"].iloc[:8], spec)
    assert np.array_equal(first, train_split.x[0])

    assert validate.run(params).success
    result = train.run(params)
    assert result.epochs_run >= 1
    described = json.loads((Path(params.paths.model_dir) / "model.json").read_text())
    assert described["config"]["family"] == "gru" and described["kind"] == "sequence"


@pytest.mark.parametrize(
    ("ingest_overrides", "inputs"),
    [
        ({}, ("load", "temp")),  # the year counts time: not an input
        ({"time_index_as_input": True}, ("year", "load", "temp")),
        ({"features": ["year", "load"]}, ("year", "load")),  # named: taken as asked
    ],
)
def test_a_series_time_index_is_an_input_only_when_asked(tmp_path, ingest_overrides, inputs):
    from components import kinds

    series = make_series(n=60)
    series.insert(0, "year", np.arange(1950, 1950 + len(series)))
    path = _write(tmp_path, series, "yearly.csv")
    raw = params_with(tmp_path, str(path), SERIES_OVERRIDES, {"ingest": ingest_overrides})
    cfg = parse_params(raw).ingest
    prepared = kinds.get("sequence").prepare(cfg, path.parent)
    assert prepared.meta.feature_names == inputs
    assert f"inputs {list(inputs)}" in prepared.summary  # the log line names them
    assert ("time index 'year' not an input" in prepared.summary) == ("year" not in inputs)


def test_per_sample_sequences_classify_with_an_lstm(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 6, 2)).astype(np.float32)
    y = (x[:, :, 0].sum(axis=1) > 0).astype(np.int64)
    path = tmp_path / "data" / "external" / "seq.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, x=x, y=y, class_names=np.array(["down", "up"]))
    raw = params_with(tmp_path, str(path), SERIES_OVERRIDES, {"train": {"model": "lstm"}})
    params = parse_params(raw)
    ingest.run(params)
    meta = _meta(params)
    assert (meta.kind, meta.task, meta.class_names, meta.input_shape) == (
        "sequence", "classification", ("down", "up"), (6, 2)
    )  # fmt: skip
    assert validate.run(params).success
    assert train.run(params).best_val_accuracy is not None


# ---------------------------------------------------------------- bad input, before training


def test_wrong_target_column_names_the_param_and_the_columns(tmp_path):
    params = _table_params(tmp_path, "kinds")
    with pytest.raises(StageError, match=r"ingest.target 'kinds' is not a column .*'kind'"):
        ingest.run(params)


def test_unknown_feature_and_text_regression_target_are_refused(tmp_path):
    with pytest.raises(StageError, match=r"ingest.features \['x3'\] are not columns"):
        ingest.run(_table_params(tmp_path, "kind", features=["x1", "x3"]))
    with pytest.raises(StageError, match="target column 'kind' holds text"):
        ingest.run(_table_params(tmp_path, "kind", task="regression"))


def test_an_id_column_is_not_taken_for_a_category(tmp_path):
    frame = make_table(n=300)
    frame["order_id"] = [f"o-{i}" for i in range(len(frame))]
    with pytest.raises(StageError, match="column 'order_id' has .* distinct values"):
        ingest.run(_table_params(tmp_path, "kind", frame=frame))


def test_a_series_shorter_than_the_window_stops_ingest(tmp_path):
    path = _write(tmp_path, make_series(n=40), "series.csv")
    raw = params_with(tmp_path, str(path), SERIES_OVERRIDES, {"ingest": {"window": 12}})
    with pytest.raises(StageError, match=r"ingest.window 12 \+ horizon 1 needs at least 13 rows"):
        ingest.run(parse_params(raw))


def test_a_table_with_one_class_stops_ingest(tmp_path):
    frame = make_table()
    frame["kind"] = "only"
    with pytest.raises(StageError, match="has 1 class"):
        ingest.run(_table_params(tmp_path, "kind", frame=frame, task="classification"))


@pytest.mark.parametrize(
    ("train_kw", "message"),
    [
        ({"model": "cnn"}, "train.model: cnn needs images"),
        ({"model": "lstm"}, "train.model: lstm needs sequences"),
        ({"augment": {"crop_padding": 2, "max_rotation_degrees": 0, "horizontal_flip": False}},
         "train.augment: crops, rotations and flips are for images"),
    ],
)  # fmt: skip
def test_a_model_that_cannot_read_the_data_stops_before_training(tmp_path, train_kw, message):
    params = _table_params(tmp_path, "kind")
    ingest.run(params)
    raw = params.model_dump(by_alias=True, mode="json")
    raw["train"].update(train_kw)
    with pytest.raises(StageError, match=message):
        train.run(parse_params(raw))
    assert not (Path(params.paths.model_dir) / "model.pt").exists()


def test_served_rows_with_bad_fields_name_the_row_and_column():
    spec = features.fit(make_table(), ["x1", "color"])
    ok = features.encode_records(
        [{"x1": 0.5, "color": "purple"}, {"x1": None, "color": None}], spec
    )
    assert ok.shape == (2, 4) and ok[0, 1:].sum() == 0 and ok[1, 0] == 0  # unseen -> zeros
    with pytest.raises(features.FeatureError, match=r"row 1 lacks column\(s\) \['color'\]"):
        features.encode_records([{"x1": 1, "color": "red"}, {"x1": 1}], spec)
    with pytest.raises(features.FeatureError, match=r"row 0, column 'x1': expected a number"):
        features.encode_records([{"x1": "1.5", "color": "red"}], spec)
    with pytest.raises(features.FeatureError, match=r"unknown column\(s\) \['x9'\]"):
        features.encode_records([{"x1": 1, "color": "red", "x9": 0}], spec)


def test_a_frame_encodes_in_one_pass_as_its_rows_would_one_value_at_a_time():
    """Training encodes a frame's numeric columns as arrays; serving encodes JSON rows value by
    value: the same numbers, missing values and errors either way."""
    frame = make_table(n=500)
    frame.loc[[3, 77], "x1"] = np.nan
    spec = features.fit(frame, ["x1", "x2", "color"])
    rows = [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        for r in frame[["x1", "x2", "color"]].to_dict("records")
    ]
    whole = features.encode_frame(frame, spec)
    assert np.array_equal(whole, features.encode_records(rows, spec))
    assert whole[3, 0] == 0.0  # missing: the mean, standardised
    frame.loc[41, "x2"] = np.inf
    rows[41]["x2"] = float("inf")
    infinite = r"^row 41, column 'x2': inf is not finite$"
    for encode, data in ((features.encode_frame, frame), (features.encode_records, rows)):
        with pytest.raises(features.FeatureError, match=infinite):
            encode(data, spec)


def test_a_frames_categorical_columns_encode_in_one_pass_as_value_by_value():
    """The one-pass one-hot of a frame's categories (a pandas index lookup) equals the per-value
    encoding JSON rows get, for every kind of column fit takes as categorical: strings with
    missing and unseen values, mixed objects (numbers, booleans, NaN), pandas categories,
    booleans, pandas strings with NA, and dates (``str`` of a Timestamp, not pandas' format)."""
    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame({
        "s": rng.choice(["a", "b", "c", None], n),
        "mixed": pd.Series(rng.choice([1, 2.5, "x", True, None, np.nan], n), dtype=object),
        "cat": pd.Series(rng.choice(["u", "v", "w"], n)).astype("category"),
        "b": rng.choice([True, False], n),
        "sd": pd.Series(rng.choice(["p", "q", None], n), dtype="string"),
        "dt": pd.to_datetime(pd.Series(rng.choice(["2020-01-01", "2021-06-01", None], n))),
        "num": rng.normal(size=n),
    })  # fmt: skip
    spec = features.fit(frame.iloc[: n // 2], list(frame.columns))
    assert [c["type"] for c in spec["columns"]] == ["categorical"] * 6 + ["numeric"]
    frame.loc[frame.index[-20:], "s"] = "never seen in training"
    value_by_value = features.encode(
        {c: [None if pd.isna(v) else v for v in frame[c].tolist()] for c in frame.columns}, spec
    )
    whole = features.encode_frame(frame, spec)
    assert np.array_equal(whole, value_by_value)
    names = spec["features"]
    assert whole[-20:, [i for i, f in enumerate(names) if f.startswith("s=")]].sum() == 0
    dates = [i for i, f in enumerate(names) if f.startswith("dt=")]
    assert [names[i] for i in dates] == ["dt=2020-01-01 00:00:00", "dt=2021-06-01 00:00:00"]
    assert whole[:, dates].sum() == frame["dt"].notna().sum()  # every date found its category
