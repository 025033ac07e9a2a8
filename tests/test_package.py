"""The package stage builds a real bento (in the tests' throw-away BENTOML_HOME) and exports it.

The model is a tiny ONNX classifier made in the test (tests/tiny_models.py: x/255 -> flatten ->
linear, 3 classes of 1x8x8 images), so these tests need no trained model.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from components.config import parse_params
from components.dataset import DatasetMeta
from components.package import (
    CLOUD,
    DEPLOY_DIR,
    EDGE,
    SERVING_FILES,
    PackageResult,
    content_version,
    dependency_closure,
    package,
    pinned_requirements,
    run,
    summarise_metrics,
)
from components.stage import StageError
from tests.tiny_models import (
    CLASS_NAMES,
    IMAGE_SHAPE,
    make_tiny_onnx,
    package_tiny,
    tiny_settings,
    write_meta,
)

TAG_RE = re.compile(r"^[a-z0-9-]+:r[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, PackageResult]:
    root = tmp_path_factory.mktemp("package")
    return root, package_tiny(root, with_edge=True)


def test_package_builds_a_versioned_bento_into_the_store(built):
    import bentoml

    root, result = built
    assert TAG_RE.match(result.tag), result.tag
    assert result.tag.startswith("tiny-classifier:")
    assert not result.reused
    bento = bentoml.bentos.get(result.tag)
    assert bento.info.labels["served_variant"] == "int8"
    assert bento.info.labels["accuracy"] == "0.75"
    assert bento.info.labels["role"] == "cloud"
    src = Path(bento.path) / "src" / "deploy"
    files = sorted(p.name for p in src.glob("*.py"))
    assert files == sorted(["__init__.py", "service.py", *SERVING_FILES])
    for name in ("service.py", *SERVING_FILES):
        assert (src / name).read_bytes() == (DEPLOY_DIR / name).read_bytes()
    card = json.loads((src / "model" / "model.json").read_text())
    assert card["class_names"] == list(CLASS_NAMES)
    assert card["image_shape"] == list(IMAGE_SHAPE)
    assert card["max_batch_size"] == 4
    assert card["max_latency_ms"] == 10000 and card["max_image_bytes"] == 4096
    assert "edge" not in card
    assert card["model_version"] == result.model_version == result.tag.split(":")[1]
    assert re.fullmatch(r"tiny:int8-[0-9a-f]{12}", card["model"])
    assert card["metrics"] == {"accuracy": 0.75}
    assert (src / "model" / "model.onnx").stat().st_size == result.model_bytes
    assert not list(Path(bento.path).rglob("__pycache__"))
    assert card["kind"] == "image" and card["task"] == "classification"
    assert card["input_shape"] == list(IMAGE_SHAPE) and "preprocess" not in card
    # The preprocessing of tables and sequences ships in every bento, as the repo has it.
    shipped = Path(bento.path) / "src" / "components" / "features.py"
    assert shipped.read_bytes() == (DEPLOY_DIR.parent / "components" / "features.py").read_bytes()
    requirements = (Path(bento.path) / "env" / "python" / "requirements.txt").read_text()
    for pkg in ("onnxruntime==", "numpy==", "bentoml==", "pillow==", "starlette=="):
        assert pkg in requirements


def test_package_exports_an_archive_and_bento_json(built):
    root, result = built
    expected = (root / "artefacts").resolve() / f"{result.tag.replace(':', '-')}.bento"
    assert result.archive == expected
    with tarfile.open(result.archive) as tar:
        names = tar.getnames()
    assert any(n.endswith("src/deploy/model/model.onnx") for n in names)
    assert any(n.endswith("bento.yaml") for n in names)
    info = json.loads((root / "artefacts" / "bento.json").read_text())
    assert info["tag"] == result.tag
    assert info["archive"] == str(result.archive)
    assert info["served_variant"] == "int8"
    assert info["model_bytes"] == result.model_bytes
    assert info["archive_bytes"] == result.archive.stat().st_size == result.archive_bytes
    assert info["packages_bytes"] == result.packages_bytes > 10_000_000
    edge = info["edge"]
    assert edge["tag"] == result.edge.tag and edge["tag"].startswith("tiny-classifier-edge:")
    assert edge["archive_bytes"] == Path(edge["archive"]).stat().st_size
    assert edge["served_variant"] == "int8" and edge["cloud_url"] is None
    # The edge bento is the cloud one minus Pillow: smaller to install.
    assert edge["packages_bytes"] < info["packages_bytes"]


def test_rerun_gives_the_same_tag_and_reuses_the_bento(built):
    root, first = built
    again = package_tiny(root, with_edge=True)
    assert again.tag == first.tag and again.edge.tag == first.edge.tag
    assert again.reused and again.edge.reused
    assert again.archive.is_file()
    # Each bento keeps its own archive: the cloud's clean-up must not take the edge's.
    assert sorted(p.name for p in (root / "artefacts").glob("*.bento")) == sorted(
        [again.archive.name, again.edge.archive.name]
    )


def test_edge_bento_is_lean_and_carries_its_hybrid_settings(built):
    import bentoml

    _, result = built
    bento = bentoml.bentos.get(result.edge.tag)
    assert bento.info.labels["role"] == "edge"
    assert bento.info.entry_service == "EdgeImageClassifier"
    src = Path(bento.path) / "src" / "deploy"
    # The cloud's service module (and what only it needs, Pillow) stays out.
    assert sorted(p.name for p in src.glob("*.py")) == sorted(
        ["__init__.py", "edge_service.py", *SERVING_FILES]
    )
    card = json.loads((src / "model" / "model.json").read_text())
    assert card["served_variant"] == "int8"
    assert card["edge"] == {
        "confidence_threshold": 0.9,
        "cloud_url": None,
        "cloud_timeout_s": 2.0,
        "cloud_retry_s": 10.0,
    }
    requirements = (Path(bento.path) / "env" / "python" / "requirements.txt").read_text()
    names = {re.split(r"[=<>@ ]", line)[0].lower() for line in requirements.split()}
    assert {"bentoml", "onnxruntime", "numpy"} <= names
    assert not names & {"torch", "lightning", "prefect", "pillow", "dvc", "onnx"}


def test_every_requirement_is_pinned_and_ready_to_containerize(built):
    import bentoml

    _, result = built
    for tag in (result.tag, result.edge.tag):
        env = Path(bentoml.bentos.get(tag).path) / "env"
        lines = (env / "python" / "requirements.txt").read_text().split()
        assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[^=\s]+", line) for line in lines)
        assert len(lines) == len({line.split("==")[0].lower() for line in lines})  # no repeats
        # What `bentoml containerize` builds from (Docker itself is not available here).
        dockerfile = (env / "docker" / "Dockerfile").read_text()
        assert "FROM python:3.11-slim" in dockerfile
        assert "requirements.txt" in dockerfile


def test_the_packages_size_is_what_their_wheels_record(tmp_path, monkeypatch):
    """bento.json's packages_bytes is the same wherever the same wheels are installed: the
    files' recorded sizes, without the bytecode (no size in RECORD, and its size depends on
    what was imported) or the console scripts (each names its own interpreter)."""
    import sys

    from components.bento_build import installed_bytes

    info = tmp_path / "tiny_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-pkg\nVersion: 1.0\n")
    (tmp_path / "tiny_pkg").mkdir()
    (tmp_path / "tiny_pkg" / "__init__.py").write_text("x = 1\n" * 10)  # 60 bytes
    (tmp_path / "tiny_pkg" / "__pycache__").mkdir()
    (tmp_path / "tiny_pkg" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"0" * 999)
    (info / "RECORD").write_text(
        "tiny_pkg/__init__.py,sha256=x,60\n"
        "tiny_pkg/__pycache__/__init__.cpython-311.pyc,,\n"
        "../../../bin/tiny,sha256=y,217\n"
        "tiny_pkg-1.0.dist-info/METADATA,sha256=z,55\n"
        "tiny_pkg-1.0.dist-info/RECORD,,\n"
    )
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert installed_bytes(("tiny-pkg",)) == 60 + 55


def test_dependency_closure_follows_requirements_and_skips_extras():
    closure = dependency_closure(("httpx",))
    assert {"httpx", "httpcore", "anyio", "idna", "certifi"} <= set(closure)
    assert "h2" not in closure  # httpx[http2] only
    pins = pinned_requirements(CLOUD.packages)
    assert not any(p.lower().startswith("bentoml==") for p in pins)  # bentoml adds its own
    assert {p.split("==")[0].lower() for p in pinned_requirements(EDGE.packages)} < {
        p.split("==")[0].lower() for p in pins
    }


def test_missing_runtime_package_is_a_clear_stage_error():
    with pytest.raises(StageError, match=r"'no-such-package' is not installed"):
        dependency_closure(("no-such-package",))


def test_a_different_model_gives_a_new_tag_and_replaces_the_archive(tmp_path):
    first = package_tiny(tmp_path, name="tiny-other")
    make_tiny_onnx(tmp_path / "models" / "onnx" / "int8.onnx", seed=1)
    second = package_tiny(tmp_path, name="tiny-other")
    assert second.tag != first.tag
    assert not second.reused
    assert [p.name for p in (tmp_path / "artefacts").glob("*.bento")] == [second.archive.name]


def test_a_tampered_store_entry_is_rebuilt(tmp_path):
    import bentoml

    first = package_tiny(tmp_path, name="tiny-tamper")
    stored = Path(bentoml.bentos.get(first.tag).path) / "src" / "deploy" / "model" / "model.onnx"
    stored.write_bytes(b"garbage")
    again = package_tiny(tmp_path, name="tiny-tamper")
    assert again.tag == first.tag and not again.reused
    stored = Path(bentoml.bentos.get(first.tag).path) / "src" / "deploy" / "model" / "model.onnx"
    assert stored.read_bytes() == (tmp_path / "models" / "onnx" / "int8.onnx").read_bytes()


def test_the_archive_imports_back(tmp_path):
    import bentoml

    result = package_tiny(tmp_path, seed=2, name="tiny-roundtrip")
    bentoml.bentos.delete(result.tag)
    bentoml.bentos.import_bento(str(result.archive))
    assert str(bentoml.bentos.get(result.tag).tag) == result.tag


def test_a_rebuilt_bento_exports_the_same_archive_bytes(tmp_path):
    """Built again from nothing (a fresh build: a new creation time, new file times), the same
    bento exports the same archive bytes; imported, it takes the import's time."""
    import datetime

    import bentoml

    first = package_tiny(tmp_path, seed=3, name="tiny-repro")
    before = first.archive.read_bytes()
    bentoml.bentos.delete(first.tag)
    again = package_tiny(tmp_path, seed=3, name="tiny-repro")
    assert again.tag == first.tag and not again.reused  # built again, not found in the store
    assert again.archive.read_bytes() == before
    with tarfile.open(again.archive) as tar:
        members = tar.getmembers()
        assert b"creation_time" not in tar.extractfile("./bento.yaml").read()
    assert {(m.mtime, m.uid, m.gid) for m in members} == {(315532800, 0, 0)}
    assert [m.name for m in members] == sorted(
        (m.name for m in members), key=lambda n: n.split("/")
    )
    bentoml.bentos.delete(first.tag)
    started = datetime.datetime.now(datetime.UTC)
    bentoml.bentos.import_bento(str(again.archive))
    assert bentoml.bentos.get(first.tag).info.creation_time >= started - datetime.timedelta(
        seconds=1
    )


