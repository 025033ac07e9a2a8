"""Validate: check the prepared splits against the data set's metadata before training.

Great Expectations (1.x API) runs two expectation suites on small pandas tables built from
each split, never on the raw pixels (a 785-column pixel table is slow):

- ``images``: one row per image (label, channels, height, width, pixel min/max/mean, has_nan):
  shape equals ``meta.image_shape``, pixels within 0-255, labels in the known class set, and
  at most ``validate.max_missing_fraction`` of the images hold a NaN pixel;
- ``class_counts``: one row per known class (zero-count rows included, so an absent class
  fails too): every class has at least ``validate.min_rows_per_class`` images in every split.

Tables and time series are checked as they were read (``prepared/<split>.parquet``), by a
``rows`` suite: every input column has at most ``validate.max_missing_fraction`` missing values
and every row has a target. Per-sample sequences get a ``sequences`` suite on one row per
sequence (steps, features, NaN). Class counts apply to every classification.

Plain numpy checks cover what a summary table cannot see: the arrays' dtypes (pixels
``uint8``, labels ``int64``). GX state lives in an in-memory (ephemeral) context; only the
Data Docs HTML is written, to ``paths.reports_dir/validation``, next to our own summary in
``paths.metrics_dir/validation.json``. A failed validation raises :class:`StageError` naming
every failed check, after both outputs are written.
"""

from __future__ import annotations

import html
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import Params, ValidateParams
from components.dataset import (
    SPLITS,
    DatasetMeta,
    ImageSet,
    load_images,
    meta_path,
    split_path,
    table_path,
)
from components.stage import StageError, main, write_json

log = logging.getLogger("pipeline.validate")

DOCS_SITE = "validation"
IMAGES_SUITE = "images"
COUNTS_SUITE = "class_counts"
ROWS_SUITE = "rows"
SEQUENCES_SUITE = "sequences"
FEATURE_DTYPE = np.dtype(np.float32)
TARGET_DTYPE = np.dtype(np.float32)
PIXEL_DTYPE = np.dtype(np.uint8)
LABEL_DTYPE = np.dtype(np.int64)


@dataclass(frozen=True)
class Check:
    """One evaluated expectation (GX or numpy) on one split."""

    split: str
    description: str  # what was expected, e.g. "pixel max <= 255"
    passed: bool
    detail: str = ""  # what was found, when it failed

    def __str__(self) -> str:
        text = f"{self.split}: {self.description}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class ValidationResult:
    success: bool
    checks: tuple[Check, ...]
    stats: dict[str, dict]  # per split: images, class_counts, pixel_mean, dtypes
    docs_index: Path | None = None  # Data Docs index.html, when docs were built
    failed: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "failed", tuple(str(c) for c in self.checks if not c.passed))

    @property
    def evaluated_expectations(self) -> int:
        return len(self.checks)


# ---------------------------------------------------------------- tables (pure pandas/numpy)


def image_table(images: ImageSet) -> pd.DataFrame:
    """One row per image: label, shape and pixel summary (min, max, mean, has_nan)."""
    x = images.x
    n, channels, height, width = x.shape
    pixels = x.reshape(n, channels * height * width)
    numeric = np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_
    if numeric and pixels.shape[1] > 0 and n > 0:
        has_nan = (
            np.isnan(pixels).any(axis=1)
            if np.issubdtype(x.dtype, np.inexact)
            else np.zeros(n, bool)
        )
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN images: NaN stats
            pixel_min = np.nanmin(pixels, axis=1).astype(np.float64)
            pixel_max = np.nanmax(pixels, axis=1).astype(np.float64)
            pixel_mean = np.nanmean(pixels, axis=1, dtype=np.float64)
    else:  # no pixels, or not numbers (the dtype check reports it): nothing to summarise
        has_nan = np.zeros(n, bool)
        pixel_min = pixel_max = pixel_mean = np.full(n, np.nan)
    return pd.DataFrame(
        {
            "label": images.y,
            "channels": np.full(n, channels, np.int64),
            "height": np.full(n, height, np.int64),
            "width": np.full(n, width, np.int64),
            "pixel_min": pixel_min,
            "pixel_max": pixel_max,
            "pixel_mean": pixel_mean,
            "has_nan": has_nan,
        }
    )


