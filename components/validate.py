"""Validate: check the prepared splits against the data set's metadata before training.

Great Expectations (1.x API) runs expectation suites on small pandas tables built from each
split. What those tables and suites are is the data kind's (components/kinds/): a summary row
per image, the rows of a table or time series as read, a summary row per sequence. One suite is
the same for every kind: ``class_counts`` (one row per known class, zero-count rows included,
so an absent class fails too) needs ``validate.min_rows_per_class`` examples of every class in
the training split of a classification, and its share of them in a smaller split
(:func:`class_minimums`). Plain numpy checks (also the kind's) cover what a summary
table cannot see, such as the arrays' dtypes.

A sharded split (components/dataset.py) is summarised in one pass, a shard at a time; above
``validate.max_summary_rows`` summaries the suites run on a seeded sample of them, while the
class counts and the reported statistics come from every example. The rows as read (tables,
time series) of a split stored for reading in parts are read as that same seeded sample, a
batch at a time: validation never holds such a split's rows whole.

GX state lives in an in-memory (ephemeral) context; only the Data Docs HTML is written, to
``paths.reports_dir/validation``, next to our own summary in ``paths.metrics_dir/validation.json``.
A failed validation raises :class:`StageError` naming every failed check, after both outputs
are written.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components import kinds
from components.config import Params, ValidateParams
from components.dataset import (
    SPLITS,
    ArraySet,
    DatasetMeta,
    ShardedSet,
    Split,
    load_split,
    meta_path,
    sample_positions,
    stored_out_of_memory,
)
from components.kinds.checks import MIN_ROWS_PARAM, Check, Detail, Expectation
from components.records import VALIDATION_FILE, ValidationSummary
from components.stage import StageError, main, write_json, write_text

log = logging.getLogger("pipeline.validate")

DOCS_SITE = "validation"
STATISTICS_FILE = "statistics.json"  # every split's statistics, beside the pages
COUNTS_SUITE = "class_counts"

__all__ = ["Check", "SuiteRun", "ValidationResult", "check_splits", "class_count_table", "run"]


@dataclass(frozen=True)
class SuiteRun:
    """One expectation suite run on one split: a row of the Data Docs landing page."""

    split: str
    suite: str
    passed: int
    failed: int


@dataclass(frozen=True)
class ValidationResult:
    success: bool
    checks: tuple[Check, ...]
    stats: dict[str, dict]  # per split: examples, class_counts, dtypes (what the kind reports)
    docs_index: Path | None = None  # Data Docs index.html, when docs were built
    suite_runs: tuple[SuiteRun, ...] = ()  # one per split and suite, in the order they ran
    failed: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "failed", tuple(str(c) for c in self.checks if not c.passed))

    @property
    def evaluated_expectations(self) -> int:
        return len(self.checks)


# ---------------------------------------------------------------- class counts (every kind)


def class_count_table(labels: np.ndarray, n_classes: int) -> pd.DataFrame:
    """One row per known class with its number of examples; absent classes get a 0 row."""
    counts = pd.Series(labels).value_counts().reindex(range(n_classes), fill_value=0)
    return pd.DataFrame({"label": np.arange(n_classes), "count": counts.to_numpy(np.int64)})


def _counts_detail(result: dict, ctx: dict) -> str:
    names = ctx["class_names"]
    rows = sorted(result.get("partial_unexpected_index_list", []), key=lambda r: int(r["label"]))
    text = "; ".join(f"class '{names[int(r['label'])]}' has {int(r['count'])}" for r in rows)
    more = result["unexpected_count"] - len(rows)  # GX lists at most 20 rows in a summary
    return f"{text}; and {more} more classes" if more > 0 else text


def counts_expectations(minimum: int, why: str = "") -> list[Expectation]:
    return [
        Expectation("ExpectColumnValuesToBeBetween", "count",
                    f"label counts per class >= {minimum}{why}", _counts_detail,
                    {"min_value": minimum}, param=MIN_ROWS_PARAM),
    ]  # fmt: skip


def class_minimums(sizes: Mapping[str, int], min_rows: int) -> dict[str, tuple[int, str]]:
    """The rows every class needs in each split, and why when it is not ``min_rows``.

    ``min_rows`` in the training split; in a smaller split, its share: ``min_rows`` times the
    split's size over train's, rounded up, at least 1. A stratified split gives each class
    rows in proportion to the split's size, so ``min_rows`` in every split would ask for
    ``min_rows`` over the validation fraction in every class: 100 rows at the defaults, which
    refused iris (50 a class, 5 in its validation split). An absent class fails in every split.
    """
    train = sizes.get("train", 0)
    out = {}
    for split, n in sizes.items():
        if split == "train" or n >= train:
            out[split] = (min_rows, "")
            continue
        share = max(1, min(min_rows, math.ceil(min_rows * n / train)))
        why = f" ({min_rows} in train, scaled to this split's {n} rows of {train})"
        out[split] = (share, why if share < min_rows else "")
    return out


# ---------------------------------------------------------------- expectation suites


def _gx():
    """Import Great Expectations quietly (slow: ~3 s, so only when a stage needs it)."""
    # GX 1.x releases that still send usage statistics read this when imported; 1.24 sends none.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    return gx


def suites_for(meta: DatasetMeta, params: ValidateParams) -> dict[str, list[Expectation]]:
    """The kind's suites, then the class counts of a classification."""
    named = dict(kinds.get(meta.kind).expectations(meta, params))
    if not meta.is_regression:
        named[COUNTS_SUITE] = counts_expectations(params.min_rows_per_class)
    return named


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


