"""Orchestration for real: a Prefect server, the served deployments, DVC experiments pushed to a
DVC remote and a git remote, a fresh clone that reproduces a run, a SIGKILL mid-train, two runs
at once, bad input, and a work pool with a worker.

One workspace (a clone of a bare ``origin`` repository, tiny data) and one Prefect server
(loopback, free port, SQLite in a temp dir) are shared by the tests of this module, which run
in order. HOME is a temp dir too: the default DVC remote (``~/.local/share/...`` in
.dvc/config) lands there, for the workspace and the clone alike.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import yaml

from tests.conftest import REPO_ROOT, TINY_CLASSES, TINY_OVERRIDES, make_images
from tests.helpers import flatten, only_variants, project_repo, run_flow, serving_prefect

pytestmark = pytest.mark.slow


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def _dvc(cwd: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def _experiments(ws: Path) -> dict[str, str]:
    """Experiment name -> ref, from git itself."""
    refs = _git(ws, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    return {ref.rsplit("/", 1)[1]: ref for ref in refs if ref.count("/") == 4}


def _outcomes(output: str) -> dict[str, str]:
    """The summary's `stages: ingest ran, validate skipped, ...` line, as a dict."""
    line = re.search(r"stages: (.*)", output).group(1)
    return dict(item.rsplit(" ", 1) for item in line.split(", "))


def _lock_entry(root: Path, stage: str) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]


def _snapshot(ws: Path) -> dict:
    """What a refused run must leave exactly as it was."""
    return {
        "git status": _git(ws, "status", "--porcelain", "--untracked-files=all"),
        "params.yaml": (ws / "params.yaml").read_bytes(),
        "dvc.lock": (ws / "dvc.lock").read_bytes(),
        "experiments": _experiments(ws),
        "model": (ws / "models" / "model.pt").stat().st_mtime_ns,
    }


# ---------------------------------------------------------------------------------------------
# Shared fixtures: home, server, workspace, the served deployments


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("orchestration")


@pytest.fixture(scope="module")
def env(base: Path) -> dict:
    """The environment of every command here: a temp HOME with a git user, a fast runner."""
    home = base / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = Test\n\temail = test@example.invalid\n")
    return {
        **os.environ,
        "HOME": str(home),
        # dvc.yaml's commands say `python`: this interpreter, as `make` and the flow arrange.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # the served process asks for work every second
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }


@pytest.fixture(scope="module")
def api(base: Path, env: dict, prefect_database: Path):
    """A real Prefect server on a free loopback port with its own SQLite database, every
    background service on (schedules, workers), as `make prefect-server` starts it."""
    with serving_prefect(base, env, database=prefect_database) as url:
        env["PREFECT_API_URL"] = url  # every later command talks to this server
        yield url


