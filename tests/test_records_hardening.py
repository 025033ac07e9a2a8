"""Records that no failure or second writer can corrupt (issue 14, "Records and runs").

Two promotions at once are both recorded, in order; ``dvc exp apply`` of an older run does not
change the champion; a bento is imported only when the record's hash says it is the one; every
record and metric file is written whole or not at all; ``paths.*`` cannot point DVC at files it
would delete; credentials in URLs never reach a message. Each test takes seconds: the bentos are
store entries made by hand (the store only reads ``bento.yaml``), nothing is trained.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components import champion as champ
from components import promote
from components.stage import StageError, redact, write_json, write_text
from tests.conftest import REPO_ROOT

VERSIONS = ("r00000000000a", "r00000000000b", "r00000000000c")


def fake_store_bento(home: Path, tag: str) -> None:
    """A bento in the store at ``home``, as far as ``bentoml.bentos.get`` looks: its bento.yaml."""
    name, version = tag.split(":")
    folder = home / "bentos" / name / version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bento.yaml").write_text(
        f"service: svc:Svc\nname: {name}\nversion: {version}\nbentoml_version: 1.4.39\n"
        "creation_time: '2026-01-01T00:00:00+00:00'\nlabels: {}\nmodels: []\n"
    )


def run_entry(version: str, **changes) -> champ.RunRecord:
    fields = {
        "run": version,
        "bento_tag": f"tiny:{version}",
        "archive": f"artefacts/tiny-{version}.bento",
        "archive_md5": "0" * 32,
        "model": "tiny:int8-000000000000",
        "model_sha256": "0" * 64,
        "served_variant": "int8",
        "class_names": ["a", "b"],
        "input_shape": [1, 2, 2],
        "test_split": champ.SplitInfo(sha256="0" * 64, examples=2),
        "metrics": {"accuracy": 0.5},
        "packaged_at": "2026-01-01T00:00:00Z",
    } | changes
    return champ.RunRecord(**fields)


def three_runs(path: Path) -> champ.ChampionRecord:
    """A record of three packaged runs, the first one the champion."""
    first = VERSIONS[0]
    record = champ.ChampionRecord(
        champion=first, lineage=[first], runs={v: run_entry(v) for v in VERSIONS}
    )
    champ.save_record(path, record)
    return record


# -- 7: two promotions at once ----------------------------------------------------------------

PROMOTER = """
import sys, time
from pathlib import Path
from components import promote
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.002)
print(promote.promote_by_hand(Path(sys.argv[1]), sys.argv[3]), flush=True)
"""


def test_two_promotions_started_at_once_are_both_recorded_in_order(tmp_path):
    home = tmp_path / "bentoml"
    for version in VERSIONS:
        fake_store_bento(home, f"tiny:{version}")
    path = tmp_path / "deploy" / "champion.json"
    three_runs(path)
    go = tmp_path / "go"
    env = {**os.environ, "BENTOML_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}
    # Two real processes, released together: each loads the record, imports bentoml and the
    # bento (the slow part), then saves. Without a lock the second save drops the first.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROMOTER, str(path), str(go), version],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for version in VERSIONS[1:]
    ]
    time.sleep(1.5)  # both started and waiting on the go file (python + pydantic imported)
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs

    record = json.loads(path.read_text())  # valid JSON, whole
    promotions = [e for e in record["events"] if e["action"] == "promote"]
    assert sorted(e["run"] for e in promotions) == list(VERSIONS[1:]), record["events"]
    first, second = promotions
    # In order: the second promotion started from the first one's result.
    assert first["previous"] == VERSIONS[0] and second["previous"] == first["run"]
    assert record["lineage"] == [VERSIONS[0], first["run"], second["run"]]
    assert record["champion"] == second["run"]
    assert champ.load_record(path).champion == second["run"]
    assert not list(path.parent.glob("*.tmp")), "a temporary file was left behind"


def test_a_change_waits_for_the_lock_and_says_who_to_wait_for(tmp_path):
    path = tmp_path / "champion.json"
    three_runs(path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from components import champion as c\n"
            "with c.record_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)",
            str(path),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        busy = pytest.raises(StageError, match="being changed by another promotion or rollback")
        with busy, champ.record_lock(path, timeout=0.5):
            pass
        assert 0.4 < time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
    with champ.record_lock(path, timeout=5):  # a killed holder's lock is free again
        pass


def test_saves_use_unique_temporary_files_and_leave_none(tmp_path):
    path = tmp_path / "champion.json"
    record = three_runs(path)
    # A stale temporary file of the old fixed name (another writer's) is never written through.
    stale = path.with_name(path.name + ".tmp")
    stale.write_text("another writer's half")
    champ.save_record(path, record)
    assert stale.read_text() == "another writer's half"
    assert champ.load_record(path) == record
    assert {p.name for p in tmp_path.iterdir()} == {
        "champion.json",
        "champion.json.tmp",
        ".champion.json.last",
        ".champion.json.lock",
    }


# -- 8: `dvc exp apply` of an older run puts an older record back ------------------------------


def test_a_record_put_back_to_an_older_state_does_not_change_the_champion(tmp_path, caplog):
    path = tmp_path / "deploy" / "champion.json"
    record = three_runs(path)
    older = path.read_bytes()  # what an experiment saved at this point holds
    promote._promote(record, VERSIONS[1], "hand", "promoted by hand")
    champ.save_record(path, record)
    path.write_bytes(older)  # `dvc exp apply <that experiment>` checks the old file out

    assert champ.load_record(path).champion == VERSIONS[1]
    assert "put back to an older state" in caplog.text
    assert json.loads(path.read_text())["champion"] == VERSIONS[1]  # written back

    # A record that went forward elsewhere (a teammate's promotion, pulled from git) is the
    # truth, not the copy kept here.
    other = champ.load_record(path)
    promote._promote(other, VERSIONS[2], "hand", "a teammate's promotion")
    path.write_text(json.dumps(other.model_dump(mode="json")))
    assert champ.load_record(path).champion == VERSIONS[2]


def test_dvc_exp_apply_in_a_fresh_clone_does_not_change_the_champion(tmp_path, caplog):
    """A clone has no copy of the last record written (it is git-ignored): after a real `dvc
    exp apply` of an experiment saved before a promotion, the record git's HEAD commits is the
    newer state, and the champion stays its champion."""
    from tests.helpers import GIT

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}  # fmt: skip

    def run(*command: str) -> None:
        subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)

    path = tmp_path / "deploy" / "champion.json"
    run(*GIT, "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    (tmp_path / ".gitignore").write_text("deploy/.champion.json.*\n")
    record = three_runs(path)  # champion VERSIONS[0]
    run(*GIT, "add", "-A")
    run(*GIT, "commit", "-qm", "first champion")
    run(sys.executable, "-m", "dvc", "exp", "save", "-n", "before-promotion")
    promote._promote(record, VERSIONS[1], "hand", "promoted by hand")
    champ.save_record(path, record)
    run(*GIT, "commit", "-qam", "promoted")
    champ.last_written_file(path).unlink()  # as a fresh clone has it
    run(sys.executable, "-m", "dvc", "exp", "apply", "before-promotion")
    assert json.loads(path.read_text())["champion"] == VERSIONS[0]  # the experiment's record

    assert champ.load_record(path).champion == VERSIONS[1]
    assert "put back to an older state" in caplog.text
    assert "as recorded in git HEAD's champion.json" in caplog.text
    assert json.loads(path.read_text())["champion"] == VERSIONS[1]  # written back


def test_the_record_copy_and_lock_are_ignored_by_git(tmp_path):
    for name in (".champion.json.last", ".champion.json.lock"):
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", f"deploy/{name}"], cwd=REPO_ROOT, check=False
        )
        assert ignored.returncode == 0, f"deploy/{name} is not git-ignored"


def test_the_reproduce_recipe_says_the_champion_stays():
    doc = (REPO_ROOT / "docs" / "gates-and-champion.md").read_text()
    assert "dvc exp apply" in doc and ".champion.json.last" in doc


# -- 11: a bento is imported only when the record's hash says it is the one --------------------


def test_a_record_without_the_archive_hash_imports_nothing(tmp_path):
    archive = tmp_path / "artefacts" / "tiny-r00000000000d.bento"
    archive.parent.mkdir()
    archive.write_bytes(b"not a bento at all")  # whatever file happens to be there
    run = run_entry("r00000000000d", archive="artefacts/tiny-r00000000000d.bento", archive_md5=None)
    with pytest.raises(StageError, match="no archive_md5 to check an archive against"):
        champ.ensure_bento(run, tmp_path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"archive_md5": "../../../../etc/passwd"}, "not an MD5"),
        ({"run": "../../outside"}, "not a bento version"),
        ({"run": "r0000000000zz"}, "not a bento version"),
    ],
    ids=["md5-path", "run-path", "run-not-hex"],
)
def test_the_run_and_the_hash_are_checked_before_joining_them_into_paths(
    tmp_path, changes, message
):
    archive = tmp_path / "a.bento"
    archive.write_bytes(b"x")
    fields = {"archive": str(archive), "archive_md5": champ.md5_file(archive)} | changes
    with pytest.raises(StageError, match=message):
        champ.ensure_bento(run_entry("r00000000000e", **fields), tmp_path)


# -- 10: every record and metric file is written whole or not at all ---------------------------


def test_a_reader_of_the_old_file_never_sees_half_of_the_new_one(tmp_path):
    path = tmp_path / "metrics" / "gate.json"
    write_json(path, {"verdict": "old " * 1000})
    with path.open() as reader:
        write_json(path, {"verdict": "new"})
        # Replaced, not rewritten in place: the old file is still whole for its reader.
        assert json.loads(reader.read())["verdict"].startswith("old")
    assert json.loads(path.read_text()) == {"verdict": "new"}
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    write_text(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    assert [p.name for p in path.parent.iterdir()] == ["gate.json"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_the_metric_and_record_writers_replace_their_files(tmp_path):
    from components import evaluate, gate
    from components.tuning import page

    per_class = {"a": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}}
    rows = [{"number": 0, "state": "COMPLETE"}]
    writers = {
        "per_class.csv": lambda p: evaluate.write_per_class_csv(p, per_class),
        "predictions.csv": lambda p: evaluate.write_predictions_csv(p),
        "confusion.csv": lambda p: evaluate.write_confusion_csv(p, [0], [1], ["a", "b"]),
        "compression.csv": lambda p: gate.write_compression_csv(p, _NoVariants()),
        "tuning/trials.csv": lambda p: page.write_table(rows, p.parent),
        "champion.json": lambda p: champ.save_record(p, champ.ChampionRecord()),
    }
    for name, write in writers.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("old\n")
        with path.open() as reader:
            write(path)
            assert reader.read() == "old\n", f"{name} was rewritten in place"
        assert path.read_text() != "old\n"


class _NoVariants:
    variants: dict = {}


# Files the stages and flows write in place on purpose (not records, metrics or reports): each
# with its reason. Anything else goes through components/stage.py write_text / write_json.
IN_PLACE_ALLOWED = {
    "components/stage.py": "the atomic writer itself",
    "components/bento_build.py": "a scratch folder bentoml build reads, deleted afterwards",
    "components/ensemble.py": "model files copied into a scratch folder for the ensemble",
    "components/overrides.py": "params.yaml: its own temporary file, read back, then replaced",
    "flows/experiments.py": "a probe file that checks the DVC remote folder is writable",
    "components/shards.py": "shards and index written in a scratch folder, moved in place whole",
    # One definition, not its whole module: the rest of components/dataset.py stays checked.
    "components/dataset.py::SeriesRowsWriter": "a series split's .npy files written in a "
    "scratch folder, moved in place whole",
}
IN_PLACE_CALLS = ("write_text", "write_bytes")


def _in_place_writes(path: Path) -> list[str]:
    found = []
    module = path.relative_to(REPO_ROOT).as_posix()
    for top in ast.parse(path.read_text()).body:
        if f"{module}::{getattr(top, 'name', '')}" not in IN_PLACE_ALLOWED:
            found += _in_place_calls(path, top)
    return found


def _in_place_calls(path: Path, tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if isinstance(func, ast.Attribute) and name in IN_PLACE_CALLS:
            found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} .{name}()")
        if name == "open":
            modes = [a.value for a in node.args if isinstance(a, ast.Constant)]
            modes += [k.value.value for k in node.keywords if k.arg == "mode"
                      and isinstance(k.value, ast.Constant)]  # fmt: skip
            if any(isinstance(m, str) and ("w" in m or "a" in m) for m in modes):
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} open({modes[0]!r})")
    return found


def test_no_stage_or_flow_writes_a_file_in_place():
    files = sorted((REPO_ROOT / "components").rglob("*.py")) + sorted(
        (REPO_ROOT / "flows").rglob("*.py")
    )
    offenders = [
        hit
        for path in files
        if path.relative_to(REPO_ROOT).as_posix() not in IN_PLACE_ALLOWED
        for hit in _in_place_writes(path)
    ]
    assert not offenders, (
        "written in place (a kill mid-write leaves half a file): use components.stage.write_text "
        "or write_json: " + ", ".join(offenders)
    )


# -- 5: credentials in URLs never reach a message ---------------------------------------------


@pytest.mark.parametrize(
    "text, shown",
    [
        ("postgresql://tuner:s3cret@db.internal:5432/optuna", "postgresql://***@db.internal:5432/optuna"),
        ("remote 'team' (https://user:pw@dav.example/dvc) is unreachable: 401 for https://user:pw@dav.example/dvc/x",
         "remote 'team' (https://***@dav.example/dvc) is unreachable: 401 for https://***@dav.example/dvc/x"),
        ("azure://box/dvc?sv=2020&sig=abc123 refused", "azure://box/dvc?*** refused"),
        ("https://ghp_token@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
        ("s3://bucket/path and /a/b", "s3://bucket/path and /a/b"),
    ],
    ids=["password", "in-a-reason", "query-token", "token-user", "sqlite", "no-secret"],
)  # fmt: skip
def test_credentials_in_urls_are_redacted(text, shown):
    assert redact(text) == shown
    assert "s3cret" not in redact(text) and "abc123" not in redact(text)


# -- 9: paths.* cannot point DVC at what git keeps --------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("paths.artefacts_dir=deploy", r"paths.artefacts_dir \(deploy\) and paths.champion_file"),
        ("paths.artefacts_dir=docs", r"paths.artefacts_dir: 'docs' holds files git tracks"),
        ("paths.reports_dir=components", r"paths.reports_dir: 'components' holds files git"),
        ("paths.model_dir=/tmp/models", r"paths.model_dir: '/tmp/models' must be relative"),
        ("paths.raw_dir=../elsewhere", r"paths.raw_dir: '../elsewhere' must name a place inside"),
        ("paths.model_dir=.", r"paths.model_dir: '.' is the whole folder"),
        ("paths.checkpoint_dir=models/checkpoints", r"paths.model_dir .* paths.checkpoint_dir"),
        ("paths.champion_file=artefacts/champion.json", r"paths.artefacts_dir .* overlap"),
    ],
    ids=["deploy", "docs", "code", "absolute", "outside", "root", "nested", "record"],
)
def test_paths_that_dvc_would_delete_with_files_git_keeps_are_refused(override, message):
    from components.config import ParamsError, check_repository_paths
    from components.overrides import check_overrides
    from flows.pipeline import params_with_overrides

    with pytest.raises(ParamsError, match=message):
        check_overrides([override], REPO_ROOT / "params.yaml")  # parse: overlap, the root
        check_repository_paths(params_with_overrides(REPO_ROOT, [override]).paths, REPO_ROOT)


def test_the_repository_paths_as_shipped_pass():
    from components.config import check_repository_paths, load_params

    check_repository_paths(load_params(REPO_ROOT / "params.yaml").paths, REPO_ROOT)


def test_the_pipeline_refuses_such_paths_before_anything_runs(capsys):
    from flows import pipeline

    before = (REPO_ROOT / "params.yaml").read_bytes()
    code = pipeline.main(["--root", str(REPO_ROOT), "--set", "paths.artefacts_dir=deploy"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Pipeline not started: " in err
    assert "paths.artefacts_dir (deploy) and paths.champion_file (deploy/champion.json)" in err
    assert (REPO_ROOT / "params.yaml").read_bytes() == before


def test_the_by_hand_deployment_takes_no_root_parameter():
    import inspect

    from components.config import load_params
    from flows import deploy

    # A run triggered with parameters must not point the pipeline at another folder.
    assert "root" not in inspect.signature(deploy.pipeline_here.fn).parameters
    for spec in deploy.deployment_specs(load_params(REPO_ROOT / "params.yaml")):
        assert "root" not in spec["parameters"], spec["name"]
    assert deploy.REPOSITORY == REPO_ROOT


# -- 5: a DVC remote's credentials never reach the preflight message ---------------------------


def test_an_unreachable_remote_is_named_without_its_credentials(tmp_path):
    from flows.experiments import PreflightError
    from flows.pipeline import preflight

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_bytes((REPO_ROOT / name).read_bytes())
    (tmp_path / ".dvc" / "config").write_text(
        "[core]\n    remote = team\n['remote \"team\"']\n"
        "    url = ssh://tuner:s3cret@127.0.0.1:9/dvc?token=t0ken\n"
    )  # the backend's error (here: no dvc-ssh) repeats the URL too
    with pytest.raises(PreflightError) as refused:
        preflight(tmp_path, [])
    said = str(refused.value)
    assert "DVC remote 'team'" in said and "unreachable" in said
    assert "s3cret" not in said and "tuner" not in said and "t0ken" not in said
    assert "ssh://***@127.0.0.1:9/dvc?***" in said
