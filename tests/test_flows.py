"""Fast checks of the orchestration pieces: experiment names, the workspace lock, retries, the
``orchestrate`` params and the remote checks. The real server, runs and clones are in
test_orchestration.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect.states import Completed, Failed

from components.config import ParamsError, parse_params, read_params_file
from flows.experiments import (
    PreflightError,
    check_dvc_remote,
    check_git_remote,
    experiment_name,
)
from flows.pipeline import STAGE_FAILED, _retry_unless_the_stage_said_why
from flows.workspace_lock import WorkspaceBusy, lock_path, workspace_lock
from tests.conftest import REPO_ROOT


def _is_valid_exp_ref(name: str) -> bool:
    ref = f"refs/exps/ab/cdef0123/{name}"
    return subprocess.run(["git", "check-ref-format", ref], check=False).returncode == 0


@pytest.mark.parametrize(
    ("run_name", "expected"),
    [
        ("tangerine-lizard", "tangerine-lizard"),  # Prefect's own names pass as they are
        ("nightly run / v2", "nightly-run-v2"),
        ("..weird..name.lock", "weird.name"),
        ("~^:?*[\\", "run"),
    ],
)
def test_experiment_name_is_the_flow_run_name_made_a_valid_ref(run_name, expected):
    name = experiment_name(run_name, "5f0c3a1e-0000-4000-8000-000000000000", taken=set())
    assert name == expected
    assert _is_valid_exp_ref(name)


def test_experiment_name_already_taken_gets_the_run_id():
    name = experiment_name("tangerine-lizard", "5f0c3a1e-aaaa", taken={"tangerine-lizard"})
    assert name == "tangerine-lizard-5f0c3a1e"
    assert _is_valid_exp_ref(name)


def test_second_holder_is_refused_with_the_first_named(tmp_path: Path):
    with workspace_lock(tmp_path, run="first-run"):
        with (
            pytest.raises(WorkspaceBusy, match="pipeline run 'first-run'") as exc,
            workspace_lock(tmp_path, run="second-run"),
        ):
            pass
        assert f"pid {os.getpid()}" in str(exc.value)
    with workspace_lock(tmp_path, run="third-run"):  # released on exit
        pass


def test_second_holder_waits_when_told_to(tmp_path: Path):
    told = []
    held = threading.Event()

    def hold_briefly():
        with workspace_lock(tmp_path, run="first-run"):
            held.set()
            time.sleep(0.6)

    thread = threading.Thread(target=hold_briefly)
    thread.start()
    held.wait(5)
    started = time.monotonic()
    with workspace_lock(
        tmp_path, run="second-run", wait_seconds=10, on_wait=told.append, poll_seconds=0.05
    ):
        waited = time.monotonic() - started
    thread.join()
    assert 0.2 < waited < 5
    assert told and "first-run" in told[0]


def test_lock_of_a_killed_holder_is_free_at_once(tmp_path: Path):
    """SIGKILL leaves no stale lock: the kernel drops a flock with its holder."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path\n"
            "from flows.workspace_lock import workspace_lock\n"
            f"with workspace_lock(Path({str(tmp_path)!r}), run='doomed'):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy, match="doomed"), workspace_lock(tmp_path, run="early"):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with workspace_lock(tmp_path, run="after-the-kill"):
            assert lock_path(tmp_path).is_file()
    finally:
        holder.kill()


def test_only_transient_failures_are_retried():
    assert not _retry_unless_the_stage_said_why(None, None, Failed(name=STAGE_FAILED))
    assert _retry_unless_the_stage_said_why(None, None, Failed(message="train: exited -9"))
    assert _retry_unless_the_stage_said_why(None, None, Completed())


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("retries", -1, "orchestrate.retries"),
        ("schedule_cron", "every night", "orchestrate.schedule_cron"),
        ("schedule_timezone", "Mars/Olympus", "orchestrate.schedule_timezone"),
        ("lock_wait_seconds", "forever", "orchestrate.lock_wait_seconds"),
        ("save_experiment", "sometimes", "orchestrate.save_experiment"),
    ],
)
def test_bad_orchestrate_values_are_named(key, value, fragment):
    raw = read_params_file(REPO_ROOT / "params.yaml")
    raw["orchestrate"][key] = value
    with pytest.raises(ParamsError, match=fragment.replace(".", r"\.")):
        parse_params(raw)


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dvc-repo")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "a-file").write_text("not a folder")
    with (root / ".dvc" / "config").open("a") as fh:
        fh.write(
            f"['remote \"fine\"']\n    url = {root.parent / 'remote-store'}\n"
            f"['remote \"blocked\"']\n    url = {root / 'a-file' / 'store'}\n"
        )
    return root


def test_local_remote_is_created_on_first_use(dvc_repo: Path):
    assert "fine (" in check_dvc_remote(dvc_repo, "fine")
    assert (dvc_repo.parent / "remote-store").is_dir()


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("nowhere", "no DVC remote named 'nowhere'"),
        ("blocked", "DVC remote 'blocked' .* is unreachable"),
        ("", "no DVC remote to push to"),  # dvc init gives no default remote
    ],
)
def test_missing_or_unreachable_remote_is_named(dvc_repo: Path, name: str, fragment: str):
    with pytest.raises(PreflightError, match=fragment):
        check_dvc_remote(dvc_repo, name)


def test_missing_git_remote_is_named(dvc_repo: Path):
    with pytest.raises(PreflightError, match="no git remote named 'upstream'"):
        check_git_remote(dvc_repo, "upstream")
