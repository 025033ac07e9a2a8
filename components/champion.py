"""The champion record: which packaged run serves, the runs it can be swapped with, the history.

The record is one small JSON file (``paths.champion_file``, ``deploy/champion.json`` by
default) kept in git, so a fresh clone knows the champion. It is deliberately **not** a DVC
output or dependency of any stage:

- DVC deletes a stage's outputs before running it, and a failed run must never lose the record;
- a promotion or a rollback by hand (``make promote``, ``make rollback``) changes the record,
  and that must not make DVC re-run the pipeline, which would undo the hand's choice.

A *run* is a packaged challenger, named by its bento version (``r`` + 12 hex digits, a hash of
the model and the service): the same model packaged twice is the same run. Each run record
keeps what is needed to compare with it later (what it predicts: the task, data kind, target,
classes, input shape and, for tables and series, the input columns: together its input schema,
:class:`InputSchema`; its test metrics and the fingerprint of the test split they were
measured on; the fingerprint of its input preprocessing) and to serve it again (the bento tag,
and the archive's MD5 to find it in DVC's cache when the BentoML store lost it). A run whose
input schema is not the champion's is never made the champion automatically: its clients would
send what it no longer reads (:func:`schema_changes` says what changed).

The metrics are the task's: ``accuracy``, ``macro_f1`` and ``min_class_recall`` for
classification, ``r2``, ``rmse`` and ``mae`` for regression (each also as ``network_*``: the
uncompressed network's). Records written before tables and sequences existed lack ``task``,
``kind``, ``target`` and ``preprocess_sha256``: they read as image classifiers.

Every change of the record (the promote stage, ``make promote``, ``make rollback``) is one
read-modify-write under a file lock (:func:`record_lock`), so two at once are applied one after
the other and neither is lost. The record only goes forward (events are appended, never removed);
a copy of the last one written stays beside it, git-ignored (``.champion.json.last``), so that
``dvc exp apply`` or a checkout of an older commit, which put an older record back, cannot change
the champion: :func:`load_record` finds the record rewound, warns, and writes the newer one back.

BentoML reads ``BENTOML_HOME`` when first imported: set it before calling the functions here
that import bentoml (the ``__main__`` entries do, through ``set_quiet_env``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components import tasks
from components.dataset import Split
from components.records import InputColumn
from components.stage import StageError, file_digest, write_text

log = logging.getLogger("pipeline.champion")

RECORD_FORMAT = 1
RUN_PATTERN = re.compile(r"r[0-9a-f]{12}")  # a bento version: "r" + 12 hex digits
MD5_PATTERN = re.compile(r"[0-9a-f]{32}")
# A promotion holds the lock for seconds (it may import a bento); a minute longer is a stuck one.
LOCK_TIMEOUT_SECONDS = 120.0
# Fields of a run renamed since records were first written: old name -> new. A record with an
# old one is refused with a message that says how to rename it (the record is in git).
RENAMED_RUN_FIELDS = {"image_shape": "input_shape"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitInfo(_Strict):
    sha256: str  # fingerprint of the inputs, targets and class names (see split_fingerprint)
    examples: int


class RunRecord(_Strict):
    run: str  # the bento version, e.g. "r3642b760860f"
    bento_tag: str
    archive: str  # the exported .bento, relative to the repository when inside it
    # DVC's hash of the archive: finds it in .dvc/cache and checks it before an import (None
    # only in old records: ensure_bento then refuses)
    archive_md5: str | None
    model: str
    model_sha256: str
    served_variant: str
    class_names: list[str]  # empty for regression
    input_shape: list[int]  # of one example: (C, H, W), (F,) or (T, F); was image_shape
    test_split: SplitInfo
    metrics: dict[str, float]  # the served model's test metrics (+ "network_*" ones)
    packaged_at: str
    edge_bento_tag: str | None = None  # the small bento for edge boxes, when one was built
    git_commit: str | None = None  # the commit the run was made from (HEAD at promotion)
    prefect_flow_run: str | None = None
    task: Literal["classification", "regression"] = "classification"
    kind: Literal["image", "table", "sequence"] = "image"
    target: str = ""  # the predicted column of a table or time series
    preprocess_sha256: str | None = None  # see preprocess_fingerprint; None: raw pixels in
    # The columns a client sends (tables, series); None: images, or a record from before them
    input_columns: list[InputColumn] | None = None


class Event(_Strict):
    at: str
    action: Literal["promote", "rollback", "record"]
    run: str
    previous: str | None
    by: str  # "pipeline" or "hand"
    reason: str


class ChampionRecord(_Strict):
    format: Literal[1] = RECORD_FORMAT
    champion: str | None = None
    lineage: list[str] = Field(default_factory=list)  # champions in order; rollback pops one
    runs: dict[str, RunRecord] = Field(default_factory=dict)  # every packaged run seen
    events: list[Event] = Field(default_factory=list)

    def current(self) -> RunRecord | None:
        return self.runs[self.champion] if self.champion else None

    def find(self, name: str) -> RunRecord:
        """A run by version (``r...``), bento tag (``name:r...``) or an unambiguous prefix."""
        name = name.strip()
        version = name.split(":", 1)[1] if ":" in name else name
        if version in self.runs:
            return self.runs[version]
        matches = [v for v in self.runs if v.startswith(version)] if version else []
        if len(matches) == 1:
            return self.runs[matches[0]]
        known = ", ".join(self.runs) or "none yet"
        if len(matches) > 1:
            raise StageError(f"run {name!r} is ambiguous: it matches {', '.join(matches)}")
        raise StageError(f"no packaged run {name!r} in the champion record; known runs: {known}")


@dataclass(frozen=True)
class InputSchema:
    """What a client of a run's service sends and gets back: the task, the data kind, the
    target, the class names, the shape of one example and, for tables and series, the columns
    with their types and categories. A challenger whose schema is not the champion's would
    break the champion's clients (a 400 for a column it no longer reads, other classes back):
    it is packaged and recorded but never promoted automatically (components/promote.py)."""

    task: str
    kind: str
    target: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    columns: tuple[InputColumn, ...] | None  # None: not columns (images) or not recorded

    @classmethod
    def of_run(cls, run: RunRecord) -> InputSchema:
        return cls(
            run.task,
            run.kind,
            run.target,
            tuple(run.class_names),
            tuple(run.input_shape),
            None if run.input_columns is None else tuple(run.input_columns),
        )

    @classmethod
    def of(cls, task, kind, target, class_names, input_shape, columns=None) -> InputSchema:
        """From plain values (a data set's metadata, gate.json); ``columns`` as dicts or
        :class:`InputColumn`s, as a data kind's ``input_columns`` gives them."""
        cols = None if columns is None else tuple(InputColumn.model_validate(c) for c in columns)
        return cls(task, kind, target, tuple(class_names), tuple(input_shape), cols)

    def words(self) -> str:
        """E.g. "an image classification of ['a', 'b'], inputs 1x8x8"."""
        inputs = "x".join(str(d) for d in self.input_shape)
        article = "an" if self.kind[:1] in "aeiou" else "a"
        if not tasks.get(self.task).has_classes:
            return f"{article} {self.kind} regression of {self.target!r}, inputs {inputs}"
        classes = list(self.class_names)
        if len(classes) > 10:
            classes = f"{len(classes)} classes ({', '.join(classes[:3])}, ...)"
        target = f" {self.target!r}" if self.target else ""
        return f"{article} {self.kind} classification{target} of {classes}, inputs {inputs}"


def _named(names, limit: int = 6) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _difference(old, new) -> str:
    """E.g. "x added, y removed", or "reordered" when both hold the same values."""
    gained = [v for v in new if v not in old]
    lost = [v for v in old if v not in new]
    parts = [f"{_named(gained)} added" if gained else "", f"{_named(lost)} removed" if lost else ""]
    return ", ".join(p for p in parts if p) or "reordered"


def schema_changes(before: InputSchema, after: InputSchema) -> list[str]:
    """What a client of ``before`` finds changed in ``after``, one short phrase each; empty
    when they take and give the same. The one comparison of inputs the gate and promotion use.

    Columns are compared when both sides recorded them (records from before lack them; their
    shape still shows a column more or fewer). Column order counts: a series' step may be sent
    as a list of values, one per column.
    """
    changes = []
    if before.kind != after.kind:
        changes.append(f"data kind {before.kind} -> {after.kind}")
    if before.task != after.task:
        changes.append(f"task {before.task} -> {after.task}")
    if before.target != after.target:
        changes.append(f"target {before.target or 'none'!r} -> {after.target or 'none'!r}")
    if before.class_names != after.class_names:
        said = _difference(before.class_names, after.class_names)
        changes.append(f"classes {said}")
    if before.columns is not None and after.columns is not None:
        theirs = {c.name: c for c in before.columns}
        ours = {c.name: c for c in after.columns}
        if list(theirs) != list(ours):
            changes.append(f"columns {_difference(list(theirs), list(ours))}")
        for name in (n for n in theirs if n in ours):
            old, new = theirs[name], ours[name]
            if old.type != new.type:
                changes.append(f"column {name} {old.type} -> {new.type}")
            elif (old.categories or []) != (new.categories or []):
                said = _difference(old.categories or [], new.categories or [])
                changes.append(f"column {name} categories {said}")
    if before.input_shape != after.input_shape:
        shape = "x".join(str(d) for d in before.input_shape) or "()"
        to = "x".join(str(d) for d in after.input_shape) or "()"
        changes.append(f"input shape {shape} -> {to}")
    return changes


def schema_phrase(before: InputSchema, after: InputSchema) -> str | None:
    """The changes in one line, e.g. "columns x2 removed; input shape 3 -> 2; target 'price'
    unchanged"; None when the schemas agree."""
    changes = schema_changes(before, after)
    if not changes:
        return None
    if before.target and before.target == after.target:
        changes.append(f"target {before.target!r} unchanged")
    return "; ".join(changes)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def lock_file(path: Path) -> Path:
    """The lock file of a champion record (git-ignored, beside it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def last_written_file(path: Path) -> Path:
    """The copy of the last record written here (git-ignored, beside it): see load_record."""
    path = Path(path)
    return path.with_name(f".{path.name}.last")


@contextlib.contextmanager
def record_lock(path: Path, timeout: float = LOCK_TIMEOUT_SECONDS):
    """Hold the champion record for one read-modify-write; other processes (and threads) wait.

    Reentrant within a thread, so a change can call :func:`load_record` (which may write the
    record back) while holding it. Raises a StageError when another change holds it longer
    than ``timeout`` seconds.
    """
    from filelock import FileLock, Timeout

    lock = lock_file(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    held = FileLock(lock, is_singleton=True)  # one per file and process: reentrant
    try:
        held.acquire(timeout=timeout)
    except Timeout:
        raise StageError(
            f"{path} is being changed by another promotion or rollback (its lock {lock} has been "
            f"held for more than {timeout:.0f} s): wait for it to finish and try again"
        ) from None
    try:
        yield
    finally:
        held.release()


def _parse_record(path: Path, text: str) -> ChampionRecord:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StageError(f"{path} is not valid JSON ({exc}); restore it from git") from None
    if not isinstance(raw, dict):
        raise StageError(f"{path} must hold a JSON object; restore it from git")
    found = raw.get("format")
    if found != RECORD_FORMAT:
        raise StageError(
            f"{path} is champion record format {found!r}; this code reads format "
            f"{RECORD_FORMAT}: it was written by another version of the pipeline"
        )
    runs = raw.get("runs")
    for version, run in (runs if isinstance(runs, dict) else {}).items():
        for old, new in RENAMED_RUN_FIELDS.items():
            if isinstance(run, dict) and old in run:
                raise StageError(
                    f"{path}: runs.{version}.{old} is now called {new!r} (an input is not "
                    f"always an image): rename the key in every run of the record, e.g. "
                    f'sed -i \'s/"{old}":/"{new}":/\' {path}'
                )
    try:
        record = ChampionRecord.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise StageError(f"{path}: {where}: {first['msg']} (a hand-edited record?)") from None
    for name in [record.champion, *record.lineage]:
        if name is not None and name not in record.runs:
            raise StageError(f"{path}: champion {name!r} has no entry under 'runs'")
    return record


def _newer_record(path: Path, record: ChampionRecord | None) -> tuple[ChampionRecord, str] | None:
    """A newer state of the record than ``record`` (the file's), and where it was found, when
    the file was put back to an older one: its events a strict beginning of the newer one's,
    as ``dvc exp apply`` of an earlier run (every experiment holds the record as it was then)
    or an older checkout leave it. Looked for in the last record written here and in the
    record git's HEAD holds (a fresh clone has no copy of its own); the one with more events
    wins."""
    events = [] if record is None else record.events
    found = None
    for source, text in ((str(last_written_file(path)), _last_written_text(path)),
                         (f"git HEAD's {Path(path).name}", _committed_text(path))):  # fmt: skip
        if text is None:
            continue
        try:
            newer = _parse_record(path, text)
        except StageError:
            continue  # a damaged copy: the file in the workspace is the truth
        longer = found is None or len(newer.events) > len(found[0].events)
        if len(events) < len(newer.events) and newer.events[: len(events)] == events and longer:
            found = (newer, source)
    return found


def _last_written_text(path: Path) -> str | None:
    last = last_written_file(path)
    return last.read_text() if last.is_file() else None


def _committed_text(path: Path) -> str | None:
    """The record as git's HEAD commit holds it; None outside git or when HEAD has none."""
    path = Path(path).resolve()
    try:
        done = subprocess.run(
            ["git", "show", f"HEAD:./{path.name}"], cwd=path.parent,
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def load_record(path: Path) -> ChampionRecord:
    """The record, or an empty one when the file does not exist yet (no champion).

    A record that was put back to an older state (see :func:`_newer_record`) is not believed:
    the newer one is written back, with a warning, and returned.
    """
    path = Path(path)
    record = _parse_record(path, path.read_text()) if path.is_file() else None
    if _newer_record(path, record) is None:
        return record or ChampionRecord()
    with record_lock(path):
        record = _parse_record(path, path.read_text()) if path.is_file() else None
        found = _newer_record(path, record)
        if found is None:  # another process wrote it back meanwhile
            return record or ChampionRecord()
        newer, source = found
        log.warning(
            "%s was put back to an older state (champion %s; `dvc exp apply` or a checkout of "
            "an older commit?): the champion stays %s, as recorded in %s; the record is written "
            "back (commit it)",
            path,
            record.champion if record else "none",
            newer.champion,
            source,
        )
        _write_record(path, newer)
    return newer


def _write_record(path: Path, record: ChampionRecord) -> None:
    text = json.dumps(record.model_dump(mode="json"), indent=2) + "\n"
    write_text(path, text)
    write_text(last_written_file(path), text)


def save_record(path: Path, record: ChampionRecord) -> None:
    """Write atomically (a crash leaves the old record or the new one, never half of one), under
    the record's lock. A change (load, modify, save) holds :func:`record_lock` around all three
    so that a second change starts from the first one's result."""
    with record_lock(path):
        _write_record(Path(path), record)


def split_fingerprint(test: Split, class_names) -> str:
    """SHA-256 of the test split's content: the same inputs, targets and class names, same hash.

    Hashes the arrays (dtype, shape and bytes), not the .npz file, so re-writing the same split
    gives the same value. Works for every kind and task: uint8 images or float32 features,
    int64 labels or float32 regression targets (a regression split has no class names).
    A sharded split is hashed a shard at a time, to the digest of the same arrays in memory.
    """
    digest = hashlib.sha256()
    digest.update(f"{test.x.dtype.str}{tuple(test.x.shape)}".encode())
    for x, _ in test.chunks():
        digest.update(x.tobytes())  # C order, whatever the array's own layout
    digest.update(f"{test.y.dtype.str}{test.y.shape}".encode())
    digest.update(test.y.tobytes())
    digest.update(json.dumps(list(class_names)).encode())
    return digest.hexdigest()


def preprocess_fingerprint(preprocess: dict | None, feature_names=()) -> str | None:
    """SHA-256 of how raw rows become the model's input (components/features.py's fitted spec
    and the encoded feature names), or None when there is no such step (images: raw pixels).

    Two models with the same fingerprint read the same encoded inputs, so one may be measured
    on the other's test split; with different ones (another fit of means and categories) they
    may not.
    """
    if preprocess is None and not feature_names:
        return None
    text = json.dumps(
        {"preprocess": preprocess, "features": list(feature_names)}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def md5_file(path: Path) -> str:
    return file_digest(path, "md5")  # what DVC names cache objects by; not for security


def git_commit(root: Path = Path(".")) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _dvc_cache_file(md5: str, root: Path) -> Path | None:
    """The DVC cache's copy of a file with this MD5 (the cache DVC is configured to use)."""
    candidates = []
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            candidates.append(Path(repo.cache.local.oid_to_path(md5)))
    except Exception as exc:  # not a DVC repository, or DVC cannot read its config
        log.debug("no DVC cache at %s: %s", root, exc)
    candidates.append(Path(root) / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:])
    return next((c for c in candidates if c.is_file()), None)


def ensure_bento(run: RunRecord, root: Path = Path(".")) -> Path:
    """Make sure the run's bento is in the BentoML store; return its folder.

    Looks in the store, then imports the archive from the workspace or from the local DVC cache,
    either only when its MD5 is the record's: a record without ``archive_md5`` imports nothing.
    Raises a :class:`StageError` that says what to do otherwise.
    """
    # The hash and the run are joined into paths (the cache object, the scratch file): only
    # the shapes DVC and package write are accepted.
    md5 = run.archive_md5
    if md5 is not None and not MD5_PATTERN.fullmatch(md5):
        raise StageError(
            f"champion record: run {run.run} has archive_md5 {md5!r}, not an MD5 (32 hex "
            "digits): a hand-edited record? restore it from git"
        )
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return Path(bentoml.bentos.get(run.bento_tag).path)
    except NotFound:
        pass
    candidates = []
    if md5 is not None:
        archive = Path(run.archive)
        if not archive.is_absolute():
            archive = Path(root) / archive
        if archive.is_file() and md5_file(archive) == md5:
            candidates.append(archive)
        cached = _dvc_cache_file(md5, root)
        if cached is not None and md5_file(cached) == md5:
            candidates.append(cached)
    if candidates and not RUN_PATTERN.fullmatch(run.run):
        raise StageError(
            f"champion record: run {run.run!r} is not a bento version (r + 12 hex digits): a "
            "hand-edited record? restore it from git"
        )
    for source in candidates:
        # `bentoml import` wants an absolute path ending in .bento; a cache object has neither.
        scratch = Path(tempfile.mkdtemp(prefix="bento-import-"))
        try:
            copy = scratch / f"{run.run}.bento"
            shutil.copyfile(source, copy)
            bentoml.bentos.import_bento(str(copy))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("imported bento %s from %s", run.bento_tag, source)
        return Path(bentoml.bentos.get(run.bento_tag).path)
    unchecked = (
        ", and the record has no archive_md5 to check an archive against (none is imported "
        "unchecked)"
        if md5 is None
        else ""
    )
    raise StageError(
        f"bento {run.bento_tag} of run {run.run} is not in the BentoML store{unchecked} and its "
        f"archive {run.archive} is neither in the workspace nor in the DVC cache: fetch it "
        f"from the DVC remote (`dvc fetch --all-commits`, or `git checkout <the commit that "
        f"packaged it> && dvc pull artefacts`), or copy the .bento file there, and try again"
    )


def served_model_file(bento_dir: Path) -> Path:
    """The ONNX model inside a bento built by components/package.py."""
    path = Path(bento_dir) / "src" / "deploy" / "model" / "model.onnx"
    if not path.is_file():
        raise StageError(f"{bento_dir} holds no src/deploy/model/model.onnx: not one of our bentos")
    return path
