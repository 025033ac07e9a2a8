"""Package: the chosen ONNX model + deploy/service.py -> a versioned bento and its archive.

The bento carries the model as plain files next to the service (``src/deploy/model/``), so
serving needs neither a model store nor a floating ``:latest`` tag. Its version is a hash of
everything that goes into it (model, model card, service code, build options): re-running
on the same inputs gives the same tag and reuses the bento already in the store.

BentoML keeps its store under ``$BENTOML_HOME``, read when bentoml is first used: call
:func:`components.stage.set_quiet_env` (the ``__main__`` path does) or set it yourself before
importing anything from here that imports bentoml (only the functions do).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from components.config import Params
from components.dataset import DatasetError, DatasetMeta, meta_path
from components.stage import StageError, main, write_json

log = logging.getLogger("pipeline.package")

SERVICE_FILE = Path(__file__).resolve().parents[1] / "deploy" / "service.py"
SERVICE_TARGET = "deploy.service:ImageClassifier"
# Where service.py looks for the model, relative to the bento's src/ (and the staging dir).
MODEL_SUBDIR = Path("deploy") / "model"
INPUT_NAME = "images"
# What service.py imports besides bentoml (which BentoML pins in the bento by itself).
RUNTIME_PACKAGES = ("onnxruntime", "numpy")
# Bump when the bento layout changes in a way the hashed files do not show.
LAYOUT_VERSION = 1


@dataclass(frozen=True)
class PackageResult:
    tag: str  # name:version, the version being "r" + 12 hex digits of the content hash
    archive: Path  # the exported .bento file, absolute
    served_variant: str
    model_version: str  # what the service answers with: the bento's version
    model_bytes: int
    reused: bool  # the store already held this exact bento


def pinned_requirements(names: tuple[str, ...] = RUNTIME_PACKAGES) -> list[str]:
    """``name==version`` for each package, as installed here (the bento is built offline)."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise StageError(f"package {name!r} is not installed; the service needs it") from None
    return pins


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

    ``accuracy``/``macro_f1`` are the served ONNX variant's (from compress.json), falling back
    to the PyTorch model's (evaluate.json) when compress.json lacks them.
    """

    def numbers(source: dict | None, keys: tuple[str, ...], prefix: str = "") -> dict:
        source = source or {}
        return {
            prefix + k: float(source[k])
            for k in keys
            if isinstance(source.get(k), int | float) and not isinstance(source.get(k), bool)
        }

    served = ((compress or {}).get("variants") or {}).get(variant)
    out = numbers(evaluate, ("accuracy", "macro_f1"), prefix="pytorch_")
    out.update(numbers(served if isinstance(served, dict) else None, ("accuracy", "macro_f1")))
    for key in ("accuracy", "macro_f1"):
        if key not in out and f"pytorch_{key}" in out:
            out[key] = out[f"pytorch_{key}"]
    return dict(sorted(out.items()))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_model(onnx_file: Path, image_shape: tuple[int, ...], n_classes: int) -> None:
    """Fail before building when the model cannot serve images of the data set's shape."""
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
            f"{onnx_file} cannot run a batch of 2 images shaped {tuple(image_shape)}: {exc}"
        ) from None
    if logits.shape != (2, n_classes):
        raise StageError(
            f"{onnx_file} answers logits shaped {logits.shape} for 2 images; the data set has "
            f"{n_classes} classes"
        )


def stage_source(
    onnx_file: Path, card: dict, staging_dir: Path, service_file: Path = SERVICE_FILE
) -> None:
    """Lay out the bento's source in a clean ``staging_dir``: the service and its model."""
    staging_dir = Path(staging_dir)
    shutil.rmtree(staging_dir, ignore_errors=True)
    model_dir = staging_dir / MODEL_SUBDIR
    model_dir.mkdir(parents=True)
    (staging_dir / "deploy" / "__init__.py").write_text('"""The served model and its service."""\n')
    shutil.copyfile(service_file, staging_dir / "deploy" / "service.py")
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
        digest.update(rel.encode() + b"\0" + sha256_file(path).encode() + b"\0")
    return "r" + digest.hexdigest()[:12]


def _store_matches(bento_src: Path, staging_dir: Path) -> bool:
    """Whether a stored bento's src/ holds exactly the files we staged (not tampered with)."""
    for rel, path in _source_files(staging_dir).items():
        stored = Path(bento_src) / rel
        if not stored.is_file() or sha256_file(stored) != sha256_file(path):
            return False
    return True


def build_bento(
    staging_dir: Path, name: str, version: str, labels: dict, description: str, packages: list
) -> bool:
    """Build ``name:version`` from ``staging_dir`` into the store; True when reused as is."""
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    tag = f"{name}:{version}"
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
    try:
        _build(staging_dir, name, version, labels, description, packages)
    except BentoMLException as exc:  # e.g. no `uv` and no index to install it from
        raise StageError(f"bentoml could not build {tag}: {exc}") from exc
    return False


def _build(
    staging_dir: Path, name: str, version: str, labels: dict, description: str, packages: list
) -> None:
    import bentoml

    bentoml.bentos.build(
        SERVICE_TARGET,
        name=name,
        version=version,
        labels=labels,
        description=description,
        include=["deploy/**"],
        exclude=["__pycache__/", "*.pyc"],
        # Offline: pinned to what is installed here, and no `uv pip compile` lock step.
        python={"packages": packages, "lock_packages": False},
        build_ctx=str(Path(staging_dir).resolve()),
    )