@pytest.fixture(scope="module")
def workspace(base: Path, env: dict) -> Path:
    """A clone of a bare `origin`: our code, DVC with the repository's own .dvc/config, tiny
    data; experiments go to `origin` (orchestrate.git_remote) as well as to the DVC remote."""
    origin, ws = base / "origin.git", base / "ws"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True, env=env)
    subprocess.run(
        ["git", "clone", "-q", str(origin), str(ws)], check=True, env=env, capture_output=True
    )

    def write_data(external: Path) -> None:
        x, y = make_images(per_class=20)
        np.savez(external / "tiny.npz", x=x, y=y, class_names=np.array(TINY_CLASSES))

    overrides = [
        *flatten(TINY_OVERRIDES),
        "ingest.source=data/external/tiny.npz",
        "orchestrate.git_remote=origin",
        "orchestrate.retry_delay_seconds=1",
    ]
    # No DVC remote of its own: the project's default one, under the temp HOME, as a clone's.
    project_repo(ws, None, write_data, overrides, only_variants, env=env)
    subprocess.run(
        ["git", "push", "-q", "origin", "HEAD"], cwd=ws, check=True, env=env, capture_output=True
    )
    return ws


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def served(api: str, workspace: Path, env: dict, base: Path):
    """`make schedule`: the nightly and by-hand deployments, served from the workspace."""
    log = (base / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.deploy"],
        cwd=workspace,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # A process started from a background job inherits SIGINT ignored (as CI may start
        # us): restore the default so Ctrl-C (our SIGINT below) stops `serve` as it would.
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 90
        while httpx.get(f"{api}/deployments/name/pipeline/by-hand").status_code != 200:
            assert process.poll() is None, (base / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "deployments not registered in 90 s"
            time.sleep(0.5)
        time.sleep(1)  # both deployments registered and the runner polling
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # as Ctrl-C on `make schedule`
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        log.close()


def _trigger(env: dict, deployment: str, *params: str) -> str:
    """`prefect deployment run <deployment> --param k=v`: the command the README shows."""
    args = [a for p in params for a in ("--param", p)]
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", deployment, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)


def _create_run(api: str, deployment: str, parameters: dict | None = None) -> str:
    """The same as `prefect deployment run`, through the REST API (no CLI start-up)."""
    found = httpx.get(f"{api}/deployments/name/{deployment}").json()
    run = httpx.post(
        f"{api}/deployments/{found['id']}/create_flow_run", json={"parameters": parameters or {}}
    )
    run.raise_for_status()
    return run.json()["id"]


def _wait_for(api: str, flow_run_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        assert time.monotonic() < deadline, f"flow run still {run['state']['name']}"
        time.sleep(1)


def _task_states(api: str, flow_run_id: str) -> dict[str, str]:
    """Task name -> state name. Task states reach the server as events, a moment after the
    flow run's own final state: wait until none is still pending or running."""
    deadline = time.monotonic() + 30
    while True:
        runs = httpx.post(
            f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}}
        ).json()
        # A task run whose first state event has not arrived yet has no state at all.
        states = {run["name"]: (run["state"] or {}).get("name", "Pending") for run in runs}
        if not {"Pending", "Running"} & set(states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# The schedule; a first run killed mid-train; its re-run through the server, with a parameter,
# while a second run is refused


def test_nightly_schedule_is_registered_with_its_cron(api, served, workspace):
    orc = yaml.safe_load((workspace / "params.yaml").read_text())["orchestrate"]
    nightly = httpx.get(f"{api}/deployments/name/pipeline/nightly").json()
    [schedule] = nightly["schedules"]
    assert schedule["active"]
    assert schedule["schedule"]["cron"] == orc["schedule_cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == orc["schedule_timezone"]
    assert nightly["parameters"]["only_if_data_changed"] is True
    assert not nightly["paused"]
    by_hand = httpx.get(f"{api}/deployments/name/pipeline/by-hand").json()
    assert by_hand["schedules"] == []
    assert by_hand["parameters"]["only_if_data_changed"] is False


def _descendants_running(pid: int, needle: str) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if needle in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def _still_alive(processes: list[psutil.Process], within: float) -> list[psutil.Process]:
    deadline = time.monotonic() + within
    while True:
        alive = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.fixture(scope="module")
def killed_run(workspace, env, base, served) -> dict:
    """The first run (`--set train.max_epochs=30`), SIGKILLed with its process group mid-train."""
    log = base / "killed.log"
    with log.open("w") as out:
        victim = subprocess.Popen(
            [sys.executable, "-m", "flows.pipeline", "--set", "train.max_epochs=30"],
            cwd=workspace,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while not (trainers := _descendants_running(victim.pid, "components.train")):
            assert victim.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "train never started"
            time.sleep(0.2)
        time.sleep(2.0)  # well inside the stage: the trainer is importing or fitting
        assert victim.poll() is None and trainers[0].is_running(), "train ended too soon"
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(30)
    assert not _still_alive(trainers, within=10), "the trainer outlived its run"
    return {"returncode": victim.returncode, "log": log.read_text()}


@pytest.fixture(scope="module")
def rerun(api, served, workspace, env, base, killed_run) -> dict:
    """Re-run through the server, the way the README shows, with the killed run's override
    and one more; while it holds the workspace, start a second run by hand."""
    min_accuracy_before = yaml.safe_load((workspace / "params.yaml").read_text())["evaluate"][
        "min_accuracy"
    ]
    run_id = _trigger(
        env,
        "pipeline/by-hand",
        'overrides=["train.max_epochs=30", "evaluate.min_accuracy=0.55"]',
    )
    deadline = time.monotonic() + 180
    while "workspace held by this run" not in (base / "serve.log").read_text():
        assert time.monotonic() < deadline, (base / "serve.log").read_text()[-3000:]
        time.sleep(0.2)
    started = time.monotonic()
    second = run_flow(workspace, "evaluate.min_accuracy=0.51", env=env)
    second_seconds = time.monotonic() - started
    overlapped = httpx.get(f"{api}/flow_runs/{run_id}").json()["state"]["type"] == "RUNNING"
    min_accuracy_after_second = yaml.safe_load((workspace / "params.yaml").read_text())["evaluate"][
        "min_accuracy"
    ]
    return {
        "run": _wait_for(api, run_id, timeout=600),
        "second": second,
        "second_seconds": second_seconds,
        "overlapped": overlapped,
        "second_left_params_alone": min_accuracy_after_second in (min_accuracy_before, 0.55),
    }


def test_killed_run_rerun_skips_completed_stages_and_finishes(
    api, workspace, env, base, killed_run, rerun
):
    assert killed_run["returncode"] == -signal.SIGKILL
    assert "Pipeline summary" not in killed_run["log"]
    run = rerun["run"]
    assert run["state"]["type"] == "COMPLETED", (
        run["state"]["message"] + (base / "serve.log").read_text()[-4000:]
    )
    states = _task_states(api, run["id"])
    assert states["ingest"] == states["validate"] == "Skipped", states  # done before the kill
    assert states["train"] == "Completed", states  # cut short by the kill: ran again, whole
    assert set(states.values()) == {"Skipped", "Completed"}, states
    assert _lock_entry(workspace, "train")["params"]["params.yaml"]["train"]["max_epochs"] == 30
    # The killed run's override, left in params.yaml (no `finally` runs on SIGKILL), was put
    # back before the re-run applied its own.
    log = (base / "serve.log").read_text()
    assert "params.yaml put back as it was before run" in log
    assert "which was killed with overrides applied (train.max_epochs=30)" in log
    # No stale DVC lock either: all DVC sees is params.yaml back as git has it (the run's
    # overrides were its own), so the stages that read those params are due again.
    status = json.loads(_dvc(workspace, env, "status", "--json").stdout)
    assert {"train", "evaluate"} <= set(status), status
    for stage, changes in status.items():
        assert [list(change) for change in changes] == [["changed deps"]], (stage, changes)
        deps = changes[0]["changed deps"]
        assert list(deps) == ["params.yaml"], (stage, deps)
        assert set(deps["params.yaml"]) <= {"train", "evaluate", "evaluate.min_accuracy"}, deps


def test_second_run_at_once_is_refused_and_changes_nothing(rerun):
    second = rerun["second"]
    assert rerun["overlapped"], "the first run ended before the second asked"
    assert second.returncode == 3, second.stdout + second.stderr
    assert re.search(
        r"Pipeline not started: workspace .* is busy: pipeline run '[\w-]+', pid", second.stderr
    ), second.stderr
    assert "Pipeline summary" not in second.stdout + second.stderr
    assert rerun["second_left_params_alone"]
    assert rerun["second_seconds"] < 60


def test_deployment_run_applied_its_parameter_and_saved_the_run(api, workspace, rerun, env, base):
    run = rerun["run"]
    name = run["name"]
    assert run["state"]["message"] == f"saved as experiment {name}"
    states = _task_states(api, run["id"])
    assert states["dvc-exp-save"] == states["dvc-push"] == "Completed"

    # The overrides went into the experiment (as `dvc exp run -S` would); params.yaml is back
    # as git has it, so the next nightly run trains what params.yaml in git says.
    assert (workspace / "params.yaml").read_text() == _git(workspace, "show", "HEAD:params.yaml")
    ref = _experiments(workspace)[name]
    saved_params = yaml.safe_load(_git(workspace, "show", f"{ref}:params.yaml"))
    assert saved_params["evaluate"]["min_accuracy"] == 0.55
    assert saved_params["train"]["max_epochs"] == 30
    saved_metrics = json.loads(_git(workspace, "show", f"{ref}:metrics/evaluate.json"))
    assert saved_metrics == json.loads((workspace / "metrics" / "evaluate.json").read_text())
    message = _git(workspace, "log", "-1", "--format=%B", ref)
    assert f"Prefect flow run {name} ({run['id']})" in message
    # `dvc exp show` lists it with its params and metrics.
    shown = json.loads(_dvc(workspace, env, "exp", "show", "--json").stdout)
    exps = {
        exp["name"]: exp["revs"][0]["data"]
        for baseline in shown
        for exp in baseline.get("experiments") or []
    }
    assert exps[name]["params"]["params.yaml"]["data"]["evaluate"]["min_accuracy"] == 0.55
    assert exps[name]["metrics"]["metrics/headline/evaluate.json"]["data"]["accuracy"] >= 0.5
    # Pushed: the ref to origin, data and models to the default DVC remote (in HOME).
    assert ref in _git(workspace, "ls-remote", "origin")
    remote = base / "home" / ".local" / "share" / "data-to-bento" / "dvc-remote"
    outs = {o["path"]: o["md5"] for o in _lock_entry(workspace, "train")["outs"]}
    model_md5 = outs["models/model.pt"]
    assert (remote / "files" / "md5" / model_md5[:2] / model_md5[2:]).is_file()


def test_run_reproduces_in_a_fresh_clone(workspace, rerun, base, env):
    """`dvc exp pull` + `dvc exp apply` + `dvc repro --pull` in a new clone gets the run back;
    re-running ingest, train and evaluate there gives the same data hashes and metrics."""
    name = rerun["run"]["name"]
    clone = base / "clone"
    subprocess.run(
        ["git", "clone", "-q", str(base / "origin.git"), str(clone)], check=True, env=env
    )
    _dvc(clone, env, "exp", "pull", "origin", name)
    _dvc(clone, env, "exp", "apply", name)
    _dvc(clone, env, "repro", "--pull")
    assert "up to date" in _dvc(clone, env, "status").stdout
    ref = _experiments(workspace)[name]
    assert (clone / "params.yaml").read_text() == _git(workspace, "show", f"{ref}:params.yaml")

    # Recompute the data, the model and its metrics from the source, on this clone's CPU.
    _dvc(clone, env, "repro", "--force", "--single-item", "ingest", "train", "evaluate")
    for stage, out in [
        ("ingest", "data/raw"),
        ("ingest", "data/prepared"),
        ("train", "models/model.pt"),
        ("train", "models/model.json"),
    ]:
        theirs = {o["path"]: o["md5"] for o in _lock_entry(workspace, stage)["outs"]}
        ours = {o["path"]: o["md5"] for o in _lock_entry(clone, stage)["outs"]}
        assert ours[out] == theirs[out], f"{out} differs after re-running {stage}"
    for metrics in ("train.json", "evaluate.json", "confusion.csv", "train_history.csv"):
        assert (clone / "metrics" / metrics).read_bytes() == (
            workspace / "metrics" / metrics
        ).read_bytes(), metrics


# ---------------------------------------------------------------------------------------------
# Data-driven: the nightly run


def test_nightly_run_skips_every_stage_when_the_data_is_unchanged(api, served, workspace, rerun):
    before = _snapshot(workspace)
    run_id = _create_run(api, "pipeline/nightly")
    run = _wait_for(api, run_id, timeout=120)
    assert run["state"]["type"] == "COMPLETED"
    assert "data source unchanged since dvc.lock" in run["state"]["message"]
    assert "every stage skipped" in run["state"]["message"]
    states = _task_states(api, run_id)
    assert "ingest" in states and "train" in states
    assert set(states.values()) == {"Skipped"}, states  # and no dvc-exp-save, no dvc-push
    assert _snapshot(workspace) == before


def test_the_nightly_check_sees_new_data(workspace, rerun, monkeypatch):
    """The other half of the data-driven trigger: DVC's view of the source changes with it."""
    from flows.pipeline import changed_sources

    monkeypatch.chdir(workspace)  # DVC's Python API runs from inside the repository
    data = workspace / "data" / "external" / "tiny.npz"
    original = data.read_bytes()
    try:
        assert changed_sources(workspace) == []
        x, y = make_images(per_class=21, seed=3)
        np.savez(data, x=x, y=y, class_names=np.array(TINY_CLASSES))
        assert changed_sources(workspace) == ["ingest"]
    finally:
        data.write_bytes(original)
    assert changed_sources(workspace) == []


# ---------------------------------------------------------------------------------------------
# Retries: a transient failure is retried, a stage's own one-line reason is not

FLAKY_STAGES = """
stages:
  flaky:
    cmd: python stage.py flaky
    outs: [flaky.out]
  gate:
    cmd: python stage.py gate
"""
STAGE_SCRIPT = """
import sys
from pathlib import Path
name = sys.argv[1]
tries = Path(f"tries-{name}")
n = int(tries.read_text()) + 1 if tries.exists() else 1
tries.write_text(str(n))
if name == "gate":
    print("STAGE FAILED gate: accuracy 0.1 is below 0.9", file=sys.stderr)
    sys.exit(1)
if n == 1:
    raise OSError("I/O error: the disk blinked")  # a crash, not a stage's own reason
Path("flaky.out").write_text("done")
"""
RUN_TWO_STAGES = """
import json, os, sys
from prefect import flow
from flows.pipeline import run_stage

@flow
def two_stages(root: str):
    os.chdir(root)
    states = {}
    for stage in ("flaky", "gate"):
        state = run_stage.with_options(name=stage, retries=2, retry_delay_seconds=0)(
            stage, root, return_state=True
        )
        states[stage] = [state.name, state.message]
    return states

print("RESULT", json.dumps(two_stages(sys.argv[1])))
"""


def test_transient_failure_is_retried_but_a_stage_reason_is_not(base, env, api):
    root = base / "flaky-repo"
    root.mkdir()
    (root / "dvc.yaml").write_text(FLAKY_STAGES)
    (root / "stage.py").write_text(STAGE_SCRIPT)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc(root, env, "init", "-q")
    result = subprocess.run(
        [sys.executable, "-c", RUN_TWO_STAGES, str(root)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "RESULT" in result.stdout, result.stdout + result.stderr
    states = json.loads(result.stdout.split("RESULT", 1)[1])
    assert states["flaky"][0] == "Completed" and (root / "tries-flaky").read_text() == "2"
    assert states["gate"] == ["StageFailed", "gate: accuracy 0.1 is below 0.9"]
    assert (root / "tries-gate").read_text() == "1"  # not retried: retrying cannot help


# ---------------------------------------------------------------------------------------------
# Bad input: refused before anything runs or changes


def test_bad_input_is_refused_before_anything_changes(api, served, workspace, env, rerun):
    _dvc(
        workspace,
        env,
        "remote",
        "add",
        "--local",
        "unmounted",
        str(workspace / "params.yaml" / "store"),
    )
    before = _snapshot(workspace)
    for overrides, fragment in [
        (["train.nope=1"], "train.nope"),
        (["train.max_epochs=zero"], "train.max_epochs"),
        (["orchestrate.remote=unmounted"], "DVC remote 'unmounted' .* is unreachable"),
    ]:
        result = run_flow(workspace, *overrides, env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert re.search("Pipeline not started: .*" + fragment, result.stderr), result.stderr
        assert "Pipeline summary" not in result.stdout + result.stderr
        assert _snapshot(workspace) == before, overrides

    # The same through the server: the flow run fails before it touches anything.
    run = _wait_for(api, _create_run(api, "pipeline/by-hand", {"overrides": ["train.nope=1"]}))
    assert run["state"]["type"] == "FAILED"
    assert run["state"]["name"] == "NotStarted"
    assert "train.nope" in run["state"]["message"]
    assert _task_states(api, run["id"]) == {}
    assert _snapshot(workspace) == before


# ---------------------------------------------------------------------------------------------
# Beyond one machine: the same deployments on a work pool, run by a worker


def test_deployments_on_a_work_pool_run_on_its_worker(api, served, workspace, env, base, rerun):
    """What a GPU box does (`orchestrate.work_pool`), here with a process worker on CPU."""
    served.send_signal(signal.SIGINT)  # the pool takes the deployments over from `serve`
    create_pool = subprocess.Popen(
        [sys.executable, "-m", "prefect", "work-pool", "create", "gpu", "--type", "process"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    served.wait(30)
    # Stopping `make schedule` pauses its schedule: no nightly run piles up while nobody serves.
    assert httpx.get(f"{api}/deployments/name/pipeline/nightly").json()["paused"]
    assert create_pool.wait(120) == 0
    registered = subprocess.run(
        [sys.executable, "-m", "flows.deploy", "--pool", "gpu"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr
    nightly = httpx.get(f"{api}/deployments/name/pipeline/nightly").json()
    assert nightly["work_pool_name"] == "gpu"
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

    run_id = _create_run(api, "pipeline/nightly")
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu", "--run-once"],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    run = _wait_for(api, run_id, timeout=60)
    assert run["state"]["type"] == "COMPLETED", worker.stdout + worker.stderr
    assert "data source unchanged" in run["state"]["message"]
