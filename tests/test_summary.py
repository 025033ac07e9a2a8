"""The flow's closing summary tells the truth: it leads with the served model's test metrics (not
the PyTorch network's), and its serve command, run as printed from the repository root in a plain
shell, serves the run's bento on 127.0.0.1 and answers over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx

from flows.pipeline import format_summary, read_summary
from tests.conftest import REPO_ROOT
from tests.helpers import BENTOML, free_port, wait_ready
from tests.tiny_models import package_tiny

RECORDS = ("evaluate.json", "evaluate_gates.json", "compress.json", "gate.json")


def _project(root: Path) -> Path:
    """params.yaml and the repository's own stage records, as a finished run leaves them."""
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    (root / "metrics").mkdir()
    for name in RECORDS:
        shutil.copy(REPO_ROOT / "metrics" / name, root / "metrics" / name)
    return root


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_the_summary_leads_with_the_served_models_metrics(tmp_path):
    root = _project(tmp_path)
    served = json.loads((root / "metrics" / "gate.json").read_text())["served_variant"]
    # The network scores 0.986, the model clients get 0.978: the summary must say 0.978 first.
    _edit(root / "metrics" / "evaluate.json", lambda d: d.update(accuracy=0.986))
    _edit(root / "metrics" / "gate.json", lambda d: d["variants"][served].update(accuracy=0.978))

    lines = format_summary(read_summary(root), {"ingest": "ran"}).splitlines()
    metrics = [i for i, line in enumerate(lines) if "accuracy 0.9" in line]
    first = lines[metrics[0]]
    assert first.startswith(f"  served model ({served}), test metrics: accuracy 0.9780"), lines
    network = next(i for i, line in enumerate(lines) if "accuracy 0.9860" in line)
    assert "PyTorch network" in lines[network] and network > metrics[0]
    assert f"{served}:" in "\n".join(lines) and "(served)" in "\n".join(lines)


def test_the_champion_line_names_the_champion_the_record_has_now(tmp_path):
    """`make promote` after a run changes the champion record, not the promote stage's
    promote.json: the summary names the record's champion and says what the stage said."""
    root = _project(tmp_path)
    said = {"champion_after": "r000000000001", "outcome": "recorded", "reason": "not promoted"}
    (root / "metrics" / "promote.json").write_text(json.dumps(said))
    (root / "deploy").mkdir()
    record = root / "deploy" / "champion.json"

    def champion_line() -> str:
        out = format_summary(read_summary(root), {"promote": "ran"})
        return next(line for line in out.splitlines() if line.startswith("  champion: "))

    assert champion_line() == "  champion: r000000000001 (recorded: not promoted)"  # no record
    record.write_text("{not json")  # the stages that read it say what is wrong; not this line
    assert champion_line() == "  champion: r000000000001 (recorded: not promoted)"
    record.write_text(json.dumps({"format": 1, "champion": "r000000000001"}))
    assert champion_line() == "  champion: r000000000001 (recorded: not promoted)"
    record.write_text(json.dumps({"format": 1, "champion": "r000000000002"}))
    assert champion_line() == (
        "  champion: r000000000002 (the champion record's since this run's promote stage, "
        "which said: recorded: not promoted)"
    )


def test_the_printed_serve_command_works_from_the_repo_root(tmp_path, monkeypatch):
    """One bento server: the tiny bento imported into the project's ./.bentoml store, as the
    package stage of a run from the repository root leaves it; the command run in bash from the
    root with no BENTOML_HOME in the environment (a plain shell), on a free port."""
    root = _project(tmp_path)
    result = package_tiny(root, seed=3, name="tiny-summary")  # writes artefacts/bento.json
    store = root / ".bentoml"
    subprocess.run(
        [*BENTOML, "import", str(result.archive)],
        env={**os.environ, "BENTOML_HOME": str(store)},
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("BENTOML_HOME", str(store))  # what a run from the root has

    out = format_summary(read_summary(root), {"package": "ran"})
    assert "serve the champion: make serve" in out and "make serve PORT=" in out
    line = next(x for x in out.splitlines() if "serve this run's bento:" in x)
    command = line.split("serve this run's bento:", 1)[1].strip()
    assert command.startswith("BENTOML_HOME=.bentoml "), command
    assert f" serve {result.tag} --host 127.0.0.1 --port 3000" in command

    port = free_port()  # the printed 3000 may be taken on a shared machine
    shell_env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    log = root / "serve.log"
    server = subprocess.Popen(
        ["bash", "-c", command.replace("--port 3000", f"--port {port}")],
        cwd=root,
        env=shell_env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server, 90, log)
        info = httpx.post(f"{url}/info", json={}, timeout=10)
        assert info.status_code == 200, info.text
        assert info.json()["model_version"] == result.model_version
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
