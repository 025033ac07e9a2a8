"""Tables and sequences through the real bentos: the served model sees what training saw.

Two tiny models are exported to ONNX the way the compress stage does, packaged by the package
stage and served with ``bentoml serve <tag>`` (one server each; a start costs ~10 s):

- a table regression MLP (numeric, categorical and missing values; the target in its units);
- a GRU classifying sequences of 5 steps x 3 features.

Every answer must equal what ONNX Runtime in this process gives on
``components.features.encode_records`` of the same rows, which in turn equals the training
side's ``encode_frame``; every bad input is a 4xx naming the field and the rule. The edge
services run in process: the table's (regression: always answered locally) and the
sequence's, handing its unsure examples to the served cloud bento over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from components import features
from components.dataset import DatasetMeta
from tests.helpers import serving, try_every_openapi_example
from tests.tiny_models import tiny_settings

MAX_BATCH = 4  # tiny_settings
COLUMNS = ["size", "rooms", "city"]
CITIES = ["east", "north", "south"]
STEPS, WIDTH = 5, 3
SEQ_CLASSES = ("down", "flat", "up")


def house_frame(n: int = 40, seed: int = 0):
    """A small table: two numeric columns (one with a missing value), one categorical."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    size = rng.uniform(30, 150, n)
    rooms = rng.integers(1, 6, n).astype(float)
    rooms[-1] = np.nan
    city = rng.choice(CITIES, n)
    price = 2 * size + 10 * np.nan_to_num(rooms, nan=3) + (city == "north") * 50
    return pd.DataFrame({"size": size, "rooms": rooms, "city": city, "price": price})


def export_net(config, path: Path, seed: int = 0) -> Path:
    """A freshly initialised network of ``config``, exported as the compress stage does."""
    import torch

    from components.model import build_model
    from components.onnx_files import export_graph

    torch.manual_seed(seed)
    export_graph(build_model(config), tuple(config.input_shape), path)
    return path


def run_onnx(onnx_file: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    return session.run(None, {"inputs": x.astype(np.float32)})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Bento:
    root: Path
    onnx_file: Path
    spec: dict
    result: object  # PackageResult (cloud, and its edge bento)


def build_table_bento(root: Path) -> Bento:
    from components.model import NetConfig
    from components.package import package

    frame = house_frame()
    spec = features.fit(frame, COLUMNS)
    width = len(spec["features"])
    config = NetConfig(
        "mlp", (width,), 1, (), (8,), 0.0, False, "relu",
        task="regression", input_scale=1.0, target_mean=300.0, target_std=80.0,
    )  # fmt: skip
    onnx_file = export_net(config, root / "models" / "onnx" / "fp32.onnx")
    meta_file = root / "data" / "meta.json"
    meta_file.parent.mkdir(parents=True)
    DatasetMeta(
        (), (width,), "houses.csv", {"train": len(frame)}, kind="table", task="regression",
        target="price", feature_names=tuple(spec["features"]), preprocess=spec,
    ).save(meta_file)  # fmt: skip
    result = package(
        onnx_file,
        meta_file,
        tiny_settings("tiny-houses"),
        served_variant="fp32",
        staging_dir=root / "build" / "bento",
        artefacts_dir=root / "artefacts",
        metrics={"r2": 0.5, "rmse": 12.0, "mae": 9.0},
        edge_onnx_file=onnx_file,
        edge_metrics={"r2": 0.5},
    )
    return Bento(root, onnx_file, spec, result)


def sequence_frame(n: int = 30, seed: int = 1):
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(5, 2, (n, WIDTH)), columns=[f"f{j}" for j in range(WIDTH)])


