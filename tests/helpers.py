"""What several test modules need: a fresh project repository, a free port, a ready server."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from components.overrides import apply_overrides
from tests.conftest import REPO_ROOT

# What a clone of the project holds that the pipeline needs (not tests, docs or state).
PROJECT_FILES = (
    "components", "flows", "deploy", "dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore",
)  # fmt: skip
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def flatten(overrides: dict) -> list[str]:
    """``{section: {key: value}}`` as ``section.key=<json>`` overrides."""
    return [
        f"{section}.{key}={json.dumps(value)}"
        for section, values in overrides.items()
        for key, value in values.items()
    ]


def project_repo(
    root: Path,
    remote: Path,
    write_data: Callable[[Path], None],
    overrides: list[str],
    edit_params: Callable[[Path], None] | None = None,
) -> Path:
    """A fresh clone-like repository at ``root``: our code, git, DVC with the project's own
    .dvc/config (its default remote redirected to ``remote``), the data ``write_data`` puts
    into data/external/, params.yaml with ``overrides``; committed once."""
    for name in PROJECT_FILES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy(src, root / name)
    # A fresh start: the repository's own champion record (if any) is another data set's.
    (root / "deploy" / "champion.json").unlink(missing_ok=True)
    (root / "data" / "external").mkdir(parents=True)
    write_data(root / "data" / "external")
    subprocess.run([*GIT, "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    shutil.copy(REPO_ROOT / ".dvc" / "config", root / ".dvc" / "config")
    (root / ".dvc" / "config.local").write_text(f"['remote \"local\"']\n    url = {remote}\n")
    apply_overrides(overrides, root / "params.yaml")
    if edit_params is not None:
        edit_params(root / "params.yaml")
    subprocess.run([*GIT, "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", "init"], cwd=root, check=True)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, server: subprocess.Popen, seconds: float = 90) -> None:
    """Until ``base``/readyz answers 200; fail if the server exits or takes too long."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert server.poll() is None, "the server exited early"
        time.sleep(0.5)
    pytest.fail(f"{base} did not become ready in {seconds:.0f} s")
