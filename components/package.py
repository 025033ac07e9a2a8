"""Package: the chosen ONNX model + deploy/ -> two versioned bentos (cloud, edge) and archives.

- The **cloud** bento serves the model ``compress.select`` picks with adaptive
  batching (``deploy/service.py``): images as JSON, .npy or PNG/JPEG; table rows and
  sequences as JSON, encoded by the preprocessing the model was trained behind.
- The **edge** bento serves the int8 model with ONNX Runtime and numpy only, and forwards
  the classifications it is unsure about to the cloud (``deploy/edge_service.py``);
  regression is always answered at the edge.

Each data kind has its own service class (:data:`CLOUD` / :data:`EDGE` ``services``); the
bento is built around the one the data set's ``kind`` needs. Tables and sequences carry
their preprocessing spec (``meta.json``'s ``preprocess``) in the model card, and the bento
ships ``components/features.py`` (numpy only), the very code ingest encoded the training data
with, so serving applies exactly the same transform.

Each bento carries its model as plain files next to its service (``src/deploy/model/``), so
serving needs neither a model store nor a floating ``:latest`` tag, and pins every Python
package it needs, transitively, to the version installed here (the build runs offline; the
same list is what an edge box installs). Its version is a hash of everything that goes into
it (model, model card, service code, build options): re-running on the same inputs gives the
same tag and reuses the bento already in the store.

BentoML keeps its store under ``$BENTOML_HOME``, read when bentoml is first used: call
:func:`components.stage.set_quiet_env` (the ``__main__`` path does) or set it yourself before
importing anything from here that imports bentoml (only the functions do).
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

import numpy as np

from components.config import PackageParams, Params
from components.dataset import DatasetError, DatasetMeta, meta_path
from components.stage import StageError, file_digest, main, write_json

log = logging.getLogger("pipeline.package")

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
SERVICE_FILE = DEPLOY_DIR / "service.py"
COMPONENTS_DIR = Path(__file__).resolve().parent
# Files of components/ both bentos ship (the preprocessing; numpy only), as components/<name>.
SHARED_COMPONENTS = ("features.py",)
# Where the services look for the model, relative to the bento's src/ (and the staging dir).
MODEL_SUBDIR = Path("deploy") / "model"
INPUT_NAME = "images"
EDGE_VARIANT = "int8"
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

# uvicorn serves faster with uvloop and httptools when they are installed (~15 % less CPU).
SERVER_EXTRAS = ("uvloop", "httptools")
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


@dataclass(frozen=True)
class BentoResult:
    tag: str  # name:version, the version being "r" + 12 hex digits of the content hash
    archive: Path  # the exported .bento file, absolute
    served_variant: str
    model_version: str  # what the service answers with: the bento's version
    model_bytes: int
    archive_bytes: int
    packages_bytes: int  # installed size of the pinned Python packages (measured here)
    reused: bool  # the store already held this exact bento


@dataclass(frozen=True)
class PackageResult(BentoResult):
    """The cloud bento's figures, and the edge bento's (None when it was not asked for)."""

    edge: BentoResult | None = None


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
    """Disk space the installed packages ``names`` and their dependencies take here."""
    total = 0
    for dist in dependency_closure(names).values():
        for file in dist.files or []:
            path = Path(dist.locate_file(file))
            if path.is_file():
                total += path.stat().st_size
    return total


def read_optional_json(path: Path) -> dict | None:
    """A small metrics file if it exists; a present but broken one is an error."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise StageError(f"{path} must hold a JSON object")
    return value