def sequence_table(data: ImageSet) -> pd.DataFrame:
    """One row per sequence: label, steps, features and whether it holds a NaN."""
    n = len(data)
    flat = data.x.reshape(n, -1).astype(np.float64)
    return pd.DataFrame(
        {
            "label": data.y,
            "steps": np.full(n, data.x.shape[1], np.int64),
            "features": np.full(n, data.x.shape[2] if data.x.ndim == 3 else 1, np.int64),
            "has_nan": ~np.isfinite(flat).all(axis=1) if flat.size else np.zeros(n, bool),
        }
    )


def class_count_table(labels: np.ndarray, n_classes: int) -> pd.DataFrame:
    """One row per known class with its number of images; absent classes get a 0 row."""
    counts = pd.Series(labels).value_counts().reindex(range(n_classes), fill_value=0)
    return pd.DataFrame({"label": np.arange(n_classes), "count": counts.to_numpy(np.int64)})


def dtype_checks(split: str, images: ImageSet, meta: DatasetMeta | None = None) -> list[Check]:
    """Numpy checks the summary tables cannot see: the arrays' dtypes."""
    if meta is not None and meta.kind != "image":
        want_y = TARGET_DTYPE if meta.is_regression else LABEL_DTYPE
        checks = [
            Check(split, f"feature dtype == {FEATURE_DTYPE}", images.x.dtype == FEATURE_DTYPE,
                  f"found {images.x.dtype}"),
            Check(split, f"target dtype == {want_y}", images.y.dtype == want_y,
                  f"found {images.y.dtype}"),
            Check(split, f"example shape == {tuple(meta.input_shape)}",
                  tuple(images.x.shape[1:]) == tuple(meta.input_shape),
                  f"found {tuple(images.x.shape[1:])}"),
        ]  # fmt: skip
        if meta.is_regression:
            bad = int((~np.isfinite(images.y)).sum())
            checks.append(Check(split, "every target is a finite number", bad == 0,
                                f"{bad} of {len(images)} are NaN or infinite"))  # fmt: skip
        return checks
    return [
        Check(
            split,
            f"pixel dtype == {PIXEL_DTYPE}",
            images.x.dtype == PIXEL_DTYPE,
            f"found {images.x.dtype}",
        ),
        Check(
            split,
            f"label dtype == {LABEL_DTYPE}",
            images.y.dtype == LABEL_DTYPE,
            f"found {images.y.dtype}",
        ),
    ]


# ---------------------------------------------------------------- expectation suites

# Turns a failed expectation's GX result (and our context: class names) into "found ...".
Detail = Callable[[dict, dict], str]


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _fmt(value) -> str:
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _found(pick: Callable[[list], object]) -> Detail:
    """Detail for a column check: the worst offending value and how many rows failed."""

    def detail(result: dict, _ctx: dict) -> str:
        values = [v for v in result.get("partial_unexpected_list", []) if v is not None]
        worst = f"found {_fmt(pick(values))} in " if values else ""
        return f"{worst}{result['unexpected_count']} of {_images(result['element_count'])}"

    return detail


def _nan_detail(result: dict, _ctx: dict) -> str:
    count, total = result["unexpected_count"], result["element_count"]
    return f"{count} of {_images(total)}, {count / total:.1%}" if total else "no images"


def _labels_detail(result: dict, _ctx: dict) -> str:
    values = sorted({_fmt(v) for v in result.get("partial_unexpected_list", [])})
    return f"found {', '.join(values)} in {_images(result['unexpected_count'])}"


