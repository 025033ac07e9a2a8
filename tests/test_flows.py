"""Fast checks of the orchestration pieces: experiment names, the workspace lock, retries, the
``orchestrate`` params and the remote checks. The real server, runs and clones are in
test_orchestration.py."""

from __future__ import annotations

import contextlib
import os
import shutil
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
    Match,
    PreflightError,
    check_dvc_remote,
    check_git_remote,
    commit_not_on_remote,
    experiment_name,
)
from flows.pipeline import STAGE_FAILED, _retry_unless_the_stage_said_why
from flows.workspace_lock import WorkspaceBusy, lock_path, workspace_lock
from tests.conftest import REPO_ROOT
from tests.helpers import GIT


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


def test_a_dvc_lock_file_a_killed_command_left_empty_is_named_with_the_fix(tmp_path: Path):
    """DVC itself only says the JSON is corrupted, on every command; the run is not started."""
    from flows.experiments import check_dvc_lock_file
    from flows.pipeline import preflight

    root = tmp_path / "repo"
    root.mkdir()
    rwlock = root / ".dvc" / "tmp" / "rwlock"
    check_dvc_lock_file(root)  # none yet: fine
    rwlock.parent.mkdir(parents=True)
    rwlock.write_text('{"read": {}, "write": {}}')
    check_dvc_lock_file(root)
    rwlock.write_text("")
    with pytest.raises(PreflightError, match=r"\.dvc/tmp/rwlock is empty or not JSON .*rm "):
        check_dvc_lock_file(root)
    (root / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(PreflightError, match="rwlock is empty"):
        preflight(root, [])


# ---------------------------------------------------------------------------------------------
# Overrides: refused when the chosen model ignores them; applied for one run only


@pytest.fixture
def params_copy(tmp_path: Path) -> Path:
    """The repository's params.yaml and dvc.yaml in a folder of their own."""
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_bytes((REPO_ROOT / name).read_bytes())
    return tmp_path / "params.yaml"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.model=mlp", "train.channels=[8, 16]"], "train.channels: model mlp does not use "
         "it (only cnn does), so this override would change nothing; set train.model=cnn too"),
        (["train.model=gru", "train.channels=[8]"], "train.channels: model gru"),
        (["train.rnn_hidden_size=16"], "train.rnn_hidden_size: model cnn does not use it (only "
         "lstm and gru do)"),
        (["train.model=mlp", "train.rnn_layers=2"], "train.rnn_layers: model mlp"),
    ],
)  # fmt: skip
def test_an_override_the_chosen_model_ignores_is_refused_by_name(params_copy, overrides, fragment):
    from components.overrides import refuse_ignored

    with pytest.raises(ParamsError) as exc:
        refuse_ignored(overrides, params_copy)
    assert fragment in str(exc.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.channels=[8, 16]"],  # params.yaml's model is the cnn
        ["train.model=lstm", "train.rnn_layers=2", "train.rnn_hidden_size=16"],
        ["train.model=mlp", "train.hidden_units=[32]", "train.learning_rate=0.01"],
        ["evaluate.min_accuracy=0.6"],
    ],
)
def test_an_override_the_chosen_model_reads_passes(params_copy, overrides):
    from components.overrides import ignored_by_the_model, refuse_ignored

    refuse_ignored(overrides, params_copy)
    assert ignored_by_the_model(overrides, params_copy) == {}


def test_every_ignored_override_is_named_and_the_run_is_not_started(
    params_copy, monkeypatch, capsys
):
    from components.overrides import ignored_by_the_model
    from flows.pipeline import main

    overrides = ["train.model=mlp", "train.channels=[8]", "train.rnn_layers=3"]
    assert list(ignored_by_the_model(overrides, params_copy)) == [
        "train.channels",
        "train.rnn_layers",
    ]
    before = params_copy.read_bytes()
    monkeypatch.chdir(params_copy.parent)
    args = [a for o in overrides for a in ("--set", o)]
    assert main([*args, "--root", str(params_copy.parent)]) == 2  # before Prefect starts
    err = capsys.readouterr().err
    assert "Pipeline not started: train.channels: model mlp" in err
    assert "train.rnn_layers: model mlp" in err
    assert params_copy.read_bytes() == before