def streamed_summaries(kind, split: str, data: ShardedSet, meta: DatasetMeta, frame=None):
    """A sharded split's summary tables and array checks in one pass, a shard at a time: each
    shard's per-example summaries, concatenated (a table the kind builds from the rows as read,
    ``frame``, is taken once), and each check passed only when it passed on every shard (the
    first failing shard's finding reported)."""
    parts: dict[str, list] = {}
    merged: dict[str, Check] = {}
    for x, y in data.chunks():
        chunk = ArraySet(x, y)
        for name, table in kind.summary_tables(chunk, meta, frame).items():
            if table is frame and name in parts:
                continue
            parts.setdefault(name, []).append(table)
        for check in kind.array_checks(split, chunk, meta):
            seen = merged.get(check.description)
            if seen is None or (seen.passed and not check.passed):
                merged[check.description] = check
    tables = {
        name: ts[0] if ts[0] is frame else pd.concat(ts, ignore_index=True)
        for name, ts in parts.items()
    }
    return tables, list(merged.values())


def sampled(table, max_rows: int, seed: int):
    """At most ``max_rows`` rows of ``table``, a seeded sample in order (the suites' input when
    a sharded split has more per-example summaries than that)."""
    if table is None or len(table) <= max_rows:
        return table
    keep = sample_positions(len(table), max_rows, seed)
    return table.iloc[keep].reset_index(drop=True)