def _counts_detail(result: dict, ctx: dict) -> str:
    names = ctx["class_names"]
    rows = sorted(result.get("partial_unexpected_index_list", []), key=lambda r: int(r["label"]))
    text = "; ".join(f"class '{names[int(r['label'])]}' has {int(r['count'])}" for r in rows)
    more = result["unexpected_count"] - len(rows)  # GX lists at most 20 rows in a summary
    return f"{text}; and {more} more classes" if more > 0 else text


def _gx():
    """Import Great Expectations quietly (slow: ~3 s, so only when a stage needs it)."""
    # GX 1.x releases that still send usage statistics read this when imported; 1.24 sends none.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    return gx


def _rows_detail(result: dict, _ctx: dict) -> str:
    count, total = result["unexpected_count"], result["element_count"]
    return f"{count} of {total} rows, {count / total:.1%}" if total else "no rows"


def _specs_to_suites(named: dict) -> dict[str, list[tuple[object, Detail]]]:
    return {
        name: [
            (cls(column=col, description=desc, **kw), detail)
            for cls, detail, col, desc, kw in specs
        ]
        for name, specs in named.items()
    }


def _counts_specs(e, params: ValidateParams) -> list:
    return [
        (e.ExpectColumnValuesToBeBetween, _counts_detail, "count",
         f"label counts per class >= {params.min_rows_per_class}",
         {"min_value": params.min_rows_per_class}),
    ]  # fmt: skip


def _other_suites(meta: DatasetMeta, params: ValidateParams, has_rows: bool) -> dict:
    """Tables and time series (``rows``), per-sample sequences (``sequences``)."""
    e = _gx().expectations
    mostly = 1.0 - params.max_missing_fraction
    named: dict[str, list] = {}
    if has_rows:
        columns = [c["name"] for c in (meta.preprocess or {}).get("columns", [])]
        rows = [
            (e.ExpectColumnValuesToNotBeNull, _rows_detail, name,
             f"column {name!r}: missing values <= {params.max_missing_fraction:.1%}",
             {"mostly": mostly})
            for name in columns
        ]  # fmt: skip
        if meta.target and meta.target not in columns:
            rows.append(
                (e.ExpectColumnValuesToNotBeNull, _rows_detail, meta.target,
                 f"every row has a target {meta.target!r}", {})
            )  # fmt: skip
        named[ROWS_SUITE] = rows
    else:
        steps, width = (tuple(meta.input_shape) + (1,))[:2]
        named[SEQUENCES_SUITE] = [
            (e.ExpectColumnValuesToBeInSet, _found(max), "steps", f"sequence steps == {steps}",
             {"value_set": [steps]}),
            (e.ExpectColumnValuesToBeInSet, _found(max), "features",
             f"sequence features == {width}", {"value_set": [width]}),
            (e.ExpectColumnValuesToBeInSet, _nan_detail, "has_nan",
             f"sequences with NaN <= {params.max_missing_fraction:.1%}",
             {"value_set": [False], "mostly": mostly}),
        ]  # fmt: skip
    if not meta.is_regression:
        named[COUNTS_SUITE] = _counts_specs(e, params)
    return _specs_to_suites(named)


