"""End to end: the real Prefect flow over the real DVC stages, in a fresh git + DVC repository,
ending with a real bento served by `bentoml serve` and answering over HTTP."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from components.config import read_params_file
from components.overrides import apply_overrides
from tests.conftest import REPO_ROOT, TINY_CLASSES, TINY_OVERRIDES, make_images
from tests.helpers import (
    GIT,
    file_hashes,
    flatten,
    free_port,
    only_variants,
    project_repo,
    run_flow,
    wait_ready,
)
from tests.log_lines import EPOCH_LINE, warning_lines

# Flow runs talk to one Prefect server per test process instead of each starting its own
# temporary one (tests/test_examples.py runs a flow that does).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

STAGES = (
    "ingest",
    "validate",
    "train",
    "evaluate",
    "compress",
    "gate",
    "package",
    "promote",
    "report",
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A fresh clone-like repository: our code, git, DVC, and a tiny .npz as the source."""

    def write_data(external: Path) -> None:
        x, y = make_images(per_class=20)
        np.savez(external / "tiny.npz", x=x, y=y, class_names=np.array(TINY_CLASSES))

    return project_repo(
        tmp_path_factory.mktemp("repo"),
        tmp_path_factory.mktemp("dvc-remote"),
        write_data,
        [*flatten(TINY_OVERRIDES), "ingest.source=data/external/tiny.npz"],
        only_variants,  # compression is tests/test_compress.py's subject: the quick variants
    )


@pytest.fixture(scope="module")
def first_run(workspace: Path) -> subprocess.CompletedProcess:
    result = run_flow(workspace)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _experiments(root: Path) -> dict[str, str]:
    """Experiment name -> ref, from git itself."""
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return {ref.rsplit("/", 1)[1]: ref for ref in refs if ref.count("/") == 4}


def _saved_as(output: str) -> str:
    """The experiment a run's summary says it was saved as."""
    return re.search(r"experiment: (\S+)   \(reproduce: dvc exp apply", output).group(1)


def _saved_params(root: Path, experiment: str) -> dict:
    ref = _experiments(root)[experiment]
    shown = subprocess.run(
        ["git", "show", f"{ref}:params.yaml"], cwd=root, capture_output=True, text=True, check=True
    )
    return yaml.safe_load(shown.stdout)


def test_flow_runs_every_stage_and_prints_a_summary(workspace, first_run):
    out = first_run.stdout + first_run.stderr
    # Train prints a line per epoch, and the run prints no warning we could remove.
    epochs = [m for line in out.splitlines() if (m := EPOCH_LINE.search(line))]
    assert [m["epoch"] for m in epochs if m["label"] == ""] == ["1", "2", "3"]
    assert warning_lines(out) == [], "\n".join(warning_lines(out))
    assert "classical baselines (accuracy, same splits): logistic_regression " in out
    assert "Pipeline summary" in out
    assert (
        "stages: ingest ran, validate ran, train ran, evaluate ran, compress ran, gate ran, "
        "package ran, promote ran, report ran" in out
    )
    assert "gate accuracy: PASS" in out
    bento = json.loads((workspace / "artefacts" / "bento.json").read_text())
    assert f"bentoml serve {bento['tag']}" in out
    assert ":latest" not in bento["tag"]
    assert (workspace / bento["archive"]).is_file()
    assert not Path(bento["archive"]).is_absolute()  # the same in every clone
    lock = (workspace / "dvc.lock").read_text()
    for stage in STAGES:
        assert f"  {stage}:" in lock
    # The first run had no champion to beat: it says so, and becomes the champion.
    gate = json.loads((workspace / "metrics" / "gate.json").read_text())
    assert gate["passed"] and gate["champion"]["source"] == "none"
    record = json.loads((workspace / "deploy" / "champion.json").read_text())
    assert record["champion"] == bento["model_version"]
    assert record["runs"][record["champion"]]["bento_tag"] == bento["tag"]
    assert "Promoted" in (workspace / "reports" / "report.html").read_text()


