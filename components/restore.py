"""Put a failed stage's outputs back as the last good run left them.

DVC deletes a stage's outputs before it runs the command (all but ``persist`` ones), so a
stage that fails would otherwise leave nothing, or half-written files, where the last good
outputs were. :func:`keep_last_good` wraps a stage run: it copies the outputs that are still
there (``persist`` ones) aside when the stage starts, and when the stage fails or is killed it
puts every output back, from that copy or from DVC's cache by the hash ``dvc.lock`` records
for it. ``dvc status`` then tells what is stale.

Only files are read (``dvc.lock`` and the cache folder): the stage runs inside ``dvc repro``,
which holds the repository's lock, so no DVC command may run here.

:func:`run_start` serves the flow's roll-back of a whole failed run (flows/pipeline.py): the
``dvc.lock`` the run started from, and copies of the ``cache: false`` outputs git keeps, which
``dvc checkout`` of that lock does not put back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from components.config import load_yaml

log = logging.getLogger("pipeline")

LOCK_FILE = "dvc.lock"


@dataclass(frozen=True)
class LockedOutput:
    """One output of a stage as ``dvc.lock`` records it."""

    path: Path
    md5: str | None  # "<hex>" for a file, "<hex>.dir" for a folder; None when not hashed


def locked_outputs(root: Path, stage: str) -> list[LockedOutput]:
    """The outputs ``dvc.lock`` records for ``stage`` (none before its first good run)."""
    lock = Path(root) / LOCK_FILE
    if not lock.is_file():
        return []
    try:
        data = load_yaml(lock.read_text()) or {}
    except yaml.YAMLError:
        return []
    entry = (data.get("stages") or {}).get(stage) or {}
    return [LockedOutput(Path(o["path"]), o.get("md5")) for o in entry.get("outs") or []]


def cache_dir(root: Path) -> Path:
    """Where DVC keeps file contents by hash (``cache.dir`` of the DVC config, if set)."""
    import configparser

    for name in ("config.local", "config"):
        config = configparser.ConfigParser()
        try:
            config.read(Path(root) / ".dvc" / name)
        except configparser.Error:
            continue
        if config.has_option("cache", "dir"):
            where = Path(os.path.expanduser(config.get("cache", "dir")))
            # A relative cache.dir is relative to the .dvc folder that holds the config.
            return where if where.is_absolute() else Path(root) / ".dvc" / where
    return Path(root) / ".dvc" / "cache"


def cached_object(root: Path, md5: str) -> Path:
    """The cache file of a hash (DVC 3 layout: files/md5/ab/cdef...)."""
    return cache_dir(root) / "files" / "md5" / md5[:2] / md5[2:]


def not_in_cache(root: Path, lock_text: bytes | str) -> list[str]:
    """The outputs a ``dvc.lock`` records whose contents the DVC cache lacks (a fresh clone
    that pulled nothing has none): ``dvc checkout`` of that lock would delete them."""
    try:
        data = load_yaml(lock_text) or {}
    except yaml.YAMLError:
        return ["dvc.lock is not valid YAML"]
    missing = []
    for entry in (data.get("stages") or {}).values():
        for o in (entry or {}).get("outs") or []:
            if o.get("md5") and cache_gap(root, o["path"], o["md5"]) is not None:
                missing.append(o["path"])
    return missing


def cache_gap(root: Path, path: str, md5: str) -> str | None:
    """What the DVC cache lacks of the output ``path`` recorded as ``md5`` (a file, or a
    directory's listing and files), or None when all of it is there."""
    obj = cached_object(root, md5)
    if not obj.is_file():
        return f"{path}: not in the DVC cache (dvc pull, then dvc checkout)"
    if md5.endswith(".dir"):
        entries = json.loads(obj.read_text())
        missing = [e for e in entries if not cached_object(root, e["md5"]).is_file()]
        if missing:
            return f"{path}: {len(missing)} file(s) not in the DVC cache (dvc pull)"
    return None


def _restore_from_cache(root: Path, out: LockedOutput) -> str | None:
    """Copy ``out`` back from the cache; the reason it could not be, or None."""
    if not out.md5:
        return f"{out.path}: dvc.lock records no hash"
    gap = cache_gap(root, out.path, out.md5)
    if gap is not None:
        return gap
    target = Path(root) / out.path
    obj = cached_object(root, out.md5)
    if not out.md5.endswith(".dir"):
        _remove(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(obj, target)
        return None
    entries = json.loads(obj.read_text())
    _remove(target)
    for entry in entries:
        dest = target / entry["relpath"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached_object(root, entry["md5"]), dest)
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _copy(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest, symlinks=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


@dataclass
class Restored:
    """What :func:`keep_last_good` did: whether it guarded any output, and what it could not
    put back (one line each)."""

    guarded: bool = False
    problems: list[str] = field(default_factory=list)

    def note(self) -> str:
        """The end of a failure line: what became of the outputs."""
        if not self.guarded:
            return ""
        if self.problems:
            return f" [{RESTORED_NOTE}, except: {'; '.join(self.problems)}]"
        return f" [{RESTORED_NOTE}]"


RESTORED_NOTE = "outputs put back as the last good run left them"


@contextmanager
def keep_last_good(stage: str | None, root: Path = Path(".")) -> Iterator[Restored]:
    """Run the body; if it raises (a failure, Ctrl-C, SIGTERM), put ``stage``'s outputs back.

    Does nothing for a stage that ``dvc.lock`` does not know (no good run yet).
    """
    outs = locked_outputs(root, stage) if stage else []
    restored = Restored(guarded=bool(outs))
    problems = restored.problems
    if not outs:
        yield restored
        return
    with tempfile.TemporaryDirectory(prefix=f"last-good-{stage}-", dir=_scratch(root)) as tmp:
        saved: dict[Path, Path] = {}
        for i, out in enumerate(outs):
            here = Path(root) / out.path
            if here.exists():  # persist outputs: DVC leaves them in place when it starts
                saved[out.path] = Path(tmp) / str(i)
                _copy(here, saved[out.path])
        try:
            yield restored
        except BaseException:
            for out in outs:
                try:
                    if out.path in saved:
                        _remove(Path(root) / out.path)
                        _copy(saved[out.path], Path(root) / out.path)
                    else:
                        problem = _restore_from_cache(root, out)
                        if problem:
                            problems.append(problem)
                except OSError as exc:
                    problems.append(f"{out.path}: {exc}")
            raise


def _scratch(root: Path) -> Path:
    """DVC's own scratch folder (inside the repository, so copies stay on one disk)."""
    where = Path(root) / ".dvc" / "tmp"
    where.mkdir(parents=True, exist_ok=True)
    return where


@dataclass(frozen=True)
class RunStart:
    """What a pipeline run found before its first stage, for a roll-back after a failed one:
    ``dvc.lock`` (None before any good run), and a copy of each output it records that no
    ``dvc checkout`` puts back (the ``cache: false`` outputs git keeps: the metrics, the
    headline, the gate verdicts), taken only where the file is what the lock recorded."""

    lock: bytes | None
    kept: dict[str, Path] = field(default_factory=dict)  # the output's path -> its copy

    def put_back_kept(self, root: Path) -> None:
        for path, copy in self.kept.items():
            _remove(Path(root) / path)
            _copy(copy, Path(root) / path)


def _md5(path: Path) -> str:
    """DVC's hash of a file (components.stage.file_digest imports this module: not reused)."""
    import hashlib

    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def run_start(root: Path) -> Iterator[RunStart]:
    """:class:`RunStart` for the run inside the block; its copies are removed after it."""
    lock = Path(root) / LOCK_FILE
    text = lock.read_bytes() if lock.is_file() else None
    if text is None:
        yield RunStart(None)
        return
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError:
        data = {}
    files = {
        out["path"]: out["md5"]
        for entry in (data.get("stages") or {}).values()
        for out in (entry or {}).get("outs") or []
        # a folder's files are DVC's to put back (dvc checkout)
        if out.get("path") and out.get("md5") and not out["md5"].endswith(".dir")
    }
    cached = _git_ignored(root, list(files))
    with tempfile.TemporaryDirectory(prefix="run-start-", dir=_scratch(root)) as tmp:
        kept: dict[str, Path] = {}
        for path, md5 in files.items():
            here = Path(root) / path
            if path in cached or not here.is_file() or _md5(here) != md5:
                continue
            kept[path] = Path(tmp) / str(len(kept))
            _copy(here, kept[path])
        yield RunStart(text, kept)


def _git_ignored(root: Path, paths: list[str]) -> set[str]:
    """The outputs DVC caches: it lists each in a .gitignore, while git keeps the ``cache:
    false`` ones (whose contents may sit in the cache too: ``dvc checkout`` never restores
    them). Without git: none, and every file still as recorded is copied."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "check-ignore", "--stdin", "-z"],
            cwd=root, input="\0".join(paths), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode not in (0, 1):  # 1: none is ignored
        return set()
    return {p for p in done.stdout.split("\0") if p}