def test_overrides_belong_to_one_run_and_params_yaml_comes_back_byte_for_byte(params_copy):
    from components.overrides import overrides_for_one_run

    before = params_copy.read_bytes()
    backup = params_copy.parent / "backup.json"
    with overrides_for_one_run(["train.max_epochs=2"], params_copy, backup=backup) as run:
        assert run.applied == {"train.max_epochs": 2}
        assert read_params_file(params_copy)["train"]["max_epochs"] == 2
        assert backup.is_file()  # for the next run, should this one be killed
    assert params_copy.read_bytes() == before
    assert not backup.exists()

    with pytest.raises(RuntimeError), overrides_for_one_run(["train.max_epochs=2"], params_copy):
        raise RuntimeError("a stage failed")
    assert params_copy.read_bytes() == before

    # Someone edits params.yaml while the run trains: their edit is never lost.
    with overrides_for_one_run(["train.max_epochs=2"], params_copy) as run:
        edited = params_copy.read_bytes() + b"# an edit during the run\n"
        params_copy.write_bytes(edited)
    assert run.edited and params_copy.read_bytes() == edited


def test_keep_keeps_the_overrides_of_a_run_that_finished_only(params_copy):
    from components.overrides import overrides_for_one_run

    before = params_copy.read_bytes()
    with overrides_for_one_run(["train.max_epochs=2"], params_copy, keep=True):
        pass
    assert read_params_file(params_copy)["train"]["max_epochs"] == 2
    assert b"# " in params_copy.read_bytes()  # comments kept

    params_copy.write_bytes(before)
    with overrides_for_one_run(["train.max_epochs=2"], params_copy, keep=True) as run:
        run.keep = False  # what the flow does when a stage failed
    assert params_copy.read_bytes() == before
    with (
        pytest.raises(KeyboardInterrupt),
        overrides_for_one_run(["train.max_epochs=2"], params_copy, keep=True),
    ):
        raise KeyboardInterrupt
    assert params_copy.read_bytes() == before


KILLED_IN_THE_BLOCK = """
import os, signal, sys
from pathlib import Path
from components.overrides import overrides_for_one_run

params, backup = Path(sys.argv[1]), Path(sys.argv[2])
with overrides_for_one_run(["train.max_epochs=7"], params, backup=backup, run="tangerine-lizard"):
    os.kill(os.getpid(), signal.SIGKILL)  # no finally runs
"""


@pytest.mark.parametrize("edited_since", [False, True])
def test_the_next_run_puts_back_what_a_killed_run_left(params_copy, edited_since):
    from components.overrides import put_back_after_a_killed_run

    before = params_copy.read_bytes()
    backup = params_copy.parent / "backup.json"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_IN_THE_BLOCK, str(params_copy), str(backup)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert read_params_file(params_copy)["train"]["max_epochs"] == 7
    if edited_since:  # someone edited params.yaml by hand since: their edit wins
        params_copy.write_bytes(params_copy.read_bytes() + b"\n# edited\n")
    edited = params_copy.read_bytes()
    said = put_back_after_a_killed_run(backup, params_copy)
    assert "'tangerine-lizard'" in said and "train.max_epochs=7" in said
    if edited_since:
        assert "changed since: left as it is" in said
        assert params_copy.read_bytes() == edited
    else:
        assert said.startswith("params.yaml put back as it was before run 'tangerine-lizard'")
        assert params_copy.read_bytes() == before
    assert not backup.exists()
    assert put_back_after_a_killed_run(backup, params_copy) is None


# ---------------------------------------------------------------------------------------------
# The no-op answered before Prefect starts (flows/noop.py): which command lines it may answer,
# and which Prefect server it records on. Its speed and its verdicts on a real repository are
# tests/test_pipeline_e2e.py's.


@pytest.mark.parametrize(
    ("argv", "plain"),
    [
        ([], True),
        (["--keep-params"], True),  # nothing to keep without --set
        (["--root", "/tmp/ws"], True),
        (["--root=/tmp/ws", "--keep-params"], True),
        (["--set", "train.max_epochs=2"], False),
        (["--keep-params", "--set", "train.max_epochs=2"], False),
        (["--only-if-data-changed"], False),
        (["--help"], False),
        (["--root"], False),  # argparse's error message, from the flow's own parser
        (["--keep"], False),  # argparse's abbreviations: the flow's parser decides
    ],
)
def test_only_a_plain_run_is_answered_before_prefect(argv, plain):
    from flows.noop import plain_run_root

    assert (plain_run_root(argv) is not None) == plain


