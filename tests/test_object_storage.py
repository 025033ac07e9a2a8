"""The DVC remote on S3-compatible storage, for real: moto's S3 server on loopback.

A sharded split (components/shards.py) is tracked by DVC, checked and pushed by the flow's own
preflight and push helpers (flows/experiments.py) to a bucket on the server; a fresh clone
pulls it from there and reads exactly the examples that were written. The secret key lives in
``.dvc/config.local`` (git-ignored): the clone has none until its user gives it one, and no
error message shows it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components.shards import ShardIndex, ShardLoader, write_shards
from flows.experiments import PreflightError, check_dvc_remote, push_data

KEY, SECRET = "pipeline-test", "s3cr3t-never-printed"
BUCKET = "runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 with one bucket; its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=url, aws_access_key_id=KEY,
                              aws_secret_access_key=SECRET, region_name="us-east-1")  # fmt: skip
        client.create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.stop()


def _run(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_COMMITTER_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        env.pop(name, None)  # only what the repository's config says
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _dvc(cwd: Path, *args: str) -> str:
    return _run(cwd, sys.executable, "-m", "dvc", *args)


def _remote(repo: Path, url: str, endpoint: str | None) -> None:
    """What `dvc remote add -d store URL` and `dvc remote modify [--local]` write (each dvc
    command costs seconds of start-up): the endpoint in .dvc/config, the keys in config.local."""
    config = repo / ".dvc" / "config"
    if endpoint is not None:
        config.write_text(f"[core]\n    remote = store\n['remote \"store\"']\n"
                          f"    url = {url}\n    endpointurl = {endpoint}\n")  # fmt: skip
    (repo / ".dvc" / "config.local").write_text(
        f"['remote \"store\"']\n    access_key_id = {KEY}\n    secret_access_key = {SECRET}\n"
    )


def _examples(n: int):
    for i in range(n):
        yield np.full((1, 2, 3), i, np.float32), np.array([i % 3])


def _ids(directory: Path) -> list[int]:
    return [int(v) for x, _ in ShardLoader(directory, 7, shuffle=True, seed=1)
            for v in x[:, 0, 0]]  # fmt: skip


def _new_repo(path: Path):
    from dvc.repo import Repo

    path.mkdir()
    _run(path, "git", "init", "-q")
    return Repo.init(str(path))


def test_a_run_pushed_to_s3_is_pulled_into_a_fresh_clone(tmp_path, s3_endpoint):
    from dvc.repo import Repo

    work = tmp_path / "work"
    repo = _new_repo(work)
    split = work / "data" / "shards" / "train"
    written = write_shards(_examples(300), split, 300, shuffle_seed=0, shard_bytes=37 * 32)
    assert len(written.shards) == 9  # 37 examples of 32 bytes (6 float32, an int64) a shard
    repo.add(str(work / "data" / "shards"))
    repo.close()
    _remote(work, f"s3://{BUCKET}/dvc", s3_endpoint)
    _run(work, "git", "add", "-A")
    _run(work, "git", "commit", "-qm", "a sharded split")
    assert SECRET not in _run(work, "git", "show", "HEAD")  # the key stays out of git

    assert check_dvc_remote(work, "") == f"store (s3://{BUCKET}/dvc)"
    sent = push_data(work, "")
    assert sent == 9 + 3  # the shards, the index, targets.npy and the folder's listing (.dir)

    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(work), str(clone))
    assert not (clone / "data" / "shards").exists()
    assert not (clone / ".dvc" / "config.local").exists()  # no key came with the clone
    _remote(clone, f"s3://{BUCKET}/dvc", None)  # its user's own key
    with Repo(str(clone)) as cloned:
        cloned.pull()
        assert cloned.status() == {}  # everything as the commit says
    pulled = clone / "data" / "shards" / "train"
    assert ShardIndex.read(pulled) == written  # the same shards, by their sha256
    assert _ids(pulled) == _ids(split)  # the same examples, in the same epoch order


def test_a_missing_bucket_or_a_wrong_key_is_named_and_the_secret_never_shown(tmp_path, s3_endpoint):
    work = tmp_path / "work"
    _new_repo(work).close()
    _remote(work, "s3://no-such-bucket/dvc", s3_endpoint)
    with pytest.raises(PreflightError) as err:
        check_dvc_remote(work, "")
    message = str(err.value)
    assert "DVC remote 'store' (s3://no-such-bucket/dvc) is unreachable" in message
    assert "no bucket 'no-such-bucket'" in message and SECRET not in message