def test_bento_serves_over_http(workspace, first_run):
    bento = json.loads((workspace / "artefacts" / "bento.json").read_text())
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            bento["tag"],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=workspace,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server)

        x, y = make_images(per_class=3, seed=7)  # fresh images the model never saw
        correct = 0
        for image, label in zip(x, y, strict=True):
            reply = httpx.post(f"{base}/predict", json={"image": image.tolist()}, timeout=10)
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert set(body["probabilities"]) == set(TINY_CLASSES)
            assert abs(sum(body["probabilities"].values()) - 1) < 1e-3
            assert body["model_version"] == bento["tag"].split(":")[1]
            correct += body["label"] == TINY_CLASSES[label]
        assert correct >= 6, f"only {correct}/9 right"

        bad = httpx.post(f"{base}/predict", json={"image": [[1, 2], [3, 4]]}, timeout=10)
        assert 400 <= bad.status_code < 500
        assert "shape" in bad.text.lower()
    finally:
        server.terminate()
        server.wait(timeout=30)


# What `make pipeline` may take with nothing changed, without a Prefect server (the issue's
# budget; it takes 2-4 s here, and 5 s with a server: the margin is for a busy suite).
NO_OP_SECONDS = 10
# With a server the issue asks for 5 s. On a quiet machine the no-op's wall time is its CPU
# time plus a tenth of a second of the server's answers (docs/orchestration.md);
# in a suite that keeps both cores busy, its wall time is not its own, so its CPU time (load
# does not inflate it) is held to the 5 s.
NO_OP_CPU_SECONDS_WITH_A_SERVER = 5


def _no_op(root: Path, env: dict | None = None) -> tuple[str, float, float]:
    """A plain run that should have nothing to do: its output, wall time and CPU time."""
    started, cpu = time.monotonic(), _children_cpu()
    result = run_flow(root, env=env)
    seconds, cpu = time.monotonic() - started, _children_cpu() - cpu
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr, seconds, cpu


def _children_cpu() -> float:
    """User + system CPU of this process's finished children (run_flow waits for its own)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_second_run_with_nothing_changed_runs_no_stage(workspace, first_run, prefect_api):
    from flows.experiments import Match, matching_run

    first = _saved_as(first_run.stdout + first_run.stderr)
    saved = _experiments(workspace)
    assert first in saved
    # Without a Prefect server: answered from DVC's status before Prefect starts (no temporary
    # server), within the budget.
    no_server = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out, seconds, _ = _no_op(workspace, no_server)
    assert "stages: " + ", ".join(f"{s} skipped" for s in STAGES) in out
    assert "dvc status: every stage up to date; answered in" in out
    assert "Starting temporary server" not in out and "Beginning flow run" not in out
    assert seconds < NO_OP_SECONDS, f"the no-op took {seconds:.1f} s\n{out}"
    # Nothing changed: no second, identical experiment; the run names the one it matched.
    assert f"nothing changed: this run matched experiment {first}" in out
    assert "champion: " in out and "remote: 0 file(s) pushed" in out
    assert "prefect: no flow run recorded (no Prefect server configured" in out
    assert _experiments(workspace) == saved
    started = time.monotonic()
    assert matching_run(workspace) == Match("experiment", first)
    assert time.monotonic() - started < 1

    # With a server: the same answer, and the run is in the server's history.
    out, seconds, cpu = _no_op(workspace)
    assert f"nothing changed: this run matched experiment {first}" in out
    assert "Beginning flow run" not in out
    assert seconds < NO_OP_SECONDS, f"the no-op took {seconds:.1f} s\n{out}"
    assert cpu < NO_OP_CPU_SECONDS_WITH_A_SERVER, f"the no-op took {cpu:.1f} s of CPU\n{out}"
    name = re.search(r"prefect: recorded as flow run (\S+) \(tag no-op\)", out).group(1)
    (run,) = httpx.post(
        f"{prefect_api}/flow_runs/filter",
        json={"flow_runs": {"name": {"any_": [name]}}},
        timeout=30,
    ).json()
    assert run["state"]["type"] == "COMPLETED" and run["tags"] == ["no-op"]
    assert run["state"]["message"] == f"nothing changed: matched experiment {first}"
    assert httpx.get(f"{prefect_api}/flows/{run['flow_id']}", timeout=30).json()["name"] == (
        "pipeline"
    )
    (artifact,) = httpx.post(
        f"{prefect_api}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}},
        timeout=30,
    ).json()
    assert artifact["key"] == "pipeline-summary"
    assert f"this run matched experiment {first}" in artifact["data"]
    assert _experiments(workspace) == saved


def test_a_change_dvc_or_git_sees_is_not_taken_for_a_no_op(workspace, first_run, monkeypatch):
    """The no-op's verdict, in-process: data (tracked by git, or a new file only DVC sees), an
    output, a param or code each make it a run with something to do; put back, nothing is. A
    busy workspace or a killed run's params leave the run to the flow."""
    from flows.experiments import Match
    from flows.noop import check
    from flows.workspace_lock import params_backup, workspace_lock

    monkeypatch.chdir(workspace)  # DVC's Python API runs from inside the repository
    first = _saved_as(first_run.stdout + first_run.stderr)
    assert check(workspace).matched == Match("experiment", first)

    def changed(path: Path, data: bytes | None) -> bool:
        """Is the run not a no-op while ``path`` holds ``data`` (None: no file)?"""
        before = path.read_bytes() if path.exists() else None
        try:
            if data is None:
                path.unlink()
            else:
                path.write_bytes(data)
            return check(workspace) is None
        finally:
            if before is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(before)

    data = workspace / "data" / "external" / "tiny.npz"
    assert changed(data, data.read_bytes() + b"\0")
    assert changed(workspace / "data" / "external" / "new.txt", b"a file git does not track")
    model = workspace / "models" / "model.pt"  # git ignores it; dvc.lock holds its hash
    assert changed(model, None)
    assert changed(model, model.read_bytes() + b"\0")
    params = workspace / "params.yaml"
    text = params.read_text()
    assert changed(params, text.replace("min_rows_per_class: 3", "min_rows_per_class: 4").encode())
    code = workspace / "components" / "report.py"
    assert changed(code, code.read_bytes() + b"\n# a comment\n")
    os.utime(data)  # a touch alone, and each file put back: DVC hashes contents, nothing to do
    assert check(workspace).matched == Match("experiment", first)
    # What the flow decides in its own words: a workspace another run holds (it waits or names
    # the holder), a killed run's params to put back.
    with workspace_lock(workspace, run="another run"):
        assert check(workspace) is None
    assert changed(params_backup(workspace), b"{}")