def test_version_is_a_content_hash(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    v1 = content_version(tmp_path, {"k": 1})
    assert v1 == content_version(tmp_path, {"k": 1})
    assert v1 != content_version(tmp_path, {"k": 2})
    (tmp_path / "a.txt").write_text("y")
    assert v1 != content_version(tmp_path, {"k": 1})
    assert re.fullmatch(r"r[0-9a-f]{12}", v1)


def test_missing_model_is_a_clear_stage_error(tmp_path):
    write_meta(tmp_path / "data" / "meta.json")
    with pytest.raises(StageError, match=r"int8\.onnx not found: run the compress stage"):
        package(
            tmp_path / "nope" / "int8.onnx",
            tmp_path / "data" / "meta.json",
            tiny_settings("tiny"),
            served_variant="int8",
            staging_dir=tmp_path / "staging",
            artefacts_dir=tmp_path / "artefacts",
        )
    assert not (tmp_path / "artefacts").exists()


def test_missing_meta_is_a_clear_stage_error(tmp_path):
    onnx_file = make_tiny_onnx(tmp_path / "int8.onnx")
    with pytest.raises(StageError, match=r"meta\.json"):
        package(
            onnx_file,
            tmp_path / "missing" / "meta.json",
            tiny_settings("tiny"),
            served_variant="int8",
            staging_dir=tmp_path / "staging",
            artefacts_dir=tmp_path / "artefacts",
        )


def test_model_that_does_not_fit_the_classes_is_refused(tmp_path):
    onnx_file = make_tiny_onnx(tmp_path / "int8.onnx", n_classes=2)
    meta_file = write_meta(tmp_path / "meta.json")
    with pytest.raises(StageError, match=r"3 classes"):
        package(
            onnx_file,
            meta_file,
            tiny_settings("tiny"),
            served_variant="int8",
            staging_dir=tmp_path / "staging",
            artefacts_dir=tmp_path / "artefacts",
        )


def make_table_onnx(path: Path, n_features: int, n_outputs: int = 1) -> Path:
    """A linear model on encoded table rows ("inputs" (batch, F) -> (batch, n_outputs))."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.linspace(-1, 1, n_features * n_outputs, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["inputs", "weight", "bias"], ["logits"])],
        "tiny_table",
        [helper.make_tensor_value_info("inputs", TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_outputs])],
        initializer=[
            numpy_helper.from_array(weight.reshape(n_features, n_outputs), "weight"),
            numpy_helper.from_array(np.full(n_outputs, 100.0, np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


TABLE_SPEC = {
    "version": 1,
    "columns": [
        {"name": "size", "type": "numeric", "mean": 80.0, "std": 20.0},
        {"name": "city", "type": "categorical", "categories": ["east", "north"]},
    ],
    "features": ["size", "city=east", "city=north"],
}


def write_table_meta(path: Path, preprocess=TABLE_SPEC, **changes) -> Path:
    values = dict(
        class_names=(), input_shape=(3,), source="houses.csv", split_sizes={"train": 9},
        kind="table", task="regression", target="price",
        feature_names=("size", "city=east", "city=north"), preprocess=preprocess,
    ) | changes  # fmt: skip
    DatasetMeta(**values).save(path)
    return path


def _package_table(tmp_path: Path, onnx_file: Path, meta_file: Path):
    return package(
        onnx_file,
        meta_file,
        tiny_settings("tiny-table"),
        served_variant="fp32",
        staging_dir=tmp_path / "staging",
        artefacts_dir=tmp_path / "artefacts",
    )


def test_table_regression_bento_carries_the_preprocessing(tmp_path):
    import bentoml

    onnx_file = make_table_onnx(tmp_path / "fp32.onnx", 3)
    result = _package_table(tmp_path, onnx_file, write_table_meta(tmp_path / "meta.json"))
    bento = bentoml.bentos.get(result.tag)
    assert bento.info.entry_service == "TablePredictor"
    assert bento.info.labels["kind"] == "table" and bento.info.labels["target"] == "price"
    card = json.loads((Path(bento.path) / "src/deploy/model/model.json").read_text())
    assert card["preprocess"] == TABLE_SPEC and card["task"] == "regression"
    assert card["feature_names"] == TABLE_SPEC["features"] and card["input_shape"] == [3]
    assert "/predict_rows" in bento.doc and "Predicts price" in bento.doc


@pytest.mark.parametrize(
    "outputs, meta, message",
    [
        (3, {}, r"a regression model answers one value each, \(2, 1\)"),
        (1, {"preprocess": None}, r"a table model needs its preprocess spec"),
        (1, {"input_shape": (4,)}, r"encodes 3 features but the model takes 4"),
        (1, {"class_names": ("a", "b")}, r"a regression data set has no class_names"),
        (1, {"kind": "sequence", "input_shape": (2, 3)}, r"window is 7 steps"),
    ],
    ids=["regression-outputs", "no-spec", "spec-width", "regression-classes", "window"],
)
def test_table_and_sequence_models_that_do_not_fit_are_refused(tmp_path, outputs, meta, message):
    onnx_file = make_table_onnx(tmp_path / "fp32.onnx", 3, outputs)
    if meta.get("kind") == "sequence":
        meta["preprocess"] = {**TABLE_SPEC, "window": 7}
    meta_file = write_table_meta(tmp_path / "meta.json", **meta)
    with pytest.raises(StageError, match=message):
        _package_table(tmp_path, onnx_file, meta_file)
    assert not (tmp_path / "artefacts").exists()


def test_broken_model_file_is_refused(tmp_path):
    onnx_file = tmp_path / "int8.onnx"
    onnx_file.write_bytes(b"not an onnx model")
    meta_file = write_meta(tmp_path / "meta.json")
    with pytest.raises(StageError, match=r"not a loadable ONNX model"):
        package(
            onnx_file,
            meta_file,
            tiny_settings("tiny"),
            served_variant="int8",
            staging_dir=tmp_path / "staging",
            artefacts_dir=tmp_path / "artefacts",
        )


def test_summarise_metrics_prefers_the_served_variant():
    evaluate = {"accuracy": 0.9, "macro_f1": 0.89, "per_class": {}, "passed": True}
    compress = {"variants": {"int8": {"accuracy": 0.91, "size_bytes": 10}, "fp32": {}}}
    assert summarise_metrics(evaluate, compress, "int8") == {
        "accuracy": 0.91,
        "macro_f1": 0.89,
        "pytorch_accuracy": 0.9,
        "pytorch_macro_f1": 0.89,
    }
    assert summarise_metrics(None, None, "int8") == {}
    # Regression: R^2, RMSE, MAE, read defensively (a missing or odd value is left out).
    evaluate = {"r2": 0.8, "rmse": 2.0, "mae": 1.5, "n": 10, "passed": True}
    compress = {"variants": {"int8": {"r2": 0.79, "rmse": "x", "r2_drop": 0.01}}}
    assert summarise_metrics(evaluate, compress, "int8") == {
        "mae": 1.5,
        "pytorch_mae": 1.5,
        "pytorch_r2": 0.8,
        "pytorch_rmse": 2.0,
        "r2": 0.79,
        "rmse": 2.0,
    }
    assert summarise_metrics({"r2": 0.8}, {"variants": ["odd"]}, "int8") == {
        "pytorch_r2": 0.8,
        "r2": 0.8,
    }
    assert summarise_metrics(None, {"variants": {"int8": {"accuracy": True}}}, "int8") == {}


def test_run_uses_params_paths_and_metrics(tmp_path, monkeypatch):
    from tests.conftest import tiny_params_dict

    monkeypatch.chdir(tmp_path)  # run() stages under ./build/bento
    params = parse_params(tiny_params_dict(tmp_path, "unused"))
    paths = params.paths
    variant = "int8"
    make_tiny_onnx(Path(paths.model_dir) / "onnx" / f"{variant}.onnx")
    write_meta(Path(paths.prepared_dir) / "meta.json")
    Path(paths.metrics_dir).mkdir(parents=True)
    figures = {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    (Path(paths.metrics_dir) / "evaluate.json").write_text(
        json.dumps(
            {"format": 3, "task": "classification", "test_examples": 6, "accuracy": 0.5,
             "macro_f1": 0.4, "min_class_recall": 0.5,
             "per_class": {c: figures for c in CLASS_NAMES}}
        )
    )  # fmt: skip
    onnx_bytes = (Path(paths.model_dir) / "onnx" / f"{variant}.onnx").stat().st_size
    (Path(paths.metrics_dir) / "compress.json").write_text(
        json.dumps(
            {"variants": {variant: {"accuracy": 0.625, "macro_f1": 0.5, "size_bytes": onnx_bytes}},
             "served_variant": variant}
        )
    )  # fmt: skip

    result = run(params)

    assert result.tag.startswith(params.package.bento_name + ":")
    assert result.served_variant == variant
    info = json.loads((Path(paths.artefacts_dir) / "bento.json").read_text())
    assert info["metrics"] == {
        "accuracy": 0.625, "macro_f1": 0.5, "pytorch_accuracy": 0.5, "pytorch_macro_f1": 0.4,
    }  # fmt: skip
    assert (tmp_path / "build" / "bento" / params.package.bento_name / "deploy").is_dir()


def test_run_with_broken_metrics_file_fails_clearly(tmp_path, monkeypatch):
    from tests.conftest import tiny_params_dict

    monkeypatch.chdir(tmp_path)
    params = parse_params(tiny_params_dict(tmp_path, "unused"))
    Path(params.paths.metrics_dir).mkdir(parents=True)
    (Path(params.paths.metrics_dir) / "evaluate.json").write_text("{not json")
    with pytest.raises(StageError, match=r"evaluate\.json is not valid JSON"):
        run(params)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"edge": {"confidence_threshold": 1.5}}, "edge.confidence_threshold"),
        ({"edge": {"cloud_url": "ftp://x"}}, "edge.cloud_url"),
        ({"edge": {"bento_name": "digits-classifier"}}, "edge.bento_name must differ"),
        ({"max_latency_ms": 0}, "max_latency_ms"),
        ({"max_request_bytes": 10}, "max_request_bytes"),
    ],
    ids=["threshold", "cloud-url", "same-name", "latency", "request-bytes"],
)
def test_bad_package_settings_are_named(changes, fragment):
    from components.config import ParamsError, parse_params, read_params_file
    from tests.conftest import REPO_ROOT

    raw = read_params_file(REPO_ROOT / "params.yaml")
    for key, value in changes.items():
        if isinstance(value, dict):
            raw["package"][key].update(value)
        else:
            raw["package"][key] = value
    with pytest.raises(ParamsError, match=re.escape(fragment)):
        parse_params(raw)
    assert tiny_settings(edge={"cloud_url": "http://10.0.0.5:3000"}).edge.cloud_url
