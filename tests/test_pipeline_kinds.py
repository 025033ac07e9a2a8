"""End to end for a table: the real Prefect flow over the real DVC stages on a CSV with a text
column and a numeric target (regression), ending in a bento that `bentoml serve` runs and that
answers JSON rows over HTTP with the transform fitted at ingest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from components.config import apply_overrides
from tests.conftest import REPO_ROOT, TABLE_OVERRIDES, TINY_OVERRIDES, make_table
from tests.test_pipeline_e2e import PROJECT_FILES, _flatten, _free_port, _run_flow

pytestmark = pytest.mark.slow

# One compressed variant is enough here: the variants themselves are tests/test_compress.py's.
VARIANTS = {"int8": ["quantize_static"], "int8_dynamic": ["quantize_dynamic"]}
TARGET = "price"


@pytest.fixture(scope="module")
def table_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("table-repo")
    for name in PROJECT_FILES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root / name)
    (root / "deploy" / "champion.json").unlink(missing_ok=True)
    (root / "data" / "external").mkdir(parents=True)
    make_table(n=240).to_csv(root / "data" / "external" / "houses.csv", index=False)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    shutil.copy(REPO_ROOT / ".dvc" / "config", root / ".dvc" / "config")
    remote = tmp_path_factory.mktemp("dvc-remote")
    (root / ".dvc" / "config.local").write_text(f"['remote \"local\"']\n    url = {remote}\n")
    overrides = [
        *_flatten(TINY_OVERRIDES),
        *_flatten(TABLE_OVERRIDES),
        "compress.calibration_samples=32",
        "ingest.source=data/external/houses.csv",
        f"ingest.target={TARGET}",
        "ingest.features=[x1, x2, color]",
        "train.max_epochs=30",
        "train.hidden_units=[32]",
        "train.learning_rate=0.01",
        "evaluate.min_r2=0.8",
    ]
    apply_overrides(overrides, root / "params.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["compress"]["variants"] = VARIANTS  # a whole mapping: not a --set override
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def table_run(table_repo: Path) -> subprocess.CompletedProcess:
    result = _run_flow(table_repo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_a_table_regression_runs_through_every_stage(table_repo, table_run):
    out = table_run.stdout + table_run.stderr
    assert "ingest ran, validate ran, train ran, evaluate ran, compress ran, gate ran" in out
    assert "test metrics: r2 " in out
    evaluation = json.loads((table_repo / "metrics" / "evaluate.json").read_text())
    assert evaluation["task"] == "regression" and evaluation["r2"] >= 0.8
    meta = json.loads((table_repo / "data" / "prepared" / "meta.json").read_text())
    assert meta["kind"] == "table" and meta["target"] == TARGET
    report = (table_repo / "reports" / "report.html").read_text()
    assert "R^2" in report or "R²" in report


def test_the_table_bento_applies_the_fitted_transform_to_json_rows(table_repo, table_run):
    bento = json.loads((table_repo / "artefacts" / "bento.json").read_text())
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", bento["tag"], "--host", "127.0.0.1",
         "--port", str(port)],
        cwd=table_repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, server)
        fresh = make_table(n=30, seed=5)  # rows the model never saw
        rows = fresh.drop(columns=["kind", TARGET]).to_dict(orient="records")
        reply = httpx.post(f"{base}/predict_rows", json={"rows": rows}, timeout=20)
        assert reply.status_code == 200, reply.text
        values = np.array([answer["value"] for answer in reply.json()["predictions"]])
        truth = fresh[TARGET].to_numpy()
        r2 = 1 - ((truth - values) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()
        assert r2 > 0.8, f"served predictions explain only R^2 {r2:.3f} of fresh rows"

        bad = httpx.post(f"{base}/predict_rows", json={"rows": [{"x1": 1.0}]}, timeout=10)
        assert 400 <= bad.status_code < 500 and "x2" in bad.text
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_ready(base: str, server: subprocess.Popen, seconds: float = 90) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert server.poll() is None, "bentoml serve exited early"
        time.sleep(0.5)
    pytest.fail(f"bentoml serve did not become ready in {seconds:.0f} s")


def test_new_rows_refit_the_transform_and_the_champion_is_measured_its_own_way(
    table_repo, table_run
):
    """The nightly case: the data changed, so the transform is fitted again and the champion's
    features differ from the challenger's; the champion is measured on the new test rows
    encoded with its own fit, not waved through as not comparable."""
    source = table_repo / "data" / "external" / "houses.csv"
    make_table(n=300, seed=11).to_csv(source, index=False)
    result = _run_flow(table_repo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    gate = json.loads((table_repo / "metrics" / "gate.json").read_text())
    champion = gate["champion"]
    assert champion["source"] == "re-evaluated", champion
    assert "its own fitted preprocessing" in champion["note"]
    assert champion["metrics"]["r2"] > 0.8  # the champion still predicts well on new rows