def check_splits(
    splits: Mapping[str, Split],
    meta: DatasetMeta,
    params: ValidateParams,
    docs_dir: Path | None = None,
    frames: Mapping[str, pd.DataFrame] | None = None,
    counted: Mapping[str, dict | None] | None = None,
) -> ValidationResult:
    """Run every check on every split; build Data Docs into ``docs_dir`` when given.

    ``frames`` are the splits' rows as read, for kinds that keep them (tables, time series),
    and ``counted`` the kind's statistics of every one of those rows (``rows_stats``): where a
    frame is a sample of its split, the kind's checks on the counts bound what the sample
    cannot see. Never raises on bad data: the result's ``success`` and ``failed`` say what is
    wrong.
    """
    gx = _gx()
    from great_expectations.core.run_identifier import RunIdentifier

    kind = kinds.get(meta.kind)
    context = _context(docs_dir)
    source = context.data_sources.add_pandas("prepared")

    def added(name: str, expectations: list[Expectation]) -> tuple[object, dict]:
        configured = [
            getattr(gx.expectations, e.type)(column=e.column, description=e.description,
                                             **e.options)
            for e in expectations
        ]  # fmt: skip
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=configured))
        return suite, {e.description: e for e in expectations}

    suites = {name: added(name, e) for name, e in suites_for(meta, params).items()}
    # Each split's size as ingest planned it: one that lost a class does not lower its own bar.
    planned = {s: int(meta.split_sizes.get(s, len(d))) for s, d in splits.items()}
    minimums = class_minimums(planned, params.min_rows_per_class)
    run_id = RunIdentifier(run_name="validate")
    ctx = {"class_names": meta.class_names}

    checks: list[Check] = []
    runs: list[SuiteRun] = []
    stats: dict[str, dict] = {}
    for split, data in splits.items():
        frame = frames[split] if frames else None
        if isinstance(data, ShardedSet):
            tables, split_checks = streamed_summaries(kind, split, data, meta, frame)
            suite_tables = {
                name: sampled(table, params.max_summary_rows, seed=0)
                for name, table in tables.items()
            }
        else:
            tables = dict(kind.summary_tables(data, meta, frame))
            split_checks = kind.array_checks(split, data, meta)
            suite_tables = tables
        counts = class_count_table(data.y, len(meta.class_names))
        tables[COUNTS_SUITE] = suite_tables[COUNTS_SUITE] = counts
        checks += split_checks
        split_suites = dict(suites)
        minimum, why = minimums[split]
        if COUNTS_SUITE in suites and why:
            split_suites[COUNTS_SUITE] = added(f"{COUNTS_SUITE}_{split}",
                                               counts_expectations(minimum, why))  # fmt: skip
        for name, (suite, expected) in split_suites.items():
            # One asset per split and table, so each Data Docs page names its split.
            batch = source.add_dataframe_asset(
                f"{split}_{name}"
            ).add_batch_definition_whole_dataframe("all")
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=f"{split}_{name}", data=batch, suite=suite)
            )
            outcome = definition.run(
                batch_parameters={"dataframe": suite_tables[name]},
                result_format={
                    "result_format": "SUMMARY",
                    "unexpected_index_column_names": (
                        ["label"] if "label" in suite_tables[name] else []
                    ),
                },
                run_id=run_id,
            )
            for result in outcome.results:
                e = expected[result.expectation_config.description]
                detail = "" if result.success else _describe_failure(result, e.detail, ctx)
                checks.append(Check(split, e.description, bool(result.success), detail, e.param))
            ok = sum(bool(r.success) for r in outcome.results)
            runs.append(SuiteRun(split, name, ok, len(outcome.results) - ok))
        class_counts = {
            meta.class_names[i]: int(c)
            for i, c in zip(counts["label"], counts["count"], strict=True)
        }
        stats[split] = kind.split_stats(data, tables, meta, class_counts)
        every_row = (counted or {}).get(split)
        if every_row is not None:
            stats[split]["rows_as_read"] = every_row
            seen = None if frame is None else len(frame)
            if seen is not None and isinstance(data, ShardedSet):
                seen = min(seen, params.max_summary_rows)
            if seen is not None and seen < every_row["rows"]:  # the suites saw a sample
                checks += kind.counted_checks(split, every_row, meta, params)

    docs_index = None
    if docs_dir is not None:
        context.build_data_docs(site_names=[DOCS_SITE])
        docs_index = write_landing_page(Path(docs_dir), runs)
    checks_t = tuple(checks)
    return ValidationResult(
        success=all(c.passed for c in checks_t),
        checks=checks_t,
        stats=stats,
        docs_index=docs_index,
        suite_runs=tuple(runs),
    )


# ---------------------------------------------------------------- outputs