def summarise_metrics(evaluate: dict | None, compress: dict | None, variant: str) -> dict:
    """The few numbers worth carrying in the bento: the served variant's test metrics first.

    ``accuracy``/``macro_f1`` (classification) or ``r2``/``rmse``/``mae`` (regression) are
    the served ONNX variant's (from compress.json), falling back to the PyTorch model's
    (evaluate.json) when compress.json lacks them. Whatever is missing or not a number is left
    out.
    """

    def numbers(source: dict | None, keys: tuple[str, ...], prefix: str = "") -> dict:
        source = source or {}
        return {
            prefix + k: float(source[k])
            for k in keys
            if isinstance(source.get(k), int | float) and not isinstance(source.get(k), bool)
        }

    keys = ("accuracy", "macro_f1", "r2", "rmse", "mae")
    variants = (compress or {}).get("variants")
    served = variants.get(variant) if isinstance(variants, dict) else None
    out = numbers(evaluate if isinstance(evaluate, dict) else None, keys, prefix="pytorch_")
    out.update(numbers(served if isinstance(served, dict) else None, keys))
    for key in keys:
        if key not in out and f"pytorch_{key}" in out:
            out[key] = out[f"pytorch_{key}"]
    return dict(sorted(out.items()))


def check_model(
    onnx_file: Path, image_shape: tuple[int, ...], n_classes: int, task: str = "classification"
) -> None:
    """Fail before building when the model cannot serve inputs of the data set's shape: a
    float32 batch of zeros shaped ``(2, *image_shape)`` (an image, a row of encoded features
    or a sequence) must give ``(2, n_classes)`` logits, or ``(2, 1)`` values for regression."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise StageError(f"{onnx_file} is not a loadable ONNX model: {exc}") from None
    names = [i.name for i in session.get_inputs()]
    if names != [INPUT_NAME]:
        raise StageError(f"{onnx_file} takes inputs {names}; the service feeds {INPUT_NAME!r}")
    probe = np.zeros((2, *image_shape), dtype=np.float32)
    try:
        logits = session.run(None, {INPUT_NAME: probe})[0]
    except Exception as exc:
        raise StageError(
            f"{onnx_file} cannot run a batch of 2 inputs shaped {tuple(image_shape)}: {exc}"
        ) from None
    if task == "regression":
        if logits.shape != (2, 1):
            raise StageError(
                f"{onnx_file} answers outputs shaped {logits.shape} for 2 inputs; a regression "
                "model answers one value each, (2, 1)"
            )
        return
    if logits.shape != (2, n_classes):
        raise StageError(
            f"{onnx_file} answers logits shaped {logits.shape} for 2 images; the data set has "
            f"{n_classes} classes"
        )


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
    # Export next to the target, then rename: a crash never leaves a half-written archive.
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=artefacts_dir))
    try:
        written = Path(bentoml.bentos.export_bento(tag, str(scratch / archive.name)))
        os.replace(written, archive)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # Exactly <name>-r<hash>.bento: "digits-classifier-*" would also match the edge bento's.
    own = re.compile(re.escape(name) + r"-r[0-9a-f]{12}\.bento")
    for old in artefacts_dir.glob(f"{name}-*.bento"):
        if old != archive and own.fullmatch(old.name):
            old.unlink()
    return archive


def describe(card: dict, role: str) -> str:
    """The bento's description: what it predicts from what, how to call it."""
    kind, task = card.get("kind", "image"), card.get("task", "classification")
    accuracy = card["metrics"].get("accuracy")
    lines = [f"# {card['model']} ({role})", ""]
    if kind == "image":
        shape = "x".join(str(d) for d in card["image_shape"])
        lines.append(
            f"Classifies {shape} images (C x H x W, raw pixel values 0-255) into "
            f"{len(card['class_names'])} classes with the {card['served_variant']} ONNX model."
        )
    else:
        if task == "regression":
            what = f"Predicts {card.get('target') or 'a value'} (in its own units)"
        else:
            what = f"Classifies into {len(card['class_names'])} classes"
        columns = [c["name"] for c in card["preprocess"]["columns"]]
        shown = ", ".join(columns[:12]) + (
            f", ... ({len(columns)} in all)" if len(columns) > 12 else ""
        )
        source = (
            f"table rows of columns {shown}"
            if kind == "table"
            else f"sequences of {card['input_shape'][0]} steps of columns {shown}"
        )
        lines.append(
            f"{what} from {source}, with the {card['served_variant']} ONNX model; the "
            "preprocessing fitted on the training data (model.json `preprocess`) is applied "
            "first."
        )
    if accuracy is not None:
        lines.append(f"Test accuracy: {accuracy:.4f}.")
    for key, name in (("r2", "R^2"), ("rmse", "RMSE"), ("mae", "MAE")):
        if card["metrics"].get(key) is not None:
            lines.append(f"Test {name}: {card['metrics'][key]:.4g}.")
    lines.append("")
    lines.append(_usage(card, role, kind, task))
    return "\n".join(lines) + "\n"