def _suites(
    meta: DatasetMeta, params: ValidateParams, has_rows: bool = False
) -> dict[str, list[tuple[object, Detail]]]:
    """The suites as (expectation, detail formatter) pairs, keyed by suite name."""
    if meta.kind != "image":
        return _other_suites(meta, params, has_rows)
    e = _gx().expectations
    channels, height, width = meta.image_shape
    n_classes = len(meta.class_names)
    images = [
        (e.ExpectColumnValuesToBeInSet, _found(max), "channels", f"image channels == {channels}",
         {"value_set": [channels]}),
        (e.ExpectColumnValuesToBeInSet, _found(max), "height", f"image height == {height}",
         {"value_set": [height]}),
        (e.ExpectColumnValuesToBeInSet, _found(max), "width", f"image width == {width}",
         {"value_set": [width]}),
        (e.ExpectColumnValuesToBeBetween, _found(min), "pixel_min", "pixel min >= 0",
         {"min_value": 0}),
        (e.ExpectColumnValuesToBeBetween, _found(max), "pixel_max", "pixel max <= 255",
         {"max_value": 255}),
        # `mostly` is the share of rows that must pass: 1 - the share allowed to have a NaN.
        (e.ExpectColumnValuesToBeInSet, _nan_detail, "has_nan",
         f"images with NaN pixels <= {params.max_missing_fraction:.1%}",
         {"value_set": [False], "mostly": 1.0 - params.max_missing_fraction}),
        (e.ExpectColumnValuesToNotBeNull, _found(max), "label", "every image has a label", {}),
        (e.ExpectColumnValuesToBeInSet, _labels_detail, "label",
         f"labels in the known class set 0..{n_classes - 1}",
         {"value_set": list(range(n_classes))}),
    ]  # fmt: skip
    counts = _counts_specs(e, params)
    return _specs_to_suites({IMAGES_SUITE: images, COUNTS_SUITE: counts})


def _context(docs_dir: Path | None):
    """An in-memory GX context, quiet, whose only Data Docs site (if any) is ``docs_dir``."""
    gx = _gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites[DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),  # no "Calculating Metrics" bars
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _describe_failure(result, detail: Detail, ctx: dict) -> str:
    if result.exception_info.get("raised_exception"):
        return f"error: {result.exception_info.get('exception_message')}"
    for info in result.exception_info.values():  # per-metric errors, keyed by metric id
        if isinstance(info, dict) and info.get("raised_exception"):
            return f"error: {info.get('exception_message')}"
    return detail(result.result, ctx)


def check_splits(
    splits: Mapping[str, ImageSet],
    meta: DatasetMeta,
    params: ValidateParams,
    docs_dir: Path | None = None,
    frames: Mapping[str, pd.DataFrame] | None = None,
) -> ValidationResult:
    """Run every check on every split; build Data Docs into ``docs_dir`` when given.

    ``frames`` are a table's or time series' splits as read (checked by the ``rows`` suite).
    Never raises on bad data: the result's ``success`` and ``failed`` say what is wrong.
    """
    gx = _gx()
    from great_expectations.core.run_identifier import RunIdentifier

    context = _context(docs_dir)
    source = context.data_sources.add_pandas("prepared")
    suites = {}
    for name, pairs in _suites(meta, params, has_rows=bool(frames)).items():
        suite = context.suites.add(
            gx.ExpectationSuite(name=name, expectations=[exp for exp, _ in pairs])
        )
        details = {exp.description: detail for exp, detail in pairs}
        suites[name] = (suite, details)
    run_id = RunIdentifier(run_name="validate")
    ctx = {"class_names": meta.class_names}

    checks: list[Check] = []
    stats: dict[str, dict] = {}
    for split, images in splits.items():
        counts = class_count_table(images.y, len(meta.class_names))
        if meta.kind == "image":
            table = image_table(images)
            tables = {IMAGES_SUITE: table, COUNTS_SUITE: counts}
            checks += dtype_checks(split, images)
        else:
            tables = {COUNTS_SUITE: counts}
            if frames:
                tables[ROWS_SUITE] = frames[split]
            else:
                tables[SEQUENCES_SUITE] = sequence_table(images)
            checks += dtype_checks(split, images, meta)
        for name, (suite, details) in suites.items():
            # One asset per split and table, so each Data Docs page names its split.
            batch = source.add_dataframe_asset(
                f"{split}_{name}"
            ).add_batch_definition_whole_dataframe("all")
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=f"{split}_{name}", data=batch, suite=suite)
            )
            outcome = definition.run(
                batch_parameters={"dataframe": tables[name]},
                result_format={
                    "result_format": "SUMMARY",
                    "unexpected_index_column_names": ["label"] if "label" in tables[name] else [],
                },
                run_id=run_id,
            )
            for result in outcome.results:
                description = result.expectation_config.description
                detail = (
                    "" if result.success else _describe_failure(result, details[description], ctx)
                )
                checks.append(Check(split, description, bool(result.success), detail))
        class_counts = {
            meta.class_names[i]: int(c)
            for i, c in zip(counts["label"], counts["count"], strict=True)
        }
        if meta.kind == "image":
            stats[split] = {
                "images": len(images),
                "class_counts": class_counts,
                "pixel_mean": float(table["pixel_mean"].mean()) if len(table) else None,
                "pixel_dtype": str(images.x.dtype),
                "label_dtype": str(images.y.dtype),
            }
        else:
            stats[split] = {
                "examples": len(images),
                "class_counts": class_counts,
                "feature_dtype": str(images.x.dtype),
                "target_dtype": str(images.y.dtype),
            }
            if meta.is_regression and len(images):
                stats[split]["target_mean"] = float(np.nanmean(images.y.astype(np.float64)))

    docs_index = None
    if docs_dir is not None:
        context.build_data_docs(site_names=[DOCS_SITE])
        docs_index = Path(docs_dir) / "index.html"
    checks_t = tuple(checks)
    return ValidationResult(
        success=all(c.passed for c in checks_t), checks=checks_t, stats=stats, docs_index=docs_index
    )


