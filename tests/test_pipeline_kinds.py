"""End to end for a table: the real Prefect flow over the real DVC stages on a CSV with a text
column and a numeric target (regression), ending in a bento that `bentoml serve` runs and that
answers JSON rows over HTTP with the transform fitted at ingest."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import TABLE_OVERRIDES, TINY_OVERRIDES, make_table
from tests.helpers import flatten, only_variants, project_repo, run_flow, serving

# The session's Prefect server: the flow run does not wait for a temporary one of its own.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

TARGET = "price"


@pytest.fixture(scope="module")
def table_repo(tmp_path_factory) -> Path:
    overrides = [
        *flatten(TINY_OVERRIDES),
        *flatten(TABLE_OVERRIDES),
        "compress.calibration_samples=32",
        "ingest.source=data/external/houses.csv",
        f"ingest.target={TARGET}",
        "ingest.features=[x1, x2, color]",
        "train.max_epochs=30",
        "train.hidden_units=[32]",
        "train.learning_rate=0.01",
        "evaluate.min_r2=0.8",
    ]
    return project_repo(
        tmp_path_factory.mktemp("table-repo"),
        tmp_path_factory.mktemp("dvc-remote"),
        lambda external: make_table(n=240).to_csv(external / "houses.csv", index=False),
        overrides,
        only_variants,
    )


@pytest.fixture(scope="module")
def table_run(table_repo: Path) -> subprocess.CompletedProcess:
    result = run_flow(table_repo)
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
    with serving(bento["tag"], table_repo) as server:
        fresh = make_table(n=30, seed=5)  # rows the model never saw
        rows = fresh.drop(columns=["kind", TARGET]).to_dict(orient="records")
        reply = httpx.post(f"{server.url}/predict_rows", json={"rows": rows}, timeout=20)
        assert reply.status_code == 200, reply.text
        values = np.array([answer["value"] for answer in reply.json()["predictions"]])
        truth = fresh[TARGET].to_numpy()
        r2 = 1 - ((truth - values) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()
        assert r2 > 0.8, f"served predictions explain only R^2 {r2:.3f} of fresh rows"

        bad = httpx.post(f"{server.url}/predict_rows", json={"rows": [{"x1": 1.0}]}, timeout=10)
        assert 400 <= bad.status_code < 500 and "x2" in bad.text


def test_a_run_with_another_input_column_is_packaged_but_not_promoted(table_repo, table_run):
    """Through the real flow: a second run that reads one column more passes its gates (the
    champion is not comparable), is packaged and recorded, and is not promoted: the champion's
    clients send the old columns. The summary says why; the record keeps its champion."""
    record_file = table_repo / "deploy" / "champion.json"
    before = json.loads(record_file.read_text())
    result = run_flow(table_repo, "ingest.features=[x1, x2, color, kind]")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "package ran, promote ran" in out
    challenger = json.loads((table_repo / "artefacts" / "bento.json").read_text())["model_version"]
    assert challenger != before["champion"]
    assert (
        f"its inputs differ from champion {before['champion']}'s (columns kind added; input "
        "shape 5 -> 8; target 'price' unchanged): packaged and recorded, not promoted "
        f"automatically; `make promote RUN={challenger}` takes it on purpose" in out
    ), out[-3000:]
    after = json.loads(record_file.read_text())
    assert after["champion"] == before["champion"] and challenger in after["runs"]