def test_a_run_whose_results_were_committed_matches_the_commit(workspace, first_run, tmp_path):
    """`git commit` of a run's results (dvc.lock, metrics, the champion record): the next plain
    run matches that commit, saves no experiment and is answered before Prefect starts. A
    tracked file changed since, or one git does not know (it may be the run's: an experiment
    would hold it, the commit does not), leaves it to the flow."""
    from flows.experiments import Match, matching_run

    copy = tmp_path / "repo"  # the module's workspace keeps its results uncommitted
    shutil.copytree(workspace, copy, symlinks=True)
    assert matching_run(copy) == Match("experiment", _saved_as(first_run.stdout + first_run.stderr))
    subprocess.run([*GIT, "add", "-A"], cwd=copy, check=True)
    subprocess.run([*GIT, "commit", "-qm", "the run's results"], cwd=copy, check=True)
    short = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=copy, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    saved = _experiments(copy)
    no_server = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out, seconds, _ = _no_op(copy, no_server)
    assert "stages: " + ", ".join(f"{s} skipped" for s in STAGES) in out
    assert (
        f"nothing changed: this run matched commit {short}   "
        f"(reproduce: git checkout {short} && dvc pull)"
    ) in out
    assert "Starting temporary server" not in out and "Beginning flow run" not in out
    assert seconds < NO_OP_SECONDS, f"the no-op took {seconds:.1f} s\n{out}"
    assert _experiments(copy) == saved
    params = copy / "params.yaml"
    text = params.read_text()
    params.write_text(text + "# a comment\n")
    assert matching_run(copy) is None  # a file git tracks, changed since the commit
    params.write_text(text)
    assert matching_run(copy) == Match("commit", short)
    (copy / "notes.txt").write_text("a file git does not know yet")
    assert matching_run(copy) is None


@pytest.fixture(scope="module")
def one_param_run(workspace, first_run) -> tuple[subprocess.CompletedProcess, bytes]:
    """A run with one override; params.yaml as it was before it."""
    before = (workspace / "params.yaml").read_bytes()
    return run_flow(workspace, "evaluate.min_accuracy=0.55"), before