# Prefect configurations: the environment, and the profiles file written into PREFECT_HOME.
PREFECT_CONFIGS = {
    "nothing": ({}, None),
    "env": ({"PREFECT_API_URL": "http://127.0.0.1:4999/api"}, None),
    "profile": ({}, 'active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "http://h:1/api"\n'),
    "another profile": (
        {"PREFECT_PROFILE": "other"},
        'active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "http://h:1/api"\n'
        '[profiles.other]\nPREFECT_API_URL = "http://h:2/api"\n',
    ),
    "env over profile": (
        {"PREFECT_API_URL": "http://e:3/api"},
        'active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "http://h:1/api"\n',
    ),
    "Prefect's own profile name, no section": ({}, 'active = "local"\n'),
}


def test_the_prefect_server_is_the_one_prefect_itself_would_use(tmp_path):
    """flows/noop.py reads PREFECT_API_URL without importing Prefect: its answers must be
    Prefect's own (asked in one subprocess, a fresh Settings() per configuration)."""
    from flows.noop import prefect_api_url

    ours, cases = {}, {}
    for name, (env, profiles) in PREFECT_CONFIGS.items():
        home = tmp_path / name.replace(" ", "-").replace("'", "")
        home.mkdir()
        if profiles:
            (home / "profiles.toml").write_text(profiles)
        case = {"PREFECT_HOME": str(home), **env}
        cases[name] = case
        ours[name] = prefect_api_url(case, folders=(tmp_path,))
    script = (
        "import json, os, sys\n"
        "from prefect.settings.models.root import Settings\n"
        "answers = {}\n"
        "for name, case in json.loads(sys.argv[1]).items():\n"
        "    for key in ('PREFECT_API_URL', 'PREFECT_PROFILE', 'PREFECT_PROFILES_PATH'):\n"
        "        os.environ.pop(key, None)\n"
        "    os.environ.update(case)\n"
        "    answers[name] = Settings().api.url\n"
        "print(json.dumps(answers))\n"
    )
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    theirs = json.loads(done.stdout.splitlines()[-1])
    assert ours == theirs
    assert ours["env over profile"] == "http://e:3/api" and ours["nothing"] is None


@pytest.mark.parametrize(
    ("files", "env"),
    [
        ({"prefect.toml": '[api]\nurl = "http://h:1/api"\n'}, {}),
        ({".env": "PREFECT_API_URL=http://h:1/api\n"}, {}),
        ({"pyproject.toml": '[tool.prefect.api]\nurl = "http://h:1/api"\n'}, {}),
        ({}, {"PREFECT_API_URL": "https://api.prefect.cloud/api", "PREFECT_API_KEY": "pnu_x"}),
    ],
)
def test_prefect_settings_it_does_not_read_leave_the_run_to_the_flow(tmp_path, files, env):
    """Settings in files of the folder, or credentials: the no-op cannot tell the server (or
    talk to it) cheaply, so the flow runs, with Prefect's own settings."""
    from flows.noop import _CannotTell, prefect_api_url

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(_CannotTell):
        prefect_api_url({"PREFECT_HOME": str(tmp_path), **env}, folders=(tmp_path,))


# The `sh -c` DVC runs a stage with, stood in for by a process that forks the stage (here: a
# process that writes a file a second later) as it is stopped and then ends: the stage is
# orphaned, no longer a child of `dvc repro`, and was seen to write its outputs after the
# flow had put them back.
_SHELL = """
import pathlib, signal, subprocess, sys, os, time
late = sys.argv[1]
def forked_as_stopped(*_):
    subprocess.Popen([sys.executable, "-c",
                      f"import time; time.sleep(1); open({late!r}, 'w').write('late')"])
    os._exit(143)
signal.signal(signal.SIGTERM, forked_as_stopped)
pathlib.Path(late + ".ready").touch()
time.sleep(60)
"""
_DVC = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', *sys.argv[1:]]))"


