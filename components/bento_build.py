"""Building a bento offline: pinned requirements, a staged source, a content hash, the build
and the exported archive.

Each bento carries its model as plain files next to its service (``src/deploy/model/``), so
serving needs neither a model store nor a floating ``:latest`` tag, and pins every Python
package it needs, transitively, to the version installed here (the build runs offline; the
same list is what an edge box installs). Its version is a hash of everything that goes into
it: re-running on the same inputs gives the same tag and reuses the bento already in the store.

BentoML keeps its store under ``$BENTOML_HOME``, read when bentoml is first used: set it (see
:func:`components.stage.set_quiet_env`) before calling anything here that imports bentoml.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from components.stage import StageError, file_digest

log = logging.getLogger("pipeline.package")

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
SERVICE_FILE = DEPLOY_DIR / "service.py"
COMPONENTS_DIR = Path(__file__).resolve().parent
# Files of components/ both bentos ship (the preprocessing; numpy only), as components/<name>.
SHARED_COMPONENTS = ("features.py",)
# Where the services look for the model, relative to the bento's src/ (and the staging dir).
MODEL_SUBDIR = Path("deploy") / "model"
# Bump when the bento layout changes in a way the hashed files do not show.
LAYOUT_VERSION = 3


@dataclass(frozen=True)
class BentoKind:
    """What differs between the cloud and the edge bento."""

    role: str
    services: dict[str, str]  # data kind -> the service that serves it ("module:Class")
    service_files: tuple[str, ...]  # files of deploy/ that go into the bento
    # What the service imports; their dependencies are pinned too. BentoML adds itself.
    packages: tuple[str, ...]

    def service_for(self, kind: str) -> str:
        if kind not in self.services:
            raise StageError(f"no {self.role} service serves {kind!r} data")
        return self.services[kind]


# What both bentos' service modules import from deploy/: the base service, its guard and
# batcher, and one adapter per data kind (numpy only: the edge stays lean).
SERVING_FILES = (
    "base.py", "common.py", "guard.py", "batching.py", "image.py", "table.py", "sequence.py",
)  # fmt: skip

# uvicorn serves faster with uvloop and httptools when they are installed (~15 % less CPU);
# the services read and write JSON with orjson, and pixels with simdjson (deploy/base.py).
SERVER_EXTRAS = ("uvloop", "httptools", "orjson", "pysimdjson")
CLOUD = BentoKind(
    role="cloud",
    services={
        "image": "deploy.service:ImageClassifier",
        "table": "deploy.service:TablePredictor",
        "sequence": "deploy.service:SequencePredictor",
    },
    service_files=("service.py", *SERVING_FILES),
    packages=("bentoml", "onnxruntime", "numpy", "pillow", *SERVER_EXTRAS),
)
EDGE = BentoKind(
    role="edge",
    services={
        "image": "deploy.edge_service:EdgeImageClassifier",
        "table": "deploy.edge_service:EdgeTablePredictor",
        "sequence": "deploy.edge_service:EdgeSequencePredictor",
    },
    service_files=("edge_service.py", *SERVING_FILES),
    packages=("bentoml", "onnxruntime", "numpy", "httpx", *SERVER_EXTRAS),
)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(names: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """Installed distributions ``names`` need, transitively, for this interpreter, no extras."""
    from packaging.requirements import Requirement

    found: dict[str, metadata.Distribution] = {}
    todo = [(name, True) for name in names]
    while todo:
        name, direct = todo.pop()
        key = _norm(name)
        if key in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if direct:
                raise StageError(f"package {name!r} is not installed; a service needs it") from None
            log.warning("%s is required but not installed here: left out of the pins", name)
            continue
        found[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append((req.name, False))
    return dict(sorted(found.items()))


def pinned_requirements(names: tuple[str, ...]) -> list[str]:
    """``name==version`` for ``names`` and everything they need, as installed here.

    BentoML itself is left out: ``bentoml build`` adds its own pin.
    """
    closure = dependency_closure(names)
    return [f"{d.metadata['Name']}=={d.version}" for k, d in closure.items() if k != "bentoml"]


def installed_bytes(names: tuple[str, ...]) -> int:
    """The size of the packages ``names`` and their dependencies, as their wheels record their
    files: the same wherever the same wheels are installed. Left out: what each environment
    makes of them, the compiled bytecode (its size depends on what has been imported; RECORD
    gives it no size) and the console scripts (each names its own interpreter's path)."""
    total = 0
    for dist in dependency_closure(names).values():
        for file in dist.files or []:
            if file.size is not None and not str(file).startswith(".."):
                total += file.size
    return total


def stage_source(
    kind: BentoKind, onnx_file: Path, card: dict, staging_dir: Path, deploy_dir: Path = DEPLOY_DIR
) -> None:
    """Lay out the bento's source in a clean ``staging_dir``: its service files and model."""
    staging_dir = Path(staging_dir)
    shutil.rmtree(staging_dir, ignore_errors=True)
    model_dir = staging_dir / MODEL_SUBDIR
    model_dir.mkdir(parents=True)
    (staging_dir / "deploy" / "__init__.py").write_text('"""The served model and its service."""\n')
    for name in kind.service_files:
        shutil.copyfile(Path(deploy_dir) / name, staging_dir / "deploy" / name)
    # The preprocessing, under the import path it has here: one copy of the code, not two.
    shared = staging_dir / "components"
    shared.mkdir()
    (shared / "__init__.py").write_text('"""The pipeline code the service shares."""\n')
    for name in SHARED_COMPONENTS:
        shutil.copyfile(COMPONENTS_DIR / name, shared / name)
    shutil.copyfile(onnx_file, model_dir / "model.onnx")
    write_card(card, staging_dir)


def write_card(card: dict, staging_dir: Path) -> None:
    path = Path(staging_dir) / MODEL_SUBDIR / "model.json"
    path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def _source_files(root: Path) -> dict[str, Path]:
    return {
        p.relative_to(root).as_posix(): p
        for p in sorted(Path(root).rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def content_version(staging_dir: Path, build_options: dict) -> str:
    """``"r"`` + 12 hex digits of the hash of every staged file and the build options."""
    digest = hashlib.sha256()
    digest.update(json.dumps(build_options, sort_keys=True).encode())
    for rel, path in _source_files(staging_dir).items():
        digest.update(rel.encode() + b"\0" + file_digest(path).encode() + b"\0")
    return "r" + digest.hexdigest()[:12]


def _store_matches(bento_src: Path, staging_dir: Path) -> bool:
    """Whether a stored bento's src/ holds exactly the files we staged (not tampered with)."""
    for rel, path in _source_files(staging_dir).items():
        stored = Path(bento_src) / rel
        if not stored.is_file() or file_digest(stored) != file_digest(path):
            return False
    return True


def build_bento(staging_dir: Path, tag: str, options: dict) -> bool:
    """Build ``tag`` from ``staging_dir`` into the store; True when reused as is."""
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        existing = bentoml.bentos.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        if _store_matches(Path(existing.path) / "src", staging_dir):
            log.info("bento %s is already in the store: reusing it", tag)
            return True
        log.warning("bento %s in the store differs from its sources: rebuilding it", tag)
        bentoml.bentos.delete(tag)
    name, version = tag.split(":")
    try:
        with _own_deploy_package():
            _build(staging_dir, name, version, options)
    except BentoMLException as exc:  # e.g. no `uv` and no index to install it from
        raise StageError(f"bentoml could not build {tag}: {exc}") from exc
    return False


@contextmanager
def _own_deploy_package():
    """Let the build import ``deploy`` from its staging dir, not a ``deploy`` imported before.

    ``bentoml.bentos.build`` imports the service by module path; a ``deploy`` package already
    in ``sys.modules`` (the repository's, or the other bento's staging dir) would be used
    instead, and would not hold ``edge_service``. What was there is put back afterwards.
    """
    saved = {k: v for k, v in sys.modules.items() if k == "deploy" or k.startswith("deploy.")}
    for key in saved:
        del sys.modules[key]
    try:
        yield
    finally:
        for key in [k for k in sys.modules if k == "deploy" or k.startswith("deploy.")]:
            del sys.modules[key]
        sys.modules.update(saved)


def _build(staging_dir: Path, name: str, version: str, options: dict) -> None:
    import bentoml

    bentoml.bentos.build(
        options["service"],
        name=name,
        version=version,
        labels=options["labels"],
        description=options["description"],
        include=["deploy/**", "components/**"],
        exclude=["__pycache__/", "*.pyc"],
        # Offline: every package pinned to what is installed here, and no `uv pip
        # compile` lock step (it needs an index).
        python={"packages": options["packages"], "lock_packages": False},
        # What `bentoml containerize` turns into an image (no Docker daemon here).
        docker={"distro": "debian", "python_version": options["python"]},
        build_ctx=str(Path(staging_dir).resolve()),
    )


def export_archive(tag: str, artefacts_dir: Path) -> Path:
    """Export the bento to ``artefacts_dir/<name>-<version>.bento``; drop its older archives."""
    import bentoml

    name, version = tag.split(":")
    artefacts_dir = Path(artefacts_dir).resolve()
    artefacts_dir.mkdir(parents=True, exist_ok=True)
    archive = artefacts_dir / f"{name}-{version}.bento"
    # Written next to the target, then renamed: a crash never leaves a half-written archive.
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=artefacts_dir))
    try:
        write_archive(Path(bentoml.bentos.get(tag).path), scratch / archive.name)
        os.replace(scratch / archive.name, archive)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # Exactly <name>-r<hash>.bento: "digits-classifier-*" would also match the edge bento's.
    own = re.compile(re.escape(name) + r"-r[0-9a-f]{12}\.bento")
    for old in artefacts_dir.glob(f"{name}-*.bento"):
        if old != archive and own.fullmatch(old.name):
            old.unlink()
    return archive


# What makes two exports of one bento differ: every file's time, the owner, the order a folder
# lists, and the build's `creation_time` in bento.yaml. The archive fixes them (the time as the
# reproducible-builds convention does, 1980-01-01) and leaves the build time out: `bentoml
# import` then records the import's time, as it does for any field a bento.yaml omits.
ARCHIVE_MTIME = 315532800
_CREATION_TIME = re.compile(rb"^creation_time: .*\n", re.MULTILINE)


def write_archive(bento_dir: Path, target: Path) -> None:
    """The bento folder as ``bentoml export`` writes it (an xz tar of ``./...``), but the same
    bytes for the same bento, whenever and wherever it was built."""
    import io
    import tarfile

    def normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = ARCHIVE_MTIME
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        executable = info.isdir() or info.mode & 0o100
        info.mode = 0o755 if executable else 0o644
        return info

    paths = sorted(bento_dir.rglob("*"), key=lambda p: p.relative_to(bento_dir).parts)
    with tarfile.open(target, "w:xz", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(normalised(tar.gettarinfo(str(bento_dir), arcname=".")))
        for path in paths:
            arcname = "./" + path.relative_to(bento_dir).as_posix()
            info = normalised(tar.gettarinfo(str(path), arcname=arcname))
            if info.isdir():
                tar.addfile(info)
            elif arcname == "./bento.yaml":
                data = _CREATION_TIME.sub(b"", path.read_bytes(), count=1)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            elif info.isfile():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                raise StageError(f"bento {bento_dir.name}: {arcname} is not a file or a folder")