def test_changing_one_param_reruns_that_stage_and_later_ones_only(workspace, one_param_run):
    result, params_before = one_param_run
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "answered in" not in out and "Beginning flow run" in out  # --set: the flow's run
    assert "ingest skipped, validate skipped, train skipped, evaluate ran" in out
    # The threshold is a verdict, not a metric: compress reads only the metrics, so it stays.
    assert "compress skipped, gate ran" in out

    # The override belonged to this run: its experiment and dvc.lock record it, and
    # params.yaml is back as it was, byte for byte; the summary says how to keep it.
    assert (workspace / "params.yaml").read_bytes() == params_before
    name = _saved_as(out)
    assert _saved_params(workspace, name)["evaluate"]["min_accuracy"] == 0.55
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert lock["stages"]["evaluate"]["params"]["params.yaml"]["evaluate.min_accuracy"] == 0.55
    assert "overrides (this run only): evaluate.min_accuracy=0.55" in out
    assert f"to keep these params: dvc exp apply {name} (or run with --keep-params)" in out
    assert "the next run without them re-runs the stages they changed" in out


def _dvc_json(root: Path, *command: str):
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *command, "--json"],
        cwd=root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)


def test_the_runs_read_side_by_side_in_160_columns(workspace, first_run, one_param_run):
    """After two runs: `make history` names them, with their headline metrics and the param
    that differs, in 160 columns; every metric `dvc exp show` has is a headline number;
    `dvc metrics diff` is a short table; `dvc plots show` draws each chart once, from data."""
    names = [_saved_as(r.stdout + r.stderr) for r in (first_run, one_param_run[0])]
    venv = Path(sys.executable).parent.parent  # the Makefile's VENV, this checkout's
    shown = subprocess.run(
        ["make", "-s", "--no-print-directory", "-f", str(REPO_ROOT / "Makefile"), "-C",
         str(workspace), "-o", "setup", "history", f"VENV={venv}"],
        env={**os.environ, "COLUMNS": "160"}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = shown.splitlines()
    assert max(len(line) for line in lines) <= 160, shown
    header = lines[1].split()
    assert header[:2] == ["Experiment", "Created"], shown
    for column in ("best_epoch", "accuracy", "macro_f1", "served_accuracy", "served_kib",
                   "served_ms", "evaluate.min_accuracy"):  # fmt: skip
        assert column in header, shown
    assert not [c for c in header if "/" in c], shown  # no code, data or model hashes
    rows = {name: line for line in lines for name in names if f"[{name}]" in line}
    assert set(rows) == set(names), shown
    assert rows[names[1]].split()[-1] == "0.55"  # the override, the column that differs

    for baseline in _dvc_json(workspace, "exp", "show"):
        for exp in baseline.get("experiments") or []:
            metrics = exp["revs"][0]["data"]["metrics"]
            assert sorted(metrics) == [f"metrics/headline/{s}.json" for s in
                                       ("compress", "evaluate", "train")]  # fmt: skip
            for numbers in metrics.values():
                assert all(isinstance(v, int | float) for v in numbers["data"].values())
    diff = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "diff", "--all", *names],
        cwd=workspace, env={**os.environ, "COLUMNS": "160"}, capture_output=True, text=True,
        check=True,
    ).stdout.splitlines()  # fmt: skip
    assert diff[0].split() == ["Path", "Metric", *names, "Change"], diff
    assert len(diff) == 7 and max(len(line) for line in diff) <= 120, diff  # 6 numbers

    plots = _dvc_json(workspace, "plots", "show")
    assert plots.get("errors") is None, plots["errors"]
    assert sorted(plots["data"]) == sorted(
        ("loss", "validation", "confusion", "per_class", "compression_score", "compression_latency")
    )
    for name, chart in plots["data"].items():
        assert chart and chart[0]["content"]["data"]["values"], f"{name} draws nothing"