def _usage(card: dict, role: str, kind: str, task: str) -> str:
    batch = card["max_batch_size"]
    if kind == "image":
        if role == "edge":
            return (
                '`POST /predict {"image": [[...]]}`, `POST /predict_batch {"images": [...]}`, '
                "`POST /info`. Images whose top probability is below "
                f"{card['edge']['confidence_threshold']} go to the cloud bento at `CLOUD_URL` "
                "when one is set; every answer says who answered (`answered_by`)."
            )
        return (
            '`POST /predict {"image": [[...]]}`, `POST /predict_batch {"images": [...]}` (at '
            f"most {batch}), `POST /predict_image` (multipart PNG/JPEG, field "
            "`image`), `POST /info`; `/readyz`, `/livez`, `/metrics`; OpenAPI page at `/`."
        )
    if kind == "table":
        routes = (
            '`POST /predict_row {"row": {column: value, ...}}`, `POST /predict_rows {"rows": '
            f"[...]}}` (at most {batch})"
        )
    else:
        routes = (
            f'`POST /forecast {{"window": [step x {card["input_shape"][0]}]}}` (a step: one '
            'value per column, or {column: value}), `POST /predict_sequences {"sequences": '
            f"[...]}}` (at most {batch})"
        )
    answer = (
        "`{value}` in the target's units" if task == "regression" else "`{label, probabilities}`"
    )
    text = f"{routes}, `POST /info` (columns, preprocessing); each answers {answer}."
    if role == "edge":
        if task == "regression":
            text += " Regression is always answered here: there is no confidence to hand off on."
        else:
            text += (
                f" Examples whose top probability is below {card['edge']['confidence_threshold']} "
                "go to the cloud bento at `CLOUD_URL` when one is set (`answered_by`)."
            )
    else:
        text += " `/readyz`, `/livez`, `/metrics`; OpenAPI page at `/`."
    return text