def export_archive(tag: str, artefacts_dir: Path) -> Path:
    """Export the bento to ``artefacts_dir/<name>-<version>.bento``; drop older archives."""
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
    for old in artefacts_dir.glob(f"{name}-*.bento"):
        if old != archive:
            old.unlink()
    return archive


def describe(card: dict) -> str:
    shape = "x".join(str(d) for d in card["image_shape"])
    accuracy = card["metrics"].get("accuracy")
    lines = [
        f"# {card['model']}",
        "",
        f"Classifies {shape} images (C x H x W, raw pixel values 0-255) into "
        f"{len(card['class_names'])} classes with the {card['served_variant']} ONNX model.",
    ]
    if accuracy is not None:
        lines.append(f"Test accuracy: {accuracy:.4f}.")
    lines += [
        "",
        '`POST /predict {"image": [[...]]}`, `POST /predict_batch {"images": [...]}` (at most '
        f"{card['max_batch_size']}), `POST /info`; health: `/readyz`, `/livez`.",
    ]
    return "\n".join(lines) + "\n"


def package(
    onnx_file: Path,
    meta_file: Path,
    *,
    bento_name: str,
    model_name: str,
    served_variant: str,
    max_batch_size: int,
    staging_dir: Path,
    artefacts_dir: Path,
    metrics: dict | None = None,
    service_file: Path = SERVICE_FILE,
) -> PackageResult:
    """The core, on explicit paths: stage, build (or reuse), export, write ``bento.json``."""
    onnx_file, meta_file = Path(onnx_file), Path(meta_file)
    if not onnx_file.is_file():
        raise StageError(
            f"{onnx_file} not found: run the compress stage first (it writes the "
            f"{served_variant!r} model that compress.serve_variant selects)"
        )
    try:
        meta = DatasetMeta.load(meta_file)
    except (DatasetError, KeyError, json.JSONDecodeError) as exc:
        raise StageError(f"cannot read the data set's metadata {meta_file}: {exc}") from None
    if len(set(meta.class_names)) != len(meta.class_names):
        raise StageError(f"{meta_file}: class names must be unique, got {meta.class_names}")
    check_model(onnx_file, meta.image_shape, len(meta.class_names))

    model_digest = sha256_file(onnx_file)
    metrics = dict(metrics or {})
    card = {
        "model": f"{model_name}:{served_variant}-{model_digest[:12]}",
        "model_sha256": model_digest,
        "served_variant": served_variant,
        "class_names": list(meta.class_names),
        "image_shape": list(meta.image_shape),
        "max_batch_size": max_batch_size,
        "metrics": metrics,
    }
    stage_source(onnx_file, card, staging_dir, service_file)

    labels = {
        "model_name": model_name,
        "model": card["model"],
        "served_variant": served_variant,
        "image_shape": "x".join(str(d) for d in meta.image_shape),
        "num_classes": str(len(meta.class_names)),
        **{k: f"{v:.6g}" for k, v in metrics.items()},
    }
    packages = pinned_requirements()
    description = describe(card)
    build_options = {
        "layout": LAYOUT_VERSION,
        "service": SERVICE_TARGET,
        "labels": labels,
        "description": description,
        "packages": packages,
        "bentoml": metadata.version("bentoml"),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    # The version hashes everything staged so far; the card then records it, so every answer
    # of the service names the bento it came from (the field itself is left out of the hash).
    version = content_version(staging_dir, build_options)
    tag = f"{bento_name}:{version}"
    card["model_version"] = version
    write_card(card, Path(staging_dir))

    reused = build_bento(staging_dir, bento_name, version, labels, description, packages)
    archive = export_archive(tag, artefacts_dir)  # absolute: `bentoml import` needs that
    result = PackageResult(
        tag=tag,
        archive=archive,
        served_variant=served_variant,
        model_version=card["model_version"],
        model_bytes=onnx_file.stat().st_size,
        reused=reused,
    )
    write_json(
        Path(artefacts_dir) / "bento.json",
        {
            "tag": result.tag,
            "archive": str(result.archive),
            "served_variant": result.served_variant,
            "model_version": result.model_version,
            "model": card["model"],
            "model_bytes": result.model_bytes,
            "metrics": metrics,
        },
    )
    log.info(
        "bento %s (%s model, %d B)%s -> %s",
        tag,
        served_variant,
        result.model_bytes,
        " reused" if reused else "",
        archive,
    )
    return result


def run(params: Params) -> PackageResult:
    """The stage: read the pipeline's outputs named in params.yaml and call :func:`package`."""
    paths, variant = params.paths, params.compress.serve_variant
    metrics_dir = Path(paths.metrics_dir)
    metrics = summarise_metrics(
        read_optional_json(metrics_dir / "evaluate.json"),
        read_optional_json(metrics_dir / "compress.json"),
        variant,
    )
    return package(
        Path(paths.model_dir) / "onnx" / f"{variant}.onnx",
        meta_path(paths.prepared_dir),
        bento_name=params.package.bento_name,
        model_name=params.package.model_name,
        served_variant=variant,
        max_batch_size=params.package.max_batch_size,
        # Scratch, git-ignored; rebuilt from nothing on every run.
        staging_dir=Path.cwd() / "build" / "bento" / params.package.bento_name,
        artefacts_dir=Path(paths.artefacts_dir),
        metrics=metrics,
    )


if __name__ == "__main__":
    main("package", run)