def build_sequence_bento(root: Path) -> Bento:
    from components.model import NetConfig
    from components.package import package

    spec = features.fit(sequence_frame(), [f"f{j}" for j in range(WIDTH)])
    spec["window"] = STEPS
    config = NetConfig(
        "gru", (STEPS, WIDTH), len(SEQ_CLASSES), (), (8,), 0.0, False, "relu",
        input_scale=1.0, rnn_hidden_size=8,
    )  # fmt: skip
    onnx_file = export_net(config, root / "models" / "onnx" / "fp32.onnx", seed=3)
    meta_file = root / "data" / "meta.json"
    meta_file.parent.mkdir(parents=True)
    DatasetMeta(
        SEQ_CLASSES, (STEPS, WIDTH), "walks.npz", {"train": 30}, kind="sequence",
        feature_names=tuple(spec["features"]), preprocess=spec,
    ).save(meta_file)  # fmt: skip
    result = package(
        onnx_file,
        meta_file,
        tiny_settings("tiny-walks"),
        served_variant="fp32",
        staging_dir=root / "build" / "bento",
        artefacts_dir=root / "artefacts",
        metrics={"accuracy": 0.5},
        edge_onnx_file=onnx_file,
    )
    return Bento(root, onnx_file, spec, result)


@pytest.fixture(scope="module")
def table():
    bento = build_table_bento(Path(tempfile.mkdtemp(prefix="served-table-")))
    with (
        serving(bento.result.tag, bento.root, {"MODEL_DIR": ""}) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        yield bento, client


@pytest.fixture(scope="module")
def sequences():
    bento = build_sequence_bento(Path(tempfile.mkdtemp(prefix="served-sequence-")))
    with (
        serving(bento.result.tag, bento.root, {"MODEL_DIR": ""}) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        yield bento, client, server.url


def rows_of(frame) -> list[dict]:
    """JSON rows as a client sends them: NaN as null."""
    return [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        for row in frame[COLUMNS].to_dict(orient="records")
    ]


# -- the table regression bento --------------------------------------------------------------


def test_table_bento_ships_the_preprocessing_and_describes_the_model(table):
    import bentoml

    bento, _ = table
    stored = bentoml.bentos.get(bento.result.tag)
    labels = stored.info.labels
    assert labels["kind"] == "table" and labels["task"] == "regression"
    assert labels["target"] == "price" and labels["input_shape"] == "5"
    assert labels["r2"] == "0.5" and "num_classes" not in labels
    assert stored.info.entry_service == "TablePredictor"
    assert "Predicts price" in stored.doc
    src = Path(stored.path) / "src"
    shipped = src / "components" / "features.py"
    assert shipped.read_bytes() == Path(features.__file__).read_bytes()
    card = json.loads((src / "deploy" / "model" / "model.json").read_text())
    assert card["preprocess"] == bento.spec and card["kind"] == "table"
    assert card["class_names"] == [] and card["target"] == "price"
    assert "image_shape" not in card
    edge = bentoml.bentos.get(bento.result.edge.tag)
    assert edge.info.entry_service == "EdgeTablePredictor"
    assert (Path(edge.path) / "src" / "components" / "features.py").is_file()
    assert "always answered here" in edge.doc


def test_rows_get_the_values_onnx_gives_on_the_encoded_rows(table):
    bento, client = table
    frame = house_frame(6, seed=5)
    frame.loc[2, "rooms"] = np.nan
    rows = rows_of(frame)
    rows[1]["city"] = "atlantis"  # never seen: all zeros, like training's unseen categories
    rows[4]["size"] = int(rows[4]["size"])  # JSON integers are numbers too
    encoded = features.encode_records(rows, bento.spec)
    as_frame = frame.copy()
    as_frame.loc[1, "city"] = "atlantis"
    np.testing.assert_allclose(
        encoded[[0, 2, 3, 5]], features.encode_frame(as_frame, bento.spec)[[0, 2, 3, 5]], atol=1e-6
    )  # noqa: E501
    expected = run_onnx(bento.onnx_file, encoded)[:, 0]

    r = client.post("/predict_rows", json={"rows": rows[:MAX_BATCH]})
    assert r.status_code == 200, r.text
    answers = r.json()["predictions"]
    assert [set(a) for a in answers] == [{"value", "target", "model_version", "model"}] * 4
    assert all(a["target"] == "price" for a in answers)
    assert answers[0]["model_version"] == bento.result.model_version
    np.testing.assert_allclose([a["value"] for a in answers], expected[:MAX_BATCH], rtol=1e-5)
    for row, value in zip(rows[4:], expected[4:], strict=True):
        one = client.post("/predict_row", json={"row": row})
        assert one.status_code == 200, one.text
        assert one.json()["value"] == pytest.approx(float(value), rel=1e-5)


def test_missing_number_is_the_training_mean(table):
    bento, client = table
    row = {"size": None, "rooms": 2, "city": "east"}
    mean = next(c["mean"] for c in bento.spec["columns"] if c["name"] == "size")
    a = client.post("/predict_row", json={"row": row}).json()["value"]
    b = client.post("/predict_row", json={"row": {**row, "size": mean}}).json()["value"]
    assert a == pytest.approx(b, rel=1e-6)


def test_info_names_the_columns_and_the_preprocessing(table):
    bento, client = table
    info = client.post("/info").json()
    assert info["kind"] == "table" and info["task"] == "regression"
    assert info["columns"] == COLUMNS and info["preprocess"] == bento.spec
    assert info["target"] == "price" and info["class_names"] == []
    assert info["input_shape"] == [len(bento.spec["features"])]
    assert info["max_batch_size"] == MAX_BATCH and info["metrics"]["rmse"] == 12.0
    spec = client.get("/docs.json").json()
    assert {"/predict_row", "/predict_rows", "/info"} <= set(spec["paths"])
    assert "/predict" not in spec["paths"] and "/predict_image" not in spec["paths"]


GOOD_ROW = {"size": 80.0, "rooms": 3, "city": "north"}
BAD_ROWS = {
    "unknown column": (
        {"rows": [GOOD_ROW, {**GOOD_ROW, "colour": "red"}]},
        "rows[1] has unknown column(s) ['colour']",
    ),
    "missing column": ({"rows": [{"size": 1.0, "rooms": 2}]}, "rows[0] lacks column(s) ['city']"),
    "text for a number": (
        {"rows": [GOOD_ROW, GOOD_ROW, {**GOOD_ROW, "size": "big"}]},
        "rows[2], column 'size': expected a number, got 'big'",
    ),
    "boolean for a number": ({"rows": [{**GOOD_ROW, "rooms": True}]}, "column 'rooms'"),
    "object value": (
        {"rows": [{**GOOD_ROW, "city": {"name": "x"}}]},
        "rows[0], column 'city': must be a number, text, true/false or null, got an object",
    ),
    "row not an object": ({"rows": [GOOD_ROW, [1, 2, 3]]}, "rows[1]: must be an object"),
    "too many rows": ({"rows": [GOOD_ROW] * (MAX_BATCH + 1)}, "rows: at most 4 rows"),
    "no rows": ({"rows": []}, "rows: must hold at least 1 row"),
    "missing field": ({"row": GOOD_ROW}, "rows"),
}


@pytest.mark.parametrize("payload, message", BAD_ROWS.values(), ids=list(BAD_ROWS))
def test_bad_rows_are_a_400_naming_the_row_and_column(table, payload, message):
    _, client = table
    r = client.post("/predict_rows", json=payload)
    assert r.status_code == 400, r.text
    assert message in r.text


def test_bad_single_rows_and_non_finite_numbers_are_a_400(table):
    _, client = table
    r = client.post("/predict_row", json={"row": {**GOOD_ROW, "rooms": "3"}})
    assert r.status_code == 400 and "row, column 'rooms': expected a number" in r.text
    r = client.post("/predict_row", json={"row": [1, 2]})
    assert r.status_code == 400 and "row" in r.text
    body = '{"row": {"size": Infinity, "rooms": 1, "city": "east"}}'
    r = client.post("/predict_row", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "column 'size': inf is not finite" in r.text


def test_image_routes_on_a_table_bento_say_what_it_serves(table):
    _, client = table
    r = client.post("/predict", json={"image": [[0]]})
    assert r.status_code == 404
    error = r.json()["error"]
    assert "a table regression model predicting 'price'" in error and "/predict_rows" in error
    assert client.post("/forecast", json={"window": []}).status_code == 404


def test_oversized_table_body_is_a_413(table):
    _, client = table
    r = client.post("/predict_rows", json={"rows": [GOOD_ROW] * 20_000})
    assert r.status_code == 413 and "request body" in r.text


def test_table_edge_answers_regression_itself_without_asking_the_cloud(table, monkeypatch):
    from deploy.edge_service import EdgeTablePredictor

    bento, _ = table
    edge_name = bento.result.edge.tag.split(":")[0]
    monkeypatch.setenv("MODEL_DIR", str(bento.root / "build/bento" / edge_name / "deploy/model"))
    monkeypatch.setenv("CLOUD_URL", "http://127.0.0.1:9")  # never asked: nothing listens
    svc = EdgeTablePredictor.inner()
    rows = rows_of(house_frame(3, seed=8))
    expected = run_onnx(bento.onnx_file, features.encode_records(rows, bento.spec))[:, 0]

    async def ask():
        return await svc.predict_rows(rows=rows), await svc.predict_row(row={"size": 1})

    batch, refused = asyncio.run(ask())
    assert [p.answered_by for p in batch.predictions] == ["edge"] * 3
    np.testing.assert_allclose([p.value for p in batch.predictions], expected, rtol=1e-5)
    assert refused.status_code == 400 and b"row lacks column(s)" in refused.body
    info = svc.info()
    assert info.hybrid is False and info.confidence_threshold is None


# -- the sequence classification bento -------------------------------------------------------


def walks(n: int, seed: int = 0) -> np.ndarray:
    """Raw (not standardised) sequences (n, T, F)."""
    return np.random.default_rng(seed).normal(5, 2, (n, STEPS, WIDTH))


def expected_probabilities(bento: Bento, raw: np.ndarray) -> np.ndarray:
    names = [c["name"] for c in bento.spec["columns"]]
    records = [dict(zip(names, step, strict=True)) for step in raw.reshape(-1, WIDTH).tolist()]
    x = features.encode_records(records, bento.spec).reshape(len(raw), STEPS, -1)
    return softmax(run_onnx(bento.onnx_file, x).astype(np.float64))


def test_sequences_get_the_classes_onnx_gives_on_the_encoded_steps(sequences):
    bento, client, _ = sequences
    raw = walks(MAX_BATCH, seed=2)
    expected = expected_probabilities(bento, raw)
    r = client.post("/predict_sequences", json={"sequences": raw.tolist()})
    assert r.status_code == 200, r.text
    answers = r.json()["predictions"]
    for answer, probs in zip(answers, expected, strict=True):
        assert answer["label"] == SEQ_CLASSES[int(probs.argmax())]
        got = [answer["probabilities"][n] for n in SEQ_CLASSES]
        np.testing.assert_allclose(got, probs, atol=1e-5)
    # One window, its steps as objects of column -> value: the same answer.
    steps = [{f"f{j}": v for j, v in enumerate(step)} for step in raw[0].tolist()]
    one = client.post("/forecast", json={"window": steps})
    assert one.status_code == 200, one.text
    assert one.json()["probabilities"] == pytest.approx(answers[0]["probabilities"], abs=1e-6)
    info = client.post("/info").json()
    assert info["window"] == STEPS and info["columns"] == ["f0", "f1", "f2"]
    assert info["class_names"] == list(SEQ_CLASSES)


GOOD_WINDOW = walks(1)[0].tolist()
BAD_SEQUENCES = {
    "short window": (
        "/forecast", {"window": GOOD_WINDOW[:3]},
        "window: must hold exactly 5 steps (the window the model was trained on), got 3",
    ),
    "narrow step": ("/forecast", {"window": [[1.0, 2.0]] * STEPS}, "window[0]: a step holds 3"),
    "text": (
        "/predict_sequences", {"sequences": [GOOD_WINDOW, [[1, 2, "x"]] * STEPS]},
        "sequences[1][0], column 'f2': expected a number, got 'x'",
    ),
    "step not a list": ("/forecast", {"window": [1] * STEPS}, "window[0]: a step holds"),
    "unknown column": (
        "/forecast", {"window": [{"f0": 1, "f1": 2, "f2": 3, "f9": 0}] * STEPS},
        "window[0] has unknown column(s) ['f9']",
    ),
    "too many": (
        "/predict_sequences", {"sequences": [GOOD_WINDOW] * (MAX_BATCH + 1)},
        "sequences: at most 4 sequences",
    ),
    "not a sequence": ("/predict_sequences", {"sequences": [3]}, "sequences[0]: must be a list"),
}  # fmt: skip


@pytest.mark.parametrize("route, payload, message", BAD_SEQUENCES.values(), ids=list(BAD_SEQUENCES))
def test_bad_sequences_are_a_400_naming_the_step_and_rule(sequences, route, payload, message):
    _, client, _ = sequences
    r = client.post(route, json=payload)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_sequence_edge_hands_unsure_sequences_to_the_cloud(sequences, monkeypatch):
    """In process, with the served cloud bento as its cloud: the sequences the edge is unsure
    of are sent as the client sent them, and the cloud's answers come back marked so."""
    from deploy.edge_service import EdgeSequencePredictor

    bento, _, url = sequences
    raw = walks(MAX_BATCH, seed=9)
    confidence = expected_probabilities(bento, raw).max(axis=1)
    threshold = float(np.median(confidence))
    edge_name = bento.result.edge.tag.split(":")[0]
    monkeypatch.setenv("MODEL_DIR", str(bento.root / "build/bento" / edge_name / "deploy/model"))
    monkeypatch.setenv("CLOUD_URL", url)
    monkeypatch.setenv("EDGE_CONFIDENCE_THRESHOLD", str(threshold))
    svc = EdgeSequencePredictor.inner()

    async def ask():
        try:
            return await svc.predict_sequences(sequences=raw.tolist())
        finally:
            await svc._close_client()

    answers = asyncio.run(ask()).predictions
    sure = confidence >= threshold
    assert 0 < sure.sum() < len(raw)
    for answer, is_sure in zip(answers, sure, strict=True):
        assert answer.answered_by == ("edge" if is_sure else "cloud")
        assert answer.cloud_error is None
        version = bento.result.edge if is_sure else bento.result
        assert answer.model_version == version.model_version


# -- the encoding helpers, without a server --------------------------------------------------


def test_table_and_sequence_routes_answer_their_openapi_examples(table, sequences, tmp_path):
    """Each route's example on the OpenAPI page is a request the bento's model answers: a row
    of the table's own columns, windows of the sequence model's 5 steps x 3 features."""
    _, client = table
    assert set(try_every_openapi_example(client, tmp_path)) == {
        "/predict_row",
        "/predict_rows",
        "/info",
    }
    row = client.get("/docs.json").json()["paths"]["/predict_row"]["post"]["requestBody"]
    assert set(row["content"]["application/json"]["example"]["row"]) == set(COLUMNS)
    _, client, _ = sequences
    assert set(try_every_openapi_example(client, tmp_path)) == {
        "/forecast",
        "/predict_sequences",
        "/info",
    }
    window = client.get("/docs.json").json()["paths"]["/forecast"]["post"]["requestBody"]
    assert np.array(window["content"]["application/json"]["example"]["window"]).shape == (
        STEPS,
        WIDTH,
    )


def test_window_steps_as_lists_or_objects_encode_like_training():
    from deploy.sequence import encode_window

    frame = sequence_frame()
    spec = {**features.fit(frame, list(frame.columns)), "window": STEPS}
    window = frame.iloc[:STEPS]
    as_lists = encode_window(window.to_numpy().tolist(), spec, (STEPS, WIDTH))
    as_objects = encode_window(window.to_dict(orient="records"), spec, (STEPS, WIDTH))
    np.testing.assert_array_equal(as_lists, as_objects)
    np.testing.assert_allclose(as_lists[0], features.encode_frame(window, spec), atol=1e-6)
    assert as_lists.shape == (1, STEPS, WIDTH) and as_lists.dtype == np.float32


def test_a_card_of_another_kind_is_refused_at_start_up(table, monkeypatch):
    from deploy.service import ImageClassifier, SequencePredictor

    bento, _ = table
    name = bento.result.tag.split(":")[0]
    monkeypatch.setenv("MODEL_DIR", str(bento.root / "build/bento" / name / "deploy/model"))
    for service in (ImageClassifier, SequencePredictor):
        with pytest.raises(ValueError, match=r"describes a table model, but deploy\.service:"):
            service.inner()