def _build_one(
    kind: BentoKind,
    name: str,
    onnx_file: Path,
    card: dict,
    staging_dir: Path,
    artefacts_dir: Path,
    deploy_dir: Path,
) -> BentoResult:
    """Stage, version, build (or reuse) and export one bento."""
    stage_source(kind, onnx_file, card, staging_dir, deploy_dir)
    labels = {
        "role": kind.role,
        "model_name": card["model"].split(":")[0],
        "model": card["model"],
        "served_variant": card["served_variant"],
        "kind": card["kind"],
        "task": card["task"],
        **_shape_labels(card),
        **{k: f"{v:.6g}" for k, v in card["metrics"].items()},
    }
    options = {
        "layout": LAYOUT_VERSION,
        "service": kind.service_for(card["kind"]),
        "labels": labels,
        "description": describe(card, kind.role),
        "packages": pinned_requirements(kind.packages),
        "bentoml": metadata.version("bentoml"),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    # The version hashes everything staged so far; the card then records it, so every answer
    # of the service names the bento it came from (the field itself is left out of the hash).
    version = content_version(staging_dir, options)
    tag = f"{name}:{version}"
    card = {**card, "model_version": version}
    write_card(card, staging_dir)
    reused = build_bento(staging_dir, tag, options)
    archive = export_archive(tag, artefacts_dir)  # absolute: `bentoml import` needs that
    result = BentoResult(
        tag=tag,
        archive=archive,
        served_variant=card["served_variant"],
        model_version=version,
        model_bytes=Path(onnx_file).stat().st_size,
        archive_bytes=archive.stat().st_size,
        packages_bytes=installed_bytes(kind.packages),
        reused=reused,
    )
    log.info(
        "%s bento %s (%s model, %d B; archive %d B; Python packages %.0f MB)%s -> %s",
        kind.role,
        tag,
        result.served_variant,
        result.model_bytes,
        result.archive_bytes,
        result.packages_bytes / 1e6,
        " reused" if reused else "",
        archive,
    )
    return result


def _shape_labels(card: dict) -> dict[str, str]:
    """The bento labels saying what the model takes and gives."""
    if card["kind"] == "image":
        labels = {"image_shape": "x".join(str(d) for d in card["image_shape"])}
    else:
        labels = {
            "input_shape": "x".join(str(d) for d in card["input_shape"]),
            "num_features": str(card["input_shape"][-1]),
            "columns": str(len(card["preprocess"]["columns"])),
        }
        if card["kind"] == "sequence":
            labels["window"] = str(card["input_shape"][0])
    if card["task"] == "regression":
        labels["target"] = card.get("target") or ""
    else:
        labels["num_classes"] = str(len(card["class_names"]))
    return labels


def _model_card(onnx_file: Path, meta: DatasetMeta, model_name: str, variant: str) -> dict:
    """What the service reads from model.json: the model, the data kind and task, what goes in
    (shape; for tables and sequences the preprocessing spec) and what comes out."""
    digest = file_digest(onnx_file)
    card = {
        "model": f"{model_name}:{variant}-{digest[:12]}",
        "model_sha256": digest,
        "served_variant": variant,
        "kind": meta.kind,
        "task": meta.task,
        "class_names": list(meta.class_names),
        "input_shape": list(meta.input_shape),
    }
    if meta.kind == "image":
        card["image_shape"] = list(meta.image_shape)
    else:
        card.update(
            target=meta.target,
            feature_names=list(meta.feature_names),
            preprocess=meta.preprocess,
        )
    return card


def check_meta(meta: DatasetMeta, meta_file: Path) -> None:
    """What the services need of the data set's metadata, checked before any build."""
    if meta.is_regression:
        if meta.class_names:
            raise StageError(f"{meta_file}: a regression data set has no class_names")
    elif len(set(meta.class_names)) != len(meta.class_names):
        raise StageError(f"{meta_file}: class names must be unique, got {meta.class_names}")
    elif not meta.class_names:
        raise StageError(f"{meta_file}: a classification data set needs its class_names")
    if meta.kind == "image":
        if len(meta.input_shape) != 3:
            raise StageError(
                f"{meta_file}: images must be shaped (C, H, W), got {meta.input_shape}"
            )
        return
    from deploy.table import check_spec  # imports bentoml: not at module level (see above)

    rank = 1 if meta.kind == "table" else 2
    if len(meta.input_shape) != rank:
        raise StageError(
            f"{meta_file}: input_shape of {meta.kind} data must have {rank} dimension(s), got "
            f"{meta.input_shape}"
        )
    try:
        check_spec(meta.preprocess, meta.input_shape, meta.kind, f"{meta_file}: preprocess")
    except ValueError as exc:
        raise StageError(str(exc)) from None


def _check_onnx_exists(onnx_file: Path, variant: str) -> None:
    if not Path(onnx_file).is_file():
        raise StageError(
            f"{onnx_file} not found: run the compress stage first (it writes the {variant!r} model)"
        )


def _bento_summary(result: BentoResult, card: dict, metrics: dict) -> dict:
    return {
        "tag": result.tag,
        "archive": str(result.archive),
        "archive_bytes": result.archive_bytes,
        "served_variant": result.served_variant,
        "model_version": result.model_version,
        "model": card["model"],
        "model_bytes": result.model_bytes,
        "packages_bytes": result.packages_bytes,
        "metrics": metrics,
    }


def package(
    onnx_file: Path,
    meta_file: Path,
    settings: PackageParams,
    *,
    served_variant: str,
    staging_dir: Path,
    artefacts_dir: Path,
    metrics: dict | None = None,
    edge_onnx_file: Path | None = None,
    edge_metrics: dict | None = None,
    deploy_dir: Path = DEPLOY_DIR,
) -> PackageResult:
    """The core, on explicit paths: build the cloud bento (and the edge one when given its
    int8 model), export both, write ``bento.json``. Bentos are staged under
    ``staging_dir/<bento name>``."""
    onnx_file, meta_file = Path(onnx_file), Path(meta_file)
    _check_onnx_exists(onnx_file, served_variant)
    try:
        meta = DatasetMeta.load(meta_file)
    except (DatasetError, KeyError, json.JSONDecodeError) as exc:
        raise StageError(f"cannot read the data set's metadata {meta_file}: {exc}") from None
    check_meta(meta, meta_file)
    check_model(onnx_file, meta.input_shape, meta.num_outputs, meta.task)
    limits = {
        "max_batch_size": settings.max_batch_size,
        "max_latency_ms": settings.max_latency_ms,
        "max_request_bytes": settings.max_request_bytes,
        "max_image_bytes": settings.max_image_bytes,
    }
    metrics = dict(metrics or {})
    staging_dir, artefacts_dir = Path(staging_dir), Path(artefacts_dir)

    card = _model_card(onnx_file, meta, settings.model_name, served_variant)
    card.update(limits, metrics=metrics)
    cloud = _build_one(
        CLOUD,
        settings.bento_name,
        onnx_file,
        card,
        staging_dir / settings.bento_name,
        artefacts_dir,
        deploy_dir,
    )
    summary = _bento_summary(cloud, card, metrics)

    edge = None
    if edge_onnx_file is not None:
        _check_onnx_exists(Path(edge_onnx_file), EDGE_VARIANT)
        check_model(Path(edge_onnx_file), meta.input_shape, meta.num_outputs, meta.task)
        edge_metrics = dict(edge_metrics or {})
        edge_card = _model_card(Path(edge_onnx_file), meta, settings.model_name, EDGE_VARIANT)
        edge_card.update(limits, metrics=edge_metrics, edge=settings.edge.model_dump())
        edge_card["edge"].pop("bento_name")
        edge = _build_one(
            EDGE,
            settings.edge.bento_name,
            Path(edge_onnx_file),
            edge_card,
            staging_dir / settings.edge.bento_name,
            artefacts_dir,
            deploy_dir,
        )
        summary["edge"] = _bento_summary(edge, edge_card, edge_metrics)
        summary["edge"]["cloud_url"] = settings.edge.cloud_url
        summary["edge"]["confidence_threshold"] = settings.edge.confidence_threshold
    write_json(artefacts_dir / "bento.json", summary)
    return PackageResult(**{**cloud.__dict__, "edge": edge})


def run(params: Params) -> PackageResult:
    """The stage: read the pipeline's outputs named in params.yaml and call :func:`package`."""
    paths = params.paths
    metrics_dir = Path(paths.metrics_dir)
    evaluate = read_optional_json(metrics_dir / "evaluate.json")
    compress = read_optional_json(metrics_dir / "compress.json")
    # The compress stage's selection policy (compress.select) decides what is served.
    variant = (compress or {}).get("served_variant")
    if not variant:
        raise StageError(
            f"{metrics_dir / 'compress.json'} names no served_variant: run the compress stage"
        )
    onnx_dir = Path(paths.model_dir) / "onnx"
    # The edge box has no bigger model to fall back on (a regression edge never asks the
    # cloud): an int8 model that failed its drop gate against fp32 is not shipped there.
    int8 = ((compress or {}).get("variants") or {}).get(EDGE_VARIANT) or {}
    edge_onnx_file = onnx_dir / f"{EDGE_VARIANT}.onnx"
    if int8.get("passed") is False:
        log.warning(
            "no edge bento this run: the %s model failed its drop gate against fp32 "
            "(compress.max_accuracy_drop; see compress.json)", EDGE_VARIANT,
        )  # fmt: skip
        edge_onnx_file = None
    return package(
        onnx_dir / f"{variant}.onnx",
        meta_path(paths.prepared_dir),
        params.package,
        served_variant=variant,
        # Scratch, git-ignored; rebuilt from nothing on every run.
        staging_dir=Path.cwd() / "build" / "bento",
        artefacts_dir=Path(paths.artefacts_dir),
        metrics=summarise_metrics(evaluate, compress, variant),
        edge_onnx_file=edge_onnx_file,
        edge_metrics=summarise_metrics(evaluate, compress, EDGE_VARIANT),
    )


if __name__ == "__main__":
    main("package", run)
