"""One pipeline run at a time per workspace: an OS file lock held for the whole flow run.

DVC's own lock only covers one DVC command; between two stages of a flow run another run could
slip in, apply its overrides to params.yaml and mix two runs in one dvc.lock. So a flow run
holds ``.dvc/tmp/pipeline-run.lock`` from before it touches params.yaml until its experiment is
saved. The lock is ``flock``: the kernel drops it when the holder dies, so a killed run
(SIGKILL, OOM, a reboot) never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

LOCK_FILE = Path(".dvc") / "tmp" / "pipeline-run.lock"


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds this workspace."""


def lock_path(root: Path) -> Path:
    return Path(root) / LOCK_FILE


def params_backup(root: Path) -> Path:
    """Where a run keeps params.yaml as it was before its overrides, while it runs (beside the
    workspace lock, in DVC's git-ignored tmp folder)."""
    return lock_path(root).parent / "params-before-run.json"


def read_holder(root: Path) -> dict:
    """Who holds (or last held) the lock, as the holder wrote it; {} when unknown."""
    try:
        return json.loads(lock_path(root).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another pipeline run"
    parts = [f"pipeline run {holder.get('run', '?')!r}"]
    if holder.get("pid"):
        parts.append(f"pid {holder['pid']}")
    if holder.get("since"):
        parts.append(f"started {holder['since']}")
    return ", ".join(parts)


@contextlib.contextmanager
def workspace_lock(
    root: Path,
    run: str,
    wait_seconds: float = 0,
    on_wait: Callable[[str], None] | None = None,
    poll_seconds: float = 1.0,
) -> Iterator[None]:
    """Hold the workspace for one run, or raise :class:`WorkspaceBusy` naming the holder.

    ``wait_seconds`` 0 refuses at once; otherwise waits up to that long, calling ``on_wait``
    once with the holder's description.
    """
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_seconds
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = describe_holder(read_holder(root))
                if time.monotonic() >= deadline:
                    waited = f" after waiting {wait_seconds:g} s" if wait_seconds else ""
                    raise WorkspaceBusy(
                        f"workspace {Path(root).resolve()} is busy{waited}: {holder} holds it "
                        f"({path}). One run at a time per workspace: wait for it to finish "
                        "(or set orchestrate.lock_wait_seconds to queue behind it)"
                    ) from None
                if on_wait and not told:
                    on_wait(holder)
                    told = True
                time.sleep(poll_seconds)
        record = {
            "run": run,
            "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