GX_INDEX = "gx-index.html"
_PAGE_CSS = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
.fail{background:#fdd}.pass td:nth-child(3){color:#070}"""


def write_landing_page(docs_dir: Path, runs: list[SuiteRun]) -> Path:
    """Replace GX's ``index.html`` with a static one that works offline; keep GX's beside it.

    GX's index builds its table in the browser from scripts on five CDNs, so on a closed
    network it is an empty page. Its validation and suite pages are rendered HTML (only their
    styles are remote): the landing page lists every split and suite with its verdict and links
    to those pages, found where GX wrote them.
    """
    gx_index = docs_dir / "index.html"
    if gx_index.is_file():
        os.replace(gx_index, docs_dir / GX_INDEX)

    def link(path: Path | None, text: str) -> str:
        if path is None:
            return html.escape(text)
        href = html.escape(path.relative_to(docs_dir).as_posix())
        return f'<a href="{href}">{html.escape(text)}</a>'

    rows = []
    for r in runs:
        # GX names a validation page <data source>-<asset>.html under validations/<suite>/.
        pages = sorted((docs_dir / "validations" / r.suite).rglob(f"*-{r.split}_{r.suite}.html"))
        suite_page = docs_dir / "expectations" / f"{r.suite}.html"
        verdict = "pass" if r.failed == 0 else "FAIL"
        result = link(pages[-1], "result") if pages else "not written"
        rows.append(
            f"<tr class={'pass' if r.failed == 0 else 'fail'}><td>{html.escape(r.split)}</td>"
            f"<td>{link(suite_page if suite_page.is_file() else None, r.suite)}</td>"
            f"<td>{verdict}</td><td>{r.passed} of {r.passed + r.failed}</td>"
            f"<td>{result}</td></tr>"
        )
    failed = sum(r.failed > 0 for r in runs)
    verdict = "passed" if failed == 0 else f"FAILED ({failed} of {len(runs)} suite runs)"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Data Docs: {verdict}</title>
<style>{_PAGE_CSS}</style></head>
<body><h1>Data Docs: validation {verdict}</h1>
<p>Each expectation suite on each prepared split, with Great Expectations' page of its result.
Every check and what it found: <a href="summary.html">the validation summary</a>.
GX's own interactive index (it loads its scripts and styles from the internet):
<a href="{GX_INDEX}">{GX_INDEX}</a>.</p>
<table><tr><th>split</th><th>suite</th><th>verdict</th><th>expectations met</th>
<th>GX page</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    write_text(gx_index, page)
    return gx_index


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
<style>{_PAGE_CSS}</style></head>
<body><h1>Data validation: {verdict}</h1>
<p>{result.evaluated_expectations} checks. Great Expectations' pages of each suite's result:
<a href="index.html">Data Docs</a>.</p>
<table><tr><th>split</th><th>expectation</th><th>result</th><th>found</th></tr>
{rows}
</table>
{stats_html(result.stats)}</body></html>
"""


def stats_html(stats: Mapping[str, dict]) -> str:
    """Each split's statistics (also in ``statistics.json``), from every example: the kind's
    figures, then each column of the rows as read with its missing share and range."""

    def shown(value) -> str:
        return html.escape(value if isinstance(value, str) else json.dumps(value))

    items = "\n".join(
        f"<li><b>{html.escape(split)}</b>: "
        + "; ".join(f"{html.escape(k)} {shown(v)}" for k, v in found.items() if k != "rows_as_read")
        + "</li>"
        for split, found in stats.items()
    )
    columns = "\n".join(
        f"<tr><td>{html.escape(split)}</td><td>{html.escape(name)}</td>"
        f"<td>{c['missing']:.2%}</td><td>{shown(c.get('min', ''))}</td>"
        f"<td>{shown(c.get('max', ''))}</td></tr>"
        for split, found in stats.items()
        for name, c in found.get("rows_as_read", {}).get("columns", {}).items()
    )
    table = (
        "<h2>Rows as read, every row</h2>\n<table><tr><th>split</th><th>column</th>"
        f"<th>missing</th><th>min</th><th>max</th></tr>\n{columns}\n</table>\n"
        if columns
        else ""
    )
    return f"<h2>Statistics of every example</h2>\n<ul>\n{items}\n</ul>\n{table}"


def rows_as_read(kind, prepared_dir: Path, meta: DatasetMeta, max_rows: int):
    """Each split's rows as read, for the kinds that keep them: whole for a split held in
    memory, at most ``max_rows`` of them (the seeded sample :func:`sampled` takes, read in
    batches) for a split stored to be read in parts, whose rows may not fit in memory."""
    frames = {}
    for split in SPLITS:
        bound = max_rows if stored_out_of_memory(prepared_dir, split) else None
        rows = kind.raw_splits(prepared_dir, meta, (split,), bound)
        if rows is None:
            return None
        frames |= rows
    return frames


def run(params: Params) -> ValidationResult:
    """Load the prepared splits, validate them, write the reports; raise if a check failed."""
    paths = params.paths
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    kind = kinds.get(meta.kind)
    prepared = Path(paths.prepared_dir)
    splits = {split: load_split(prepared, split) for split in SPLITS}
    frames = rows_as_read(kind, prepared, meta, params.validate_.max_summary_rows)
    docs_dir = Path(paths.reports_dir) / "validation"
    if docs_dir.exists():
        shutil.rmtree(docs_dir)  # Data Docs keeps one page per run: drop the stale ones
    counted = {split: kind.rows_stats(prepared, meta, split) for split in SPLITS}
    result = check_splits(splits, meta, params.validate_, docs_dir, frames, counted)
    write_json(docs_dir / STATISTICS_FILE, result.stats)
    write_text(docs_dir / "summary.html", summary_html(result))
    write_json(
        Path(paths.metrics_dir) / VALIDATION_FILE,
        ValidationSummary(
            success=result.success,
            evaluated_expectations=result.evaluated_expectations,
            failed=tuple(result.failed),
        ),
    )
    log.info(
        "%d checks on %s, %d failed; report: %s",
        result.evaluated_expectations,
        ", ".join(f"{s} ({len(splits[s])} {kind.plural})" for s in result.stats),
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
