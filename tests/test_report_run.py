"""The report names the run that wrote it (Prefect flow run, DVC experiment, git commit, date)
and the params that differ from git; each flow run leaves its summary as a Prefect artifact.

The report's inputs are a passing run's files (tests/test_report.py), in a git repository made
here; the artifact is left by the flow's own helper inside a flow run on the session's Prefect
server and read back through the client.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml

from components import report
from components.config import Params
from components.report import write_report
from tests.gate_project import finished_run
from tests.helpers import GIT, drain_prefect_logs

IDENTITY_ENV = (
    report.FLOW_RUN_NAME_ENV,
    report.FLOW_RUN_ID_ENV,
    report.EXPERIMENT_ENV,
    "PREFECT__FLOW_RUN_ID",
)


def _committed(root: Path, params: Params) -> tuple[str, dict]:
    """params.yaml committed in a fresh git repository at ``root``: the commit and the params."""
    raw = params.model_dump(mode="json", by_alias=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    subprocess.run([*GIT, "init", "-q"], cwd=root, check=True)
    subprocess.run([*GIT, "add", "params.yaml"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", "params"], cwd=root, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True, text=True
    )
    return head.stdout.strip(), raw


def test_the_report_names_its_flow_run_commit_date_and_the_params_it_changed(project, monkeypatch):
    root = Path.cwd()
    commit, raw = _committed(root, project)
    # This run's overrides, as a flow run applies them to params.yaml before the stages run.
    before = raw["train"]["max_epochs"]
    raw["train"]["max_epochs"] = before + 4
    raw["evaluate"]["max_drop_vs_champion"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for name in IDENTITY_ENV:
        monkeypatch.delenv(name, raising=False)
    flow_id = "0b9e7c1a-2f4d-4a55-9c3e-6f1d2a3b4c5d"
    for name, value in report.run_environment("tangerine-lizard", flow_id, "nightly-7").items():
        monkeypatch.setenv(name, value)

    page = write_report(finished_run(project)).read_text()
    assert f"tangerine-lizard (<code>{flow_id}</code>)" in page
    assert "<code>nightly-7</code> (<code>dvc exp apply nightly-7</code>)" in page
    assert f"<code>{commit}</code>" in page
    assert datetime.now(UTC).strftime("%Y-%m-%d") in page
    assert "Params that differ from git (HEAD): 2" in page  # those two, nothing else
    assert (
        f"<tr><td><code>train.max_epochs</code></td><td><code>{before}</code></td>"
        f"<td><code>{before + 4}</code></td></tr>" in page
    )
    assert "<code>evaluate.max_drop_vs_champion</code>" in page
    # The run is named before the data: the identity sits right under the verdict.
    assert page.index("tangerine-lizard") < page.index('class="data"')


def test_a_report_made_by_hand_says_so_and_that_its_params_are_gits(project, monkeypatch):
    root = Path.cwd()
    commit, _ = _committed(root, project)
    for name in IDENTITY_ENV:
        monkeypatch.delenv(name, raising=False)
    page = write_report(finished_run(project)).read_text()
    assert "not run by the Prefect flow" in page
    assert f"<code>{commit}</code>" in page
    assert "Params: as committed in git (no param differs from HEAD)." in page
    subprocess.run(["rm", "-rf", str(root / ".git")], check=True)
    page = write_report(project).read_text()
    assert "no git commit of params.yaml to compare with" in page and "(no commit)" in page


def test_a_flow_run_leaves_its_summary_and_the_report_link_as_an_artifact(project, prefect_server):
    from prefect import flow
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import pipeline

    root = Path.cwd()
    (root / "params.yaml").write_text(
        yaml.safe_dump(project.model_dump(mode="json", by_alias=True))
    )
    page = write_report(finished_run(project))
    summary = "\nPipeline summary\n  champion: r0123456789ab (promoted: passed every gate)"

    @flow(name="closing-summary")
    def closing() -> tuple[str, str]:
        return pipeline.leave_artifact(root, summary), str(flow_run.get_id())

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        said, run_id = closing()
        drain_prefect_logs()
    # Read back through the API itself: Prefect 3.8's client sends null for every filter left
    # out (answered 422), and with every filter given, empty ones too, it found none here.
    response = httpx.post(
        f"{prefect_server}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [run_id]}}},
        timeout=30,
    )
    response.raise_for_status()
    found = response.json()
    assert said == summary  # what the flow prints is what it left
    (artifact,) = found
    assert artifact["key"] == "pipeline-summary" and artifact["type"] == "markdown"
    assert "champion: r0123456789ab (promoted: passed every gate)" in artifact["data"]
    assert f"[report.html]({page.resolve().as_uri()})" in artifact["data"]


def test_params_changed_lists_keys_one_side_lacks_in_file_order(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  seed: 1\n  epochs: 2\nold:\n  gone: true\n")
    subprocess.run([*GIT, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-qm", "params"], cwd=tmp_path, check=True)
    assert report.params_changed(tmp_path) == ()
    (tmp_path / "params.yaml").write_text("train:\n  seed: 1\n  epochs: 5\n  lr: 0.1\n")
    assert report.params_changed(tmp_path) == (
        ("train.epochs", 2, 5),
        ("train.lr", report.ABSENT, 0.1),
        ("old.gone", True, report.ABSENT),
    )
