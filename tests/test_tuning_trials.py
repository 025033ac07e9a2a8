"""Tuning trials that end: a timeout that kills a trial's whole process tree, and a heartbeat so
that a study resumed after its flow was killed marks FAIL the trials left RUNNING (issue 14).

The storage tests use a tiny SQLite study and a real process killed with SIGKILL; the timeout
test runs a real ``dvc exp run --temp`` whose stage hangs, in a throw-away repository. Seconds
each: nothing is trained.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from components.config import ParamsError, load_params, parse_params, read_params_file
from components.trial import open_storage
from components.tuning import study as tuning
from components.tuning.trials import run_bounded, run_trial
from tests.conftest import REPO_ROOT

# A flow's trial: asked, its heartbeat kept every 0.2 s, then the flow is killed (SIGKILL).
DOOMED_FLOW = """
import sys, time, optuna
from components.trial import open_storage
from components.tuning.study import heartbeat
storage = open_storage(sys.argv[1], heartbeat_interval=1, grace_period=1)
study = optuna.load_study(study_name="s", storage=storage)
trial = study.ask()
with heartbeat(study, trial, every=0.2):
    print(trial.number, flush=True)
    time.sleep(120)
"""


def _states(study) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def test_a_resumed_study_fails_the_trials_a_killed_flow_left_running(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="s", storage=storage)
    doomed = subprocess.Popen(
        [sys.executable, "-c", DOOMED_FLOW, url], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    killed = int(doomed.stdout.readline())
    time.sleep(0.5)  # a few heartbeats
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    with pytest.warns(UserWarning, match="Heartbeat"):
        alive = study.ask()  # another flow's trial, still running: its heartbeat stays fresh
    with tuning.heartbeat(study, alive, every=0.2):
        time.sleep(2.5)  # past the killed trial's grace period
        assert _states(study)[killed] == "RUNNING"  # what a resumed study found, forever
        assert tuning.fail_stale_trials(study, trial_timeout_seconds=600) == [killed]
        states = _states(study)
        assert states[killed] == "FAIL" and states[alive.number] == "RUNNING"
    frozen = study.get_trials(deepcopy=False)[killed]
    assert "left RUNNING by a flow that stopped" in frozen.user_attrs["reason"]
    assert tuning.fail_stale_trials(study, trial_timeout_seconds=600) == []  # once


def test_a_trial_without_heartbeat_older_than_a_trial_may_run_is_failed(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="s", storage=storage)
    with pytest.warns(UserWarning, match="Heartbeat"):
        legacy = study.ask()  # left by a flow that kept no heartbeat (an older version)
    assert tuning.fail_stale_trials(study, trial_timeout_seconds=60) == []  # young: may be alive
    time.sleep(2.2)
    assert tuning.fail_stale_trials(study, trial_timeout_seconds=1) == [legacy.number]
    assert _states(study)[legacy.number] == "FAIL"


def test_the_flow_opens_the_study_with_a_heartbeat(tmp_path):
    tune = load_params(REPO_ROOT / "params.yaml").tune
    url = tuning.storage_url(tmp_path, tune)
    study = tuning.open_study(url, tune, create=True)
    rdb = study._storage._backend  # Optuna wraps the RDB storage in a cache
    assert rdb.heartbeat_interval == tuning.HEARTBEAT_SECONDS
    assert rdb.grace_period == tuning.GRACE_SECONDS


# -- the timeout ---------------------------------------------------------------------------

SPAWNS_A_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int, within: float = 5.0) -> bool:
    """Whether the process is dead (or a zombie) within ``within`` seconds: a killed process
    takes a moment to exit."""
    deadline = time.monotonic() + within
    while True:
        try:
            if psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_a_command_past_its_timeout_is_killed_with_its_children(tmp_path):
    started = time.monotonic()
    command = [sys.executable, "-c", SPAWNS_A_CHILD]
    code, output = run_bounded(command, tmp_path, dict(os.environ), 2)
    assert code is None and time.monotonic() - started < 15
    grandchild = int(output.split()[0])
    assert _gone(grandchild), "the command's own child outlived the timeout"
    code, output = run_bounded([sys.executable, "-c", "print('done')"], tmp_path, {}, 30)
    assert (code, output) == (0, "done\n")


HANGING_STAGE = """stages:
  evaluate:
    cmd: python -c "import os, time; open('{pid}', 'w').write(str(os.getpid())); time.sleep(300)"