def test_a_second_override_run_starts_from_params_yaml_not_the_last_run(
    workspace, one_param_run, tmp_path
):
    """Two override runs in a row (the README's reference lines, in any order): the second
    trains what params.yaml says plus its own overrides, never the first's; --keep-params
    keeps its own in params.yaml."""
    before = (workspace / "params.yaml").read_bytes()
    assert before == one_param_run[1]
    kept = tmp_path / "params.yaml"
    kept.write_bytes(before)
    apply_overrides(["promote.auto=false"], kept)
    result = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--set", "promote.auto=false", "--keep-params"],
        cwd=workspace, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    try:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out = result.stdout + result.stderr
        # dvc.lock held the first run's evaluate.min_accuracy, params.yaml its own again: DVC
        # saw the difference and brought evaluate back to params.yaml's threshold (from its
        # run-cache: the first run computed it), and promote ran with this run's override.
        assert "ingest skipped, validate skipped, train skipped" in out
        assert "promote ran" in out
        lock = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
        threshold = lock["evaluate"]["params"]["params.yaml"]["evaluate.min_accuracy"]
        assert threshold == TINY_OVERRIDES["evaluate"]["min_accuracy"]
        saved = _saved_params(workspace, _saved_as(out))
        assert saved["evaluate"]["min_accuracy"] == TINY_OVERRIDES["evaluate"]["min_accuracy"]
        assert saved["promote"]["auto"] is False
        assert "overrides (kept): promote.auto=false" in out
        assert (workspace / "params.yaml").read_bytes() == kept.read_bytes()
    finally:
        (workspace / "params.yaml").write_bytes(before)  # the later tests start from git's


def test_failed_validation_stops_the_flow_and_keeps_earlier_artefacts(workspace, first_run):
    bento_before = (workspace / "artefacts" / "bento.json").read_text()
    model_before = (workspace / "models" / "model.pt").read_bytes()
    result = run_flow(workspace, "validate.min_rows_per_class=1000")
    assert result.returncode == 1
    assert "Pipeline failed: validate:" in result.stderr
    assert "1000" in result.stderr
    # Nothing downstream ran: the trained model and the packaged bento are as they were.
    assert (workspace / "models" / "model.pt").read_bytes() == model_before
    assert (workspace / "artefacts" / "bento.json").read_text() == bento_before
    assert "outputs put back as the last good run left them" in result.stderr
    stopped = (workspace / "reports" / "stopped.html").read_text()
    assert "Refused at validate" in stopped and "1000" in stopped


def test_a_run_that_fails_after_it_trained_puts_every_output_back(workspace, first_run):
    """train runs (a learning rate of 1e-7, written by the flow as YAML 1.1 and 1.2 both read
    it), then evaluate's gate refuses its model: dvc.lock, the model (from DVC's cache) and
    the metrics git keeps (`cache: false`, which no checkout restores) are the last good run's
    again, and DVC finds nothing more stale than before."""

    before, stale_before = _outputs(workspace), _dvc_status(workspace)
    result = run_flow(workspace, "train.learning_rate=0.0000001", "evaluate.min_accuracy=0.99")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-3000:]
    assert "Pipeline failed: evaluate:" in result.stderr
    assert "dvc.lock and every output back as the last good run left them" in result.stderr, out[
        -3000:
    ]
    after = _outputs(workspace)
    assert sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)) == []
    assert _dvc_status(workspace) == stale_before  # nothing this run did is left for DVC to see


def test_a_run_stopped_with_sigterm_after_it_trained_puts_every_output_back(workspace, first_run):
    """`kill` (or `timeout`) while evaluate runs, after train replaced the model: the flow
    stops the stage, puts dvc.lock and every output back, says so, and exits; DVC finds
    nothing more stale than before and can still run (its lock file intact)."""
    before, params_before = _outputs(workspace), (workspace / "params.yaml").read_bytes()
    stale_before = _dvc_status(workspace)
    flow = subprocess.Popen(
        [sys.executable, "-m", "flows.pipeline", "--set", "train.learning_rate=0.0123"],
        cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen = []
    for line in flow.stdout:
        seen.append(line)
        if "Running stage 'evaluate'" in line:
            flow.send_signal(signal.SIGTERM)
            break
    seen += flow.stdout.readlines()
    out = "".join(seen)
    assert flow.wait(60) != 0, out[-3000:]
    assert "Running stage 'train'" in out, out[-3000:]  # it replaced the model first
    assert "stopped (" in out and "dvc.lock and every output back" in out, out[-3000:]
    assert "Pipeline stopped (SIGTERM); the lines above say what was put back" in out
    assert "Traceback" not in out, out[-3000:]
    after = _outputs(workspace)
    assert sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)) == []
    assert (workspace / "params.yaml").read_bytes() == params_before
    assert _dvc_status(workspace) == stale_before