def test_a_stopped_stage_leaves_no_process_behind_even_one_started_as_it_stopped(tmp_path):
    from flows.pipeline import STAGE_MARK, _marked, _stop

    late, mark = tmp_path / "late.txt", "a-stage-run"
    process = subprocess.Popen(  # as run_stage starts `dvc repro`
        [sys.executable, "-c", _DVC, _SHELL, str(late)],
        env={**os.environ, STAGE_MARK: mark},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not Path(f"{late}.ready").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    _stop(process, mark, seconds=10)
    assert process.returncode is not None
    assert _marked(mark) == set()  # nothing the stage's run started still runs
    time.sleep(1.5)
    assert not late.exists(), "a process the stage started wrote after the flow stopped it"


_TEMPORARY_SERVER = """
import signal, time
import httpx
from components.stage import set_quiet_env
set_quiet_env()  # as the entry points: a start time a loaded machine needs (not Prefect's 20 s)
from flows.experiments import start_temporary_server
from prefect.server.api.server import SubprocessASGIServer
start_temporary_server()
print("started", flush=True)
try:
    time.sleep(60)
except KeyboardInterrupt:
    time.sleep(1)  # as long as the server would take to shut down
    try:
        print(httpx.get(SubprocessASGIServer().api_url + "/health").status_code, flush=True)
    except httpx.ConnectError as exc:
        print(f"server gone: {exc}", flush=True)
"""


def test_ctrl_c_in_a_terminal_leaves_the_temporary_prefect_server_to_the_flow(tmp_path):
    """A terminal's Ctrl-C signals its whole foreground group. The temporary server did stop
    with the flow, and the flow's roll-back then retried for minutes to report to nothing."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    process = subprocess.Popen(
        [sys.executable, "-c", _TEMPORARY_SERVER],
        cwd=REPO_ROOT,
        env={**env, "PREFECT_HOME": str(tmp_path / "prefect")},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a group of its own, as a terminal's foreground job
        # A process started from a background job inherits SIGINT ignored: Ctrl-C's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout.readline().strip() == "started"
        os.killpg(process.pid, signal.SIGINT)
        assert process.stdout.readline().strip() == "200"  # the flow can still report its end
        assert process.wait(30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_make_prefect_server_on_another_port_serves_a_ui_that_calls_that_port(
    tmp_path, prefect_database
):
    """`make prefect-server PREFECT_PORT=N`, as the docs say: the API answers on N, on
    loopback, and the UI's settings send its browser to N's API, not to 4200."""
    import httpx

    from tests.helpers import RECORDING_ONLY, free_port

    shutil.copy(prefect_database, tmp_path / "prefect.db")
    port = free_port()
    env = {
        **os.environ, **RECORDING_ONLY,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
    }  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        ["make", "-s", "--no-print-directory", "prefect-server", f"PREFECT_PORT={port}",
         f"PREFECT_HOME={tmp_path / 'home'}"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).is_success:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "make prefect-server did not answer in 120 s"
            time.sleep(0.5)
        settings = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=10).json()
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
        assert _listening_addresses(port) == {"127.0.0.1"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                continue
            if len(address) == 8:  # IPv4, little-endian bytes
                found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
            else:
                found.add("IPv6 " + address)
    return found


def test_a_matched_commit_the_git_remote_lacks_is_named_with_the_push_to_make(tmp_path):
    """A run matched as a commit reproduces elsewhere only once the commit is on the git remote:
    until it is, the summary says so; an experiment's ref is pushed with the run."""
    remote, clone = tmp_path / "remote.git", tmp_path / "clone"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    subprocess.run(["git", "clone", "-q", str(remote), str(clone)], check=True)
    (clone / "params.yaml").write_text("a: 1\n")
    subprocess.run([*GIT, "add", "-A"], cwd=clone, check=True)
    subprocess.run([*GIT, "commit", "-qm", "run"], cwd=clone, check=True)
    short = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True
    ).stdout.strip()
    matched = Match("commit", short)
    said = commit_not_on_remote(clone, matched, "origin")
    assert said == (
        f"git: commit {short} is on no branch of origin yet: `git push` it, so that other "
        "clones can reproduce this run"
    )
    assert commit_not_on_remote(clone, matched, "") is None  # no git remote configured
    assert commit_not_on_remote(clone, Match("experiment", "lean-hog"), "origin") is None
    subprocess.run(["git", "push", "-q", "origin", "HEAD:main"], cwd=clone, check=True)
    assert commit_not_on_remote(clone, matched, "origin") is None