"""


def _git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True
    )


def _dvc_repo(root: Path, files: dict[str, str]) -> None:
    """A git + DVC repository at ``root`` holding ``files``, committed."""
    root.mkdir()
    _git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    for name, text in files.items():
        (root / name).write_text(text)
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "init")


def test_a_trial_whose_dvc_exp_run_hangs_is_killed_and_failed(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    pid_file = tmp_path / "stage.pid"
    _git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "params.yaml").write_bytes((REPO_ROOT / "params.yaml").read_bytes())
    (root / "dvc.yaml").write_text(HANGING_STAGE.format(pid=pid_file))
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "init")

    tune = load_params(root / "params.yaml").tune.model_copy(
        update={"study_name": "hang", "trial_timeout_seconds": 12.0, "trial_overrides": ()}
    )
    url = tuning.storage_url(root, tune)
    tuning.open_study(url, tune, create=True)
    started = time.monotonic()
    row = run_trial(root, url, tune, "", logging.getLogger("test"))
    seconds = time.monotonic() - started

    assert row["state"] == "FAIL" and "timed out" in row["reason"], row
    assert "tune.trial_timeout_seconds" in row["reason"]
    assert seconds < 12 + 15, f"the trial took {seconds:.0f} s"
    assert pid_file.is_file(), "the stage never started: raise the timeout"
    assert _gone(int(pid_file.read_text())), "the trial's stage outlived its timeout"
    [trial] = tuning.open_study(url, tune).get_trials()
    assert trial.state.name == "FAIL" and "timed out" in trial.user_attrs["reason"]


# ingest -> validate (a `cache: false` verdict, like ours) -> train; validate counts its runs.
DATA_THEN_TRIAL = """stages:
  ingest:
    cmd: python write.py data/x.txt
    deps: [write.py]
    outs: [data/x.txt]
  validate:
    cmd: python write.py metrics/validation.json {runs}
    deps: [data/x.txt]
    outs:
      - metrics/validation.json:
          cache: false
  train:
    cmd: python write.py models/m.txt
    deps: [metrics/validation.json]
    outs: [models/m.txt]
"""
WRITE = """import pathlib, sys
out = pathlib.Path(sys.argv[1])
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("{}")
for counter in sys.argv[2:]:
    with open(counter, "a") as runs:
        runs.write("run\\n")
"""


def test_data_prepared_once_is_what_every_trial_copy_finds_without_autostage(tmp_path):
    """prepare_data stages dvc.lock and the verdict itself: in a repository without DVC's
    core.autostage, a trial's `dvc exp run --temp` copy still finds validate done."""
    from components.stage import venv_env
    from components.tuning.trials import prepare_data

    root, runs = tmp_path / "repo", tmp_path / "validate-runs.txt"
    _dvc_repo(root, {"dvc.yaml": DATA_THEN_TRIAL.format(runs=runs), "write.py": WRITE})

    said = prepare_data(root, "metrics", timeout=120)
    assert said == "data: ingest, validate ran once here; every trial reuses them"
    staged = subprocess.run(
        ["git", "diff", "--cached", "--name-only"], cwd=root, capture_output=True, text=True
    ).stdout.split()
    assert {"dvc.lock", "metrics/validation.json"} <= set(staged)
    trial = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", "t0"],
        cwd=root, env=venv_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert trial.returncode == 0, trial.stdout + trial.stderr
    assert "Running stage 'train'" in trial.stdout
    assert runs.read_text().splitlines() == ["run"], trial.stdout  # not again in the trial


def test_the_trial_timeout_is_a_checked_param():
    raw = read_params_file(REPO_ROOT / "params.yaml")
    assert raw["tune"]["trial_timeout_seconds"] > 0
    raw["tune"]["trial_timeout_seconds"] = 0
    with pytest.raises(ParamsError, match="tune.trial_timeout_seconds"):
        parse_params(raw)


# -- the storage URL's password ------------------------------------------------------------


def test_a_storage_password_comes_from_the_environment_and_is_never_shown(monkeypatch):
    raw = read_params_file(REPO_ROOT / "params.yaml")
    raw["tune"]["storage"] = "postgresql://tuner:s3cret@db.internal/optuna"
    with pytest.raises(ParamsError, match="tune.storage: .*TUNE_STORAGE_PASSWORD"):
        parse_params(raw)
    raw["tune"]["storage"] = "postgresql://tuner@db.internal/optuna"
    tune = parse_params(raw).tune
    monkeypatch.setenv("TUNE_STORAGE_PASSWORD", "s3cret")
    url = tuning.storage_url(Path("."), tune)
    assert url == "postgresql://tuner:s3cret@db.internal/optuna"  # what Optuna connects with
    assert tuning.shown(url) == "postgresql://***@db.internal/optuna"