def _dvc_status(root: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr  # e.g. a lock file left unreadable
    return done.stdout


OUTPUT_FOLDERS = ("data/raw", "data/prepared", "models", "artefacts", "metrics", "reports")


def _outputs(root: Path) -> dict[str, str]:
    """The hash of every file the stages write."""
    return file_hashes(root, OUTPUT_FOLDERS, skip=("stopped.html",))


def _break_params(root: Path, override: str):
    before = (root / "params.yaml").read_bytes()
    apply_overrides([override], root / "params.yaml")
    return lambda: (root / "params.yaml").write_bytes(before)


def _break_file(root: Path, name: str, junk: bytes = b"{not json"):
    path = root / name
    before = path.read_bytes()
    path.write_bytes(junk)
    return lambda: path.write_bytes(before)


# One bad input per stage: a param it refuses, or an input file that is not what it expects
# (a crash, not a one-line reason, for compress: the outputs must come back all the same).
BAD_INPUTS = {
    "ingest": lambda root: _break_params(root, "ingest.source=data/external/missing.npz"),
    "validate": lambda root: _break_params(root, "validate.min_rows_per_class=1000"),
    "train": lambda root: _break_params(root, "train.init_from=models/missing.pt"),
    "evaluate": lambda root: _break_file(root, "models/model.json"),
    "compress": lambda root: _break_file(root, "models/model.pt", b"not a state dict"),
    "gate": lambda root: _break_file(root, "models/onnx/int8.onnx", b"not onnx"),
    "package": lambda root: _break_file(root, "metrics/compress.json"),
    "promote": lambda root: _break_file(root, "artefacts/bento.json"),
}


def test_a_failed_stage_leaves_its_outputs_as_the_last_good_run_left_them(workspace, first_run):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for stage, breaks in BAD_INPUTS.items():
        before = _outputs(workspace)
        unbreak = breaks(workspace)
        try:
            result = subprocess.run(
                [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
                cwd=workspace, env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert result.returncode != 0, f"{stage} did not fail: {result.stdout[-2000:]}"
            assert "outputs put back as the last good run left them]" in result.stderr, (
                stage,
                result.stderr[-2000:],
            )
            status = subprocess.run(
                [sys.executable, "-m", "dvc", "status", stage],
                cwd=workspace, env=env, capture_output=True, text=True,
            )  # fmt: skip
            assert stage in status.stdout, (stage, status.stdout)  # DVC says what is stale
        finally:
            unbreak()
        after = _outputs(workspace)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, (stage, changed)


def test_bad_override_fails_before_any_stage(workspace, first_run):
    before = (workspace / "params.yaml").read_text()
    result = run_flow(workspace, "train.max_epochs=zero")
    assert result.returncode == 2
    assert "Pipeline not started" in result.stderr
    assert "train.max_epochs" in result.stderr
    assert (workspace / "params.yaml").read_text() == before
    assert "Pipeline summary" not in result.stdout + result.stderr


STOPPED_IN_A_FLOW = """
import sys, time
from pathlib import Path
from components.stage import set_quiet_env
set_quiet_env()
from prefect import flow
from components.overrides import overrides_for_one_run

@flow
def holds_overrides(params: str):
    with overrides_for_one_run(["train.max_epochs=7"], Path(params)):
        print("APPLIED", flush=True)
        time.sleep(120)

holds_overrides(sys.argv[1])
"""


def test_a_run_stopped_with_sigterm_puts_params_yaml_back(tmp_path):
    """A cancelled flow run (Prefect's runner sends SIGTERM) unwinds through the overrides'
    ``finally``: params.yaml is back as it was."""
    params = tmp_path / "params.yaml"
    params.write_bytes((REPO_ROOT / "params.yaml").read_bytes())
    before = params.read_bytes()
    process = subprocess.Popen(
        [sys.executable, "-c", STOPPED_IN_A_FLOW, str(params)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        seen = []
        for line in process.stdout:
            seen.append(line)
            if "APPLIED" in line:
                break
        assert "APPLIED" in seen[-1], "".join(seen)[-3000:]
        assert read_params_file(params)["train"]["max_epochs"] == 7
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert params.read_bytes() == before
