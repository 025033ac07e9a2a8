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

How a bento is built (pins, staging, content hash, build, export) is components/bento_build.py;
what it says about its model (card, checks, description) is components/bento_card.py.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from components import records
from components.bento_build import (
    CLOUD,
    DEPLOY_DIR,
    EDGE,
    LAYOUT_VERSION,
    SERVING_FILES,
    BentoKind,
    build_bento,
    content_version,
    dependency_closure,
    export_archive,
    installed_bytes,
    pinned_requirements,
    stage_source,
    write_card,
)
from components.bento_card import (
    check_meta,
    check_model,
    describe,
    model_card,
    shape_labels,
    summarise_metrics,
)
from components.config import EDGE_INT8_VARIANT, PackageParams, Params
from components.dataset import DatasetError, DatasetMeta, meta_path
from components.stage import StageError, main, repo_relative, write_json

log = logging.getLogger("pipeline.package")

EDGE_VARIANT = EDGE_INT8_VARIANT  # the edge bento serves int8.onnx
# Re-exported for the tests and benches that build bentos through this stage.
__all__ = [
    "CLOUD", "DEPLOY_DIR", "EDGE", "SERVING_FILES", "BentoResult", "PackageResult",
    "content_version", "dependency_closure", "package", "pinned_requirements", "run",
    "summarise_metrics",
]  # fmt: skip


@dataclass(frozen=True)
class BentoResult:
    tag: str  # name:version, the version being "r" + 12 hex digits of the content hash
    archive: Path  # the exported .bento file, absolute
    served_variant: str
    model_version: str  # what the service answers with: the bento's version
    model_bytes: int
    archive_bytes: int
    packages_bytes: int  # size of the pinned Python packages, as their wheels record it
    reused: bool  # the store already held this exact bento


@dataclass(frozen=True)
class PackageResult(BentoResult):
    """The cloud bento's figures, and the edge bento's (None when it was not asked for)."""

    edge: BentoResult | None = None


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
        **shape_labels(card),
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


def _check_onnx_exists(onnx_file: Path, variant: str) -> None:
    if not Path(onnx_file).is_file():
        raise StageError(
            f"{onnx_file} not found: run the compress stage first (it writes the {variant!r} model)"
        )


def _bento_summary(result: BentoResult, card: dict, metrics: dict) -> dict:
    return {
        "tag": result.tag,
        "archive": repo_relative(result.archive),  # the same in every clone
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

    card = model_card(onnx_file, meta, settings.model_name, served_variant)
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
        edge_card = model_card(Path(edge_onnx_file), meta, settings.model_name, EDGE_VARIANT)
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
    evaluate = records.read_evaluate(metrics_dir).numbers()
    # The compress stage's selection policy (compress.select) decides what is served.
    compress = records.read_compress(metrics_dir).model_dump()
    variant = compress["served_variant"]
    onnx_dir = Path(paths.model_dir) / "onnx"
    # The edge box has no bigger model to fall back on (a regression edge never asks the
    # cloud): an int8 model that failed its drop gate against fp32 is not shipped there.
    int8 = compress["variants"].get(EDGE_VARIANT) or {}
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