def test_the_summary_and_report_show_the_storage_without_its_password(tmp_path):
    import optuna

    from components.tuning import page

    tune = load_params(REPO_ROOT / "params.yaml").tune
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    url = "postgresql://tuner:s3cret@db.internal/optuna"
    summary = page.summarise(study, tune, url, 0, 0, [])
    assert summary["storage"] == "postgresql://***@db.internal/optuna"
    written = page.write_report(tmp_path / "tuning.html", tmp_path, summary, [], study, tune)
    for path in (written, tmp_path / "summary.json"):
        assert "s3cret" not in path.read_text() and "tuner" not in path.read_text()
    assert "s3cret" not in page.format_summary(summary, written)


# A train stage with a cached model and a `cache: false` metric, like ours; fit.py counts runs.
TRAIN_STAGE = """stages:
  train:
    cmd: python fit.py {runs}
    deps: [fit.py]
    params: [train]
    outs:
      - models/m.txt
      - metrics/train.json:
          cache: false
"""
FIT = """import json, pathlib, sys, yaml
width = yaml.safe_load(open("params.yaml"))["train"]["width"]
pathlib.Path("models").mkdir(exist_ok=True)
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path("models/m.txt").write_text(f"width {width}\\n")
pathlib.Path("metrics/train.json").write_text(json.dumps({"width": width}))
with open(sys.argv[1], "a") as runs:
    runs.write("run\\n")
"""


def test_the_final_run_takes_the_best_trials_train_stage_or_leaves_the_workspace_alone(tmp_path):
    """take_trained_stage puts an experiment's train stage (its lock entry, its cached model, its
    git-kept metrics) into the workspace, so `dvc repro` with the trial's params trains nothing;
    an experiment that is gone, or whose model the cache lacks, changes nothing."""
    from components.restore import cached_object
    from components.stage import venv_env
    from components.tuning.reuse import take_trained_stage

    root, runs = tmp_path / "repo", tmp_path / "runs.txt"
    _dvc_repo(root, {"dvc.yaml": TRAIN_STAGE.format(runs=runs), "fit.py": FIT,
                     "params.yaml": "train:\n  width: 1\n"})  # fmt: skip

    def dvc(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=venv_env(),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    dvc("repro")
    for name, width in (("t0", 2), ("t1", 3)):
        dvc("exp", "run", "--temp", "-n", name, "-S", f"train.width={width}")
    assert len(runs.read_text().splitlines()) == 3
    workspace = {p: (root / p).read_bytes() for p in ("dvc.lock", "models/m.txt")}

    gone = take_trained_stage(root, "t9")
    assert gone.entry is None and "experiment t9 is not in this repository" in gone.note
    assert "trains the best params again" in gone.note
    # t1's model is no longer in the cache (a `dvc gc`, another clone): nothing is touched
    t1_lock = yaml.safe_load(_show(root, "t1", "dvc.lock"))
    model = next(o for o in t1_lock["stages"]["train"]["outs"] if o["path"] == "models/m.txt")
    cached_object(root, model["md5"]).unlink()
    lacking = take_trained_stage(root, "t1")
    assert lacking.entry is None and "models/m.txt: not in the DVC cache" in lacking.note
    assert {p: (root / p).read_bytes() for p in workspace} == workspace

    taken = take_trained_stage(root, "t0")
    t0_lock = yaml.safe_load(_show(root, "t0", "dvc.lock"))
    assert taken.entry == t0_lock["stages"]["train"]
    assert yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train"] == taken.entry
    assert (root / "models" / "m.txt").read_text() == "width 2\n"
    assert json.loads((root / "metrics" / "train.json").read_text()) == {"width": 2}
    (root / "params.yaml").write_text("train:\n  width: 2\n")  # the final run's params
    assert "didn't change" in dvc("repro")
    assert len(runs.read_text().splitlines()) == 3  # trained nothing
    (root / "params.yaml").write_text("train:\n  width: 4\n")  # other params: it trains
    dvc("repro")
    assert len(runs.read_text().splitlines()) == 4


def _show(root: Path, experiment: str, path: str) -> str:
    from components.tuning.trials import experiment_ref

    shown = subprocess.run(["git", "show", f"{experiment_ref(root, experiment)}:{path}"],
                           cwd=root, capture_output=True, text=True, check=True)  # fmt: skip
    return shown.stdout
