"""Shared fixtures: tiny data made in the test, the real params.yaml shrunk to fit it, a gate
project on disk, and one served cloud bento per test process.

The builders behind them live in tests/helpers.py (repositories, flows, servers),
tests/tiny_models.py (tiny ONNX classifiers and their bentos) and tests/gate_project.py.
"""

from __future__ import annotations

import copy
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# Before any library is imported: no telemetry, and tool state in a throw-away folder.
_STATE = Path(tempfile.mkdtemp(prefix="pipeline-tests-"))
os.environ.update(
    DO_NOT_TRACK="1",
    DVC_NO_ANALYTICS="1",
    BENTOML_DO_NOT_TRACK="True",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    GX_ANALYTICS_ENABLED="False",
)
# `make test` runs 3 test processes on 2 cores: torch (OpenMP) would give each of them, and every
# stage process they start, a thread per core, and two such processes side by side ran ~5x
# slower each than alone. One thread each (at least); a thread count set by the caller is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))
# Always a fresh store: tests must not build bentos into the project's own .bentoml.
os.environ["BENTOML_HOME"] = str(_STATE / "bentoml")
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")

from components.config import parse_params, read_params_file  # noqa: E402
from components.dataset import ArraySet  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# The files that take a minute or more, longest first (measured on the 2-core machine, alone).
# `make test` hands whole files to its processes (--dist loadfile) in collection order, and the
# run ends when the last file does: a long file that starts late decides it. So these are
# collected first; every other file, and the tests inside each file, keep their order.
SLOWEST_FIRST = (
    "test_pipeline_e2e.py",
    "test_tune.py",
    "test_orchestration.py",
    "test_pipeline_kinds.py",
    "test_compress.py",
    "test_train.py",
    "test_service_tabular.py",
    "test_bench.py",
    "test_service_hardening.py",
    "test_service_fuzz.py",
    "test_promote.py",
    "test_ensemble.py",
    "test_model_stages.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort


TINY_CLASSES = ("circle", "square", "cross")

# The repository's own params.yaml, shrunk: tiny network, 3 epochs, CPU, one process.
TINY_OVERRIDES = {
    "ingest": {"test_fraction": 0.25, "val_fraction": 0.25},
    "validate": {"min_rows_per_class": 3},
    "train": {
        "max_epochs": 3,
        "batch_size": 16,
        "learning_rate": 0.01,
        "channels": [4, 8],
        "hidden_units": [16],
        "dropout": 0.0,
        "accelerator": "cpu",
        "devices": 1,
    },
    "evaluate": {"min_accuracy": 0.5, "min_macro_f1": 0.4, "min_class_recall": 0.3},
    "compress": {"calibration_samples": 16, "max_accuracy_drop": 0.2},
}


def make_images(per_class: int = 20, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale images whose class is a bright pattern at a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label in range(len(TINY_CLASSES)):
        for _ in range(per_class):
            img = rng.integers(0, 60, (size, size))
            if label == 0:
                img[: size // 2, : size // 2] += 180
            elif label == 1:
                img[size // 2 :, size // 2 :] += 180
            else:
                img[:, size // 2 - 1 : size // 2 + 1] += 180
            xs.append(np.clip(img, 0, 255))
            ys.append(label)
    return np.stack(xs).astype(np.uint8), np.array(ys, dtype=np.int64)


def tiny_params_dict(root: Path, source: str) -> dict:
    raw = copy.deepcopy(read_params_file(REPO_ROOT / "params.yaml"))
    for section, values in TINY_OVERRIDES.items():
        raw[section].update(values)
    raw["ingest"]["source"] = source
    raw["paths"] = {k: str(root / v) for k, v in raw["paths"].items()}
    return raw


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    x, y = make_images()
    path = tmp_path / "data" / "external" / "tiny.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, x=x, y=y, class_names=np.array(TINY_CLASSES))
    return path


@pytest.fixture
def tiny_params(tmp_path: Path, tiny_npz: Path):
    return parse_params(tiny_params_dict(tmp_path, str(tiny_npz)))


@pytest.fixture
def tiny_images() -> ArraySet:
    x, y = make_images()
    return ArraySet(x[:, None], y)


def make_table(n: int = 90, seed: int = 0):
    """A small table: two numbers, a text category, a class target and a numeric target.

    ``kind`` (the class) follows from ``x1 + x2`` and the colour; ``price`` is linear in them.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(0, 1, n), rng.normal(5, 2, n)
    color = rng.choice(["red", "green", "blue"], n)
    bonus = np.select([color == "red", color == "green"], [1.5, -1.5], 0.0)
    score = x1 + (x2 - 5) / 2 + bonus
    kind = np.where(score > 0.7, "high", np.where(score < -0.7, "low", "mid"))
    price = 10 + 3 * x1 + 2 * x2 + 4 * bonus + rng.normal(0, 0.1, n)
    return pd.DataFrame({"x1": x1, "x2": x2, "color": color, "kind": kind, "price": price})


def make_series(n: int = 240, seed: int = 0):
    """A noisy daily cycle (``load``) with a leading indicator (``temp``) and a date column."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return pd.DataFrame(
        {
            "date": pd.date_range("2026-01-01", periods=n, freq="h").astype(str),
            "load": 50 + 10 * np.sin(t / 6) + rng.normal(0, 0.3, n),
            "temp": np.cos(t / 6),
        }
    )


# Tables and sequences on top of TINY_OVERRIDES: an MLP or GRU, and no image-only settings.
TABLE_OVERRIDES = {
    "ingest": {"kind": "table"},
    "train": {"model": "mlp", "hidden_units": [16], "max_epochs": 5, "learning_rate": 0.02},
    "evaluate": {"min_r2": 0.0},
}
SERIES_OVERRIDES = {
    "ingest": {"kind": "sequence", "target": "load", "window": 8, "horizon": 1},
    "train": {"model": "gru", "rnn_hidden_size": 8, "hidden_units": [], "max_epochs": 5,
              "learning_rate": 0.02},
    "evaluate": {"min_r2": -10.0},
}  # fmt: skip


def params_with(root: Path, source: str, *overrides: dict) -> dict:
    """tiny_params_dict plus section overrides (later ones win)."""
    raw = tiny_params_dict(root, source)
    for extra in overrides:
        for section, values in extra.items():
            raw[section].update(values)
    return raw


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root (the cwd) with a test split labelled by the good model; its Params."""
    from tests.gate_project import GOOD_SEED, labelled_split, project_params, write_test_split
    from tests.tiny_models import make_tiny_onnx

    monkeypatch.chdir(tmp_path)
    params = project_params(tmp_path)
    good = make_tiny_onnx(tmp_path / "reference" / "good.onnx", GOOD_SEED)
    write_test_split(params, labelled_split(good))
    return params


@dataclass(frozen=True)
class Served:
    url: str
    onnx_file: Path  # the model it serves, for in-process comparison
    result: object  # the PackageResult
    root: Path
    log: Path  # the server's stdout and stderr


@pytest.fixture(scope="session")
def cloud() -> Served:
    """The cloud bento of a tiny model, served from its archive in a fresh BENTOML_HOME, the way
    another machine would: nothing but the archive, a new store, a folder without our code.

    One per test process (a start costs seconds, a request milliseconds), shared by every
    module that asks for it; no test may stop or change it.
    """
    from tests.helpers import BENTOML, serving
    from tests.tiny_models import package_tiny

    root = Path(tempfile.mkdtemp(prefix="served-cloud-"))
    result = package_tiny(root, seed=7, name="tiny-served")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = {"BENTOML_HOME": str(root / "fresh-bentoml-home"), "MODEL_DIR": ""}
    subprocess.run(
        [*BENTOML, "import", str(result.archive)],
        cwd=elsewhere,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )
    with serving(result.tag, elsewhere, env) as server:
        yield Served(server.url, root / "models" / "onnx" / "int8.onnx", result, root, server.log)


@pytest.fixture(scope="session")
def prefect_database(tmp_path_factory) -> Path:
    """A migrated, empty Prefect database, made once per `make test` and copied by every
    server the tests start (the test processes share the session's base folder)."""
    from tests.helpers import migrated_prefect_database

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return migrated_prefect_database(shared / "prefect-database")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, prefect_database) -> str:
    """One Prefect server per test process (loopback, its own SQLite); its API URL. It records
    flow and task runs; the services for schedules, workers and automations are off (the
    orchestration tests start a server with every service)."""
    from tests.helpers import RECORDING_ONLY, serving_prefect

    root = tmp_path_factory.mktemp("prefect-server")
    with serving_prefect(root, dict(os.environ), database=prefect_database,
                         services=RECORDING_ONLY) as url:  # fmt: skip
        yield url


@pytest.fixture(scope="module")
def prefect_api(prefect_server: str) -> str:
    """For a module that runs flows in subprocesses (``pytestmark =
    pytest.mark.usefixtures("prefect_api")``): PREFECT_API_URL names the session's server while
    the module runs, so a flow run does not start its own temporary server and wait for it
    (10-25 s each on a busy 2-core machine; a run against a server costs under 2 s)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_API_URL", prefect_server)
        yield prefect_server