# ---------------------------------------------------------------- outputs


def summary_html(result: ValidationResult) -> str:
    """A self-contained page of every check (Data Docs needs CDNs to look right)."""
    rows = "\n".join(
        f"<tr class={'pass' if c.passed else 'fail'}><td>{html.escape(c.split)}</td>"
        f"<td>{html.escape(c.description)}</td><td>{'pass' if c.passed else 'FAIL'}</td>"
        f"<td>{html.escape(c.detail) if not c.passed else ''}</td></tr>"
        for c in result.checks
    )
    verdict = "passed" if result.success else f"FAILED ({len(result.failed)} checks)"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Data validation: {verdict}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}
.fail{{background:#fdd}}.pass td:nth-child(3){{color:#070}}</style></head>
<body><h1>Data validation: {verdict}</h1>
<p>{result.evaluated_expectations} checks. Full Great Expectations report:
<a href="index.html">Data Docs</a> (styled only when online).</p>
<table><tr><th>split</th><th>expectation</th><th>result</th><th>found</th></tr>
{rows}
</table></body></html>
"""


def run(params: Params) -> ValidationResult:
    """Load the prepared splits, validate them, write the reports; raise if a check failed."""
    paths = params.paths
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    splits = {split: load_images(split_path(paths.prepared_dir, split)) for split in SPLITS}
    frames = None
    if meta.kind != "image" and table_path(paths.prepared_dir, "train").is_file():
        frames = {s: pd.read_parquet(table_path(paths.prepared_dir, s)) for s in SPLITS}
    docs_dir = Path(paths.reports_dir) / "validation"
    if docs_dir.exists():
        shutil.rmtree(docs_dir)  # Data Docs keeps one page per run: drop the stale ones
    result = check_splits(splits, meta, params.validate_, docs_dir, frames)
    (docs_dir / "summary.html").write_text(summary_html(result))
    write_json(
        Path(paths.metrics_dir) / "validation.json",
        {
            "success": result.success,
            "evaluated_expectations": result.evaluated_expectations,
            "failed": list(result.failed),
        },
    )
    log.info(
        "%d checks on %s, %d failed; report: %s",
        result.evaluated_expectations,
        ", ".join(
            f"{s} ({st['images']} images)" if "images" in st else f"{s} ({st['examples']} examples)"
            for s, st in result.stats.items()
        ),
        len(result.failed),
        docs_dir / "summary.html",
    )
    if not result.success:
        raise StageError(
            f"data validation failed ({len(result.failed)} of {result.evaluated_expectations} "
            "checks): " + "; ".join(result.failed)
        )
    return result


if __name__ == "__main__":
    main("validate", run)
