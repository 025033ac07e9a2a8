"""Tables: one example per row, the target a column; inputs encoded to ``float32`` ``(N, F)``.

Sources: a ``.csv`` or ``.parquet`` under ``data/external/``, or one of the small tables that
scikit-learn ships (``sklearn:iris``, ``sklearn:wine``, ``sklearn:breast_cancer``,
``sklearn:diabetes``; target column ``target``). Classification (split stratified by class) or
regression (split at random). Inputs are encoded by components/features.py with a transform
fitted on the training split only; the spec travels in ``meta.preprocess`` to training and
serving. Validation checks the rows as read (missing values per column, a target in every row).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from components import features
from components.dataset import (
    SPLITS,
    ArraySet,
    DatasetError,
    DatasetMeta,
    frame_stats,
    load_frame,
    table_path,
)
from components.kinds.base import (
    BUILTIN_TABLES,
    DataKind,
    Prepared,
    Streamed,
    StreamedSplits,
    local_source,
    random_split,
    sizes,
    stratified_split,
)
from components.kinds.checks import MISSING_PARAM, Check, Expectation, share
from components.stage import StageError

TABLE_SUFFIXES = (".csv", ".parquet")
MAX_AUTO_CLASSES = 20  # task auto: an integer target with at most this many values is a class
ROWS_SUITE = "rows"
FEATURE_DTYPE = np.dtype(np.float32)
TARGET_DTYPE = np.dtype(np.float32)
LABEL_DTYPE = np.dtype(np.int64)


# ---------------------------------------------------------------- reading (tables and series)


def load_builtin_table(name: str):
    from sklearn import datasets

    bunch = getattr(datasets, "load_" + name.split(":", 1)[1])(as_frame=True)
    frame = bunch.frame.copy()
    if "target_names" in bunch:  # a classification set: name the classes, not 0, 1, 2
        names = [str(n) for n in bunch.target_names]
        frame["target"] = [names[int(i)] for i in frame["target"]]
    return frame


def check_csv_rows(path: Path) -> None:
    """Refuse, naming the file, row and line, a CSV that is not UTF-8 text or whose rows do not
    all have the header's number of fields. pandas reads a row cut short (a truncated copy or
    download) as missing values without a word, and names neither the file nor the row of an
    undecodable byte."""
    import csv

    data_rows = 0
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                raise StageError(f"{path}: the file is empty (no header row)")
            for row in reader:
                if not row:  # a blank line: pandas skips it too
                    continue
                data_rows += 1
                if len(row) != len(header):
                    line = reader.line_num
                    last = not any(reader)  # only blank lines after it
                    raise StageError(
                        f"{path}, row {data_rows} (line {line}): {len(row)} field(s), but the "
                        f"header has {len(header)}"
                        + ("; it is the last row: the file looks cut short (copy it again)"
                           if last and len(row) < len(header) else "")
                    )  # fmt: skip
        except UnicodeDecodeError as exc:
            raise StageError(
                f"{path}, line {_line_of_bad_byte(path)}: not UTF-8 text ({exc.reason}, byte "
                f"0x{exc.object[exc.start]:02x}): save the table as UTF-8 CSV"
            ) from None
        except csv.Error as exc:  # e.g. a quote opened and never closed: the file was cut
            raise StageError(
                f"{path}, row {data_rows + 1} (line {reader.line_num}): {exc} (truncated?)"
            ) from None


def _line_of_bad_byte(path: Path) -> int:
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def read_frame(cfg, external_dir: Path):
    """A table or time series as a pandas frame."""
    import pandas as pd

    if cfg.source in BUILTIN_TABLES:
        return load_builtin_table(cfg.source)
    path = local_source(cfg.source, external_dir)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix not in TABLE_SUFFIXES:
        raise StageError(
            f"ingest.source {cfg.source!r}: a table or time series must be a .csv or .parquet file"
        )
    if suffix == ".csv":
        check_csv_rows(path)
    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # pandas raises many types for a malformed file
        raise StageError(f"{path}: not a readable {suffix} table ({exc})") from None
    if frame.empty:
        raise StageError(f"{path}: the table has no rows")
    return frame


def choose_columns(frame, cfg, numeric_only: bool) -> tuple[str, list[str]]:
    """The target column and the input columns, checked against the table."""
    import pandas as pd

    columns = [str(c) for c in frame.columns]
    target = cfg.target or ("target" if cfg.source in BUILTIN_TABLES else "")
    if not target:
        raise StageError(f"ingest.target: name the column to predict; the columns are {columns}")
    if target not in columns:
        raise StageError(
            f"ingest.target {target!r} is not a column of {cfg.source}; the columns are {columns}"
        )
    if cfg.features:
        unknown = [c for c in cfg.features if c not in columns]
        if unknown:
            raise StageError(
                f"ingest.features {unknown} are not columns of {cfg.source}; the columns are "
                f"{columns}"
            )
        chosen = list(cfg.features)
    elif numeric_only:  # a time series: every numeric column, the target's own past included
        chosen = [c for c in columns if pd.api.types.is_numeric_dtype(frame[c])]
        chosen = [c for c in chosen if not pd.api.types.is_bool_dtype(frame[c])]
    else:
        chosen = [c for c in columns if c != target]
    if not numeric_only and target in chosen:
        raise StageError(f"ingest.features: the target {target!r} cannot also be an input")
    if numeric_only:
        text = [c for c in chosen if features.is_categorical(frame[c])]
        if text:
            raise StageError(
                f"ingest.features: column(s) {text} of {cfg.source} are not numeric; a time "
                "series' inputs must be numbers"
            )
    if not chosen:
        raise StageError(f"ingest.features: {cfg.source} has no input column besides the target")
    return target, chosen


def resolve_task(target, cfg) -> str:
    """``ingest.task``, or for ``auto``: text or a few integer values -> classes."""
    import pandas as pd

    if cfg.task != "auto":
        if cfg.task == "regression" and not pd.api.types.is_numeric_dtype(target):
            raise StageError(
                f"ingest.task regression: target column {target.name!r} holds text, not numbers"
            )
        return cfg.task
    if features.is_categorical(target):
        return "classification"
    values = target.dropna()
    integral = pd.api.types.is_integer_dtype(values) or bool(
        (values.astype("float64") % 1 == 0).all()
    )
    return "classification" if integral and values.nunique() <= MAX_AUTO_CLASSES else "regression"


def encode_target(target, task: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices and names, or float32 values; a missing target is an error."""
    missing = int(target.isna().sum())
    if missing:
        raise StageError(
            f"target column {target.name!r} is empty in {missing} row(s): drop or fill them first"
        )
    if task == "regression":
        return target.astype("float64").to_numpy().astype(np.float32), ()
    import pandas as pd

    types = pd.api.types
    if not (
        types.is_integer_dtype(target)
        or types.is_bool_dtype(target)
        or types.is_string_dtype(target)
        or isinstance(target.dtype, pd.CategoricalDtype)
    ):
        # floats (str tells 0.0 from -0.0, which compare equal) and mixed Python objects
        values = target.map(str).to_numpy()
        names = sorted(set(values.tolist()))
        index = {n: i for i, n in enumerate(names)}
        return np.array([index[v] for v in values], dtype=np.int64), tuple(names)
    # A typed column: each distinct value named once (str of it, as above), so that a million
    # rows cost their codes, not a million Python strings (150 MB), and the codes are renumbered
    # in place (np.unique's sort of them took 250 MB more at 10M rows).
    codes, uniques = pd.factorize(target)  # numbered in order of first appearance
    named = [str(value) for value in uniques]
    names = sorted(set(named))
    index = {n: i for i, n in enumerate(names)}
    codes = codes.astype(np.int64, copy=False)
    return np.take(np.array([index[n] for n in named], np.int64), codes, out=codes), tuple(names)


BATCH_ROWS = 65_536  # rows a streamed table is read by (pyarrow record batches)


# pyarrow's scanner reads 16 batches and 4 files ahead, and Parquet's pre-buffering the column
# chunks of several row groups: head(1000) of a 1M-row file held 85 MB, a pass 111 MB, growing
# with the file up to millions of rows (more for a wide table). One batch ahead and no
# pre-buffering held 20 MB, and read no slower.
READ_AHEAD = {"batch_readahead": 1, "fragment_readahead": 1}


def open_dataset(path: Path):
    """A .csv or .parquet file as a pyarrow dataset, read in batches (:func:`read_batches`)."""
    import pyarrow.dataset as ds

    if path.suffix.lower() == ".csv":
        file_format = "csv"
    else:
        options = ds.ParquetFragmentScanOptions(pre_buffer=False)
        file_format = ds.ParquetFileFormat(default_fragment_scan_options=options)
    try:
        return ds.dataset(path, format=file_format)
    except Exception as exc:  # pyarrow raises its own types for a malformed file
        raise StageError(f"{path}: not a readable {path.suffix} table ({exc})") from None


def read_batches(dataset, path: Path, columns: list[str]):
    """The table's rows as pandas frames of at most ``BATCH_ROWS``, with each frame's first
    row's position; a row pyarrow cannot parse is an error naming the file."""
    at = 0
    try:
        for batch in _record_batches(dataset, path, columns):
            for lo in range(0, batch.num_rows, BATCH_ROWS):
                part = batch.slice(lo, BATCH_ROWS)
                yield at, part.to_pandas()
                at += part.num_rows
    except Exception as exc:  # ArrowInvalid and friends: a truncated or malformed row
        raise StageError(f"{path}: unreadable after row {at} ({exc})") from None


def _record_batches(dataset, path: Path, columns: list[str]):
    """A CSV block by block (pyarrow's streaming CSV reader, its columns typed as the
    dataset's schema says), Parquet row group by row group (``ParquetFile.iter_batches``). The
    dataset's scanner reads ahead of a slower consumer whatever the read-ahead asked: a pass
    over a 3M-row CSV series held 135 MB of Arrow memory, growing with the file, against 38 MB
    block by block; a pass over a 10M-row Parquet table, 431 MB against 25 MB."""
    if path.suffix.lower() != ".csv":
        import pyarrow.parquet as pq

        with pq.ParquetFile(path, pre_buffer=False) as file:
            yield from file.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        return
    import pyarrow.csv as pcsv

    options = pcsv.ConvertOptions(column_types=dataset.schema, include_columns=columns)
    # Parsed on this thread: with threads, the reader parses ahead while its reader is slower
    # (a count of one column held 67 MB at 3M rows; 36 MB without, and as fast).
    reading = pcsv.ReadOptions(use_threads=False)
    with pcsv.open_csv(path, read_options=reading, convert_options=options) as reader:
        yield from reader


def count_rows(dataset, path: Path) -> int:
    """The number of rows, a CSV's counted block by block on its first column (see
    :func:`_record_batches`); a Parquet file's from its metadata."""
    if path.suffix.lower() != ".csv":
        return dataset.count_rows()
    return sum(b.num_rows for b in _record_batches(dataset, path, dataset.schema.names[:1]))


def dataset_head(dataset, path: Path):
    """A dataset's first 1,000 rows (a pandas frame: its columns and their types) and its row
    count, read without reading it whole. A CSV's come from its first block, read alone: the
    dataset's scanner parsed far ahead of the rows it returned (1.8 s and 137 MB before the
    first batch of a 3M-row file, against 0.01 s: see :func:`_record_batches`)."""
    import pyarrow as pa

    try:
        if path.suffix.lower() == ".csv":
            import pyarrow.csv as pcsv

            with pcsv.open_csv(path) as reader:
                first = next(iter(reader), None)
            batches = [] if first is None else [first]
            head = pa.Table.from_batches(batches, schema=dataset.schema).slice(0, 1000)
        else:
            head = dataset.head(1000, **READ_AHEAD)
        head = head.to_pandas()
        n = count_rows(dataset, path)
    except Exception as exc:
        raise StageError(f"{path}: not a readable {path.suffix} table ({exc})") from None
    if head.empty:
        raise StageError(f"{path}: the table has no rows")
    return head, n


def stream_table(path: Path, cfg, kind: str) -> Streamed:
    """A .csv or .parquet table read in batches (pyarrow datasets): the target column alone
    decides the split (the same stratified or random split as an in-memory read), one pass
    fits the preprocessing on the training rows (:class:`features.OnePassFit`), and one pass
    per split encodes its rows as its shards are written. Memory holds the target column, the
    split's positions and one batch."""
    dataset = open_dataset(path)
    head, n = dataset_head(dataset, path)
    target_name, inputs = choose_columns(head, cfg, numeric_only=False)
    width = len(fit_spec(head[inputs], inputs)["features"])  # categories may add more

    def open_splits() -> StreamedSplits:
        columns = [*inputs, target_name]
        import pyarrow as pa

        kind_of = dataset.schema.field(target_name).type
        # Text labels dictionary-encoded batch by batch: a categorical column of small codes,
        # not 10M Python string pointers (80 MB) hashed again by pandas; the same classes.
        text = pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of)
        parts = [b.column(0).dictionary_encode() if text else b.column(0)
                 for b in _record_batches(dataset, path, [target_name])]  # fmt: skip
        if text:
            kind_of = pa.dictionary(pa.int32(), kind_of)
        target = pa.chunked_array(parts, type=kind_of).to_pandas()
        del parts
        target.name = target_name
        task = resolve_task(target, cfg)
        y, class_names = encode_target(target, task)
        del target
        if task == "classification":
            if len(class_names) < 2:
                raise StageError(f"target column {target_name!r} has {len(class_names)} "
                                 "class(es): need at least 2")  # fmt: skip
            idx = stratified_split(y, cfg.test_fraction, cfg.val_fraction, cfg.seed, class_names)
        else:
            idx = random_split(len(y), cfg.test_fraction, cfg.val_fraction, cfg.seed)
        membership = np.empty(len(y), np.int8)
        for code, split in enumerate(SPLITS):
            membership[idx[split]] = code
        fitter = features.OnePassFit(inputs)
        for at, frame in read_batches(dataset, path, columns):
            train_rows = membership[at : at + len(frame)] == SPLITS.index("train")
            try:
                fitter.update(frame[inputs][train_rows])
            except features.FeatureError as exc:
                raise StageError(f"ingest.features: {exc}") from None
        try:
            spec = fitter.spec()
        except features.FeatureError as exc:
            raise StageError(f"ingest.features: {exc}") from None

        def chunks(split: str, rows=None):  # a batch of the source's rows a chunk
            code = SPLITS.index(split)
            for at, frame in read_batches(dataset, path, columns):
                mine = membership[at : at + len(frame)] == code
                if not mine.any():
                    continue
                part = frame[mine].reset_index(drop=True)
                if rows is not None:
                    rows(part)
                x = features.encode_frame(part, spec)
                yield x, y[at : at + len(frame)][mine]

        sizes_ = {s: len(i) for s, i in idx.items()}
        meta = table_meta(cfg, kind, spec, class_names, task, target_name, sizes_)
        summary = table_summary(meta, n, inputs) + f" (read in batches of {BATCH_ROWS})"
        manifest = {"source": cfg.source, "rows": n, "columns": columns}
        return StreamedSplits(meta, chunks, manifest, summary, keeps_rows=True)

    return Streamed(n, 4 * width, open_splits)


def table_meta(cfg, kind: str, spec: dict, class_names, task: str, target: str,
               split_sizes: dict[str, int]) -> DatasetMeta:  # fmt: skip
    """meta.json of a table: its encoded features come from the fitted ``spec``."""
    return DatasetMeta(
        class_names=class_names,
        input_shape=(len(spec["features"]),),
        source=cfg.source,
        split_sizes=split_sizes,
        kind=kind,
        task=task,
        target=target,
        feature_names=tuple(spec["features"]),
        preprocess=spec,
    )


def table_summary(meta: DatasetMeta, n_rows: int, inputs: list[str]) -> str:
    """Ingest's log line for a table."""
    classes = f", {len(meta.class_names)} classes" if meta.class_names else ""
    return (
        f"table of {n_rows} rows, {len(inputs)} input columns {inputs} -> "
        f"{len(meta.feature_names)} features, target {meta.target!r} ({meta.task}{classes}), "
        f"splits {meta.split_sizes}"
    )


def fit_spec(train_frame, columns: list[str]) -> dict:
    try:
        return features.fit(train_frame, columns)
    except features.FeatureError as exc:
        raise StageError(f"ingest.features: {exc}") from None


# ---------------------------------------------------------------- validation (tables and series)


def rows_expectations(meta: DatasetMeta, params) -> list[Expectation]:
    """Every input column has at most the allowed share missing; every row has a target."""
    columns = [c["name"] for c in (meta.preprocess or {}).get("columns", [])]
    rows = [
        Expectation("ExpectColumnValuesToNotBeNull", name,
                    f"column {name!r}: missing values <= {params.max_missing_fraction:.1%}",
                    share("row"), {"mostly": 1.0 - params.max_missing_fraction},
                    param=MISSING_PARAM)
        for name in columns
    ]  # fmt: skip
    if meta.target and meta.target not in columns:
        rows.append(
            Expectation("ExpectColumnValuesToNotBeNull", meta.target,
                        f"every row has a target {meta.target!r}", share("row"))
        )  # fmt: skip
    return rows


def read_rows(prepared_dir: Path, splits=SPLITS, max_rows: int | None = None) -> dict:
    """The rows of ``splits`` as ingest read them (``prepared/<split>.parquet``); with
    ``max_rows``, at most that many of each, a seeded sample read in batches
    (:func:`~components.dataset.load_frame`)."""
    for split in splits:
        if not table_path(prepared_dir, split).is_file():
            raise DatasetError(
                f"{table_path(prepared_dir, split)} not found: run the ingest stage first"
            )
    return {s: load_frame(table_path(prepared_dir, s), max_rows) for s in splits}


def rows_stats(prepared_dir: Path, split: str) -> dict:
    """Every row of ``split`` as ingest read it, counted in one streamed pass."""
    return frame_stats(table_path(prepared_dir, split))


def counted_missing(split: str, counted: dict, meta: DatasetMeta, params) -> list[Check]:
    """Each input column's missing share bounded over every row (:func:`rows_stats`), for a
    split whose suites saw a sample of its rows."""
    limit, rows = params.max_missing_fraction, counted["rows"]
    checks = []
    for column in (meta.preprocess or {}).get("columns", []):
        missing = counted["columns"].get(column["name"], {}).get("missing", 0.0)
        checks.append(
            Check(split, f"column {column['name']!r}: missing values <= {limit:.1%} (every row)",
                  missing <= limit, f"{round(missing * rows)} of {rows} rows, {missing:.1%}",
                  MISSING_PARAM)
        )  # fmt: skip
    return checks


def encoded_checks(split: str, data: ArraySet, meta: DatasetMeta) -> list[Check]:
    """Encoded features are float32 of the meta's shape; targets as the task needs them."""
    want_y = TARGET_DTYPE if meta.is_regression else LABEL_DTYPE
    checks = [
        Check(split, f"feature dtype == {FEATURE_DTYPE}", data.x.dtype == FEATURE_DTYPE,
              f"found {data.x.dtype}"),
        Check(split, f"target dtype == {want_y}", data.y.dtype == want_y,
              f"found {data.y.dtype}"),
        Check(split, f"example shape == {tuple(meta.input_shape)}",
              tuple(data.x.shape[1:]) == tuple(meta.input_shape),
              f"found {tuple(data.x.shape[1:])}"),
    ]  # fmt: skip
    if meta.is_regression:
        bad = int((~np.isfinite(data.y)).sum())
        checks.append(Check(split, "every target is a finite number", bad == 0,
                            f"{bad} of {len(data)} are NaN or infinite"))  # fmt: skip
    return checks


def encoded_stats(data: ArraySet, meta: DatasetMeta, class_counts: dict) -> dict:
    stats = {
        "examples": len(data),
        "class_counts": class_counts,
        "feature_dtype": str(data.x.dtype),
        "target_dtype": str(data.y.dtype),
    }
    if meta.is_regression and len(data):
        stats["target_mean"] = float(np.nanmean(data.y.astype(np.float64)))
    return stats


def spec_columns(meta: DatasetMeta) -> list[dict] | None:
    """The columns a client sends, from the preprocessing spec: name, type and a category's
    values; the fitted means and deviations are left out (a refit changes no client)."""
    columns = (meta.preprocess or {}).get("columns")
    if not columns:
        return None
    return [
        {"name": c["name"], "type": c["type"]}
        | ({"categories": [str(v) for v in c["categories"]]} if c["type"] == "categorical" else {})
        for c in columns
    ]


def feature_card(meta: DatasetMeta) -> dict:
    """A table's or series' card: what the service needs to encode rows as training did."""
    return {
        "target": meta.target,
        "feature_names": list(meta.feature_names),
        "preprocess": meta.preprocess,
    }


# ---------------------------------------------------------------- the kind


class TableKind(DataKind):
    name = "table"
    noun = "table"
    model_hint = ", or ingest.kind sequence for a time series"

    def recognises(self, source: str) -> bool:
        return source in BUILTIN_TABLES or Path(source).suffix.lower() in TABLE_SUFFIXES

    def prepare(self, cfg, external_dir: Path) -> Prepared:
        frame = read_frame(cfg, external_dir)
        target_name, inputs = choose_columns(frame, cfg, numeric_only=False)
        frame = frame[[*inputs, target_name]].reset_index(drop=True)
        task = resolve_task(frame[target_name], cfg)
        y, class_names = encode_target(frame[target_name], task)
        if task == "classification":
            if len(class_names) < 2:
                raise StageError(
                    f"target column {target_name!r} has {len(class_names)} class(es): "
                    "need at least 2"
                )
            idx = stratified_split(y, cfg.test_fraction, cfg.val_fraction, cfg.seed, class_names)
        else:
            idx = random_split(len(y), cfg.test_fraction, cfg.val_fraction, cfg.seed)
        frames = {s: frame.iloc[i].reset_index(drop=True) for s, i in idx.items()}
        spec = fit_spec(frames["train"][inputs], inputs)
        splits = {s: ArraySet(features.encode_frame(frames[s], spec), y[i]) for s, i in idx.items()}
        meta = table_meta(cfg, self.name, spec, class_names, task, target_name, sizes(splits))
        summary = table_summary(meta, len(frame), inputs)
        return Prepared(meta, splits, frame, frames, len(frame), summary)

    def stream(self, cfg, external_dir: Path) -> Streamed | None:
        if cfg.source in BUILTIN_TABLES:
            return None
        path = local_source(cfg.source, external_dir)
        return stream_table(path, cfg, self.name) if path.suffix.lower() in TABLE_SUFFIXES else None

    def raw_splits(self, prepared_dir: Path, meta: DatasetMeta, splits=SPLITS,
                   max_rows: int | None = None) -> dict:  # fmt: skip
        return read_rows(prepared_dir, splits, max_rows)

    def rows_stats(self, prepared_dir: Path, meta: DatasetMeta, split: str) -> dict:
        return rows_stats(prepared_dir, split)

    def counted_checks(self, split: str, counted: dict, meta: DatasetMeta, params) -> list:
        return counted_missing(split, counted, meta, params)

    def reencode(self, raw, spec, test: ArraySet, target: str, class_names=()) -> ArraySet:
        # The targets come from the rows themselves: a sharded split's reading order is not the
        # order its rows were kept in (for an in-memory split the two are the same).
        if not np.issubdtype(test.y.dtype, np.integer):  # regression: the values as read
            y = raw[target].astype("float64").to_numpy().astype(np.float32)
            return ArraySet(encode_with(raw, spec), y)
        if not class_names:
            return ArraySet(encode_with(raw, spec), test.y)
        index = {name: i for i, name in enumerate(class_names)}
        try:
            y = np.array([index[str(v)] for v in raw[target]], dtype=np.int64)
        except KeyError as exc:
            raise StageError(f"target {exc} of the kept rows is not a known class") from None
        return ArraySet(encode_with(raw, spec), y)

    def expectations(self, meta: DatasetMeta, params) -> dict[str, list[Expectation]]:
        return {ROWS_SUITE: rows_expectations(meta, params)}

    def summary_tables(self, data: ArraySet, meta: DatasetMeta, frame=None) -> dict:
        return {ROWS_SUITE: frame}

    def array_checks(self, split: str, data: ArraySet, meta: DatasetMeta) -> list[Check]:
        return encoded_checks(split, data, meta)

    def split_stats(self, data: ArraySet, tables, meta, class_counts) -> dict:
        return encoded_stats(data, meta, class_counts)

    def card_fields(self, meta: DatasetMeta) -> dict:
        return feature_card(meta)

    def input_columns(self, meta: DatasetMeta) -> list[dict] | None:
        return spec_columns(meta)

    def check_servable(self, meta: DatasetMeta, meta_file) -> None:
        check_features_servable(self.name, 1, meta, meta_file)

    def shape_labels(self, card: dict) -> dict[str, str]:
        return feature_labels(card)

    def inputs_phrase(self, card: dict) -> str:
        return (
            f"table rows of columns {columns_phrase(card)} (encoded first by the preprocessing "
            "fitted on the training data, model.json `preprocess`)"
        )

    def routes_phrase(self, card: dict, role: str) -> str:
        return (
            '`POST /predict_row {"row": {column: value, ...}}`, `POST /predict_rows {"rows": '
            f"[...]}}` (at most {card['max_batch_size']}), `POST /info` (columns, preprocessing)"
        )


def encode_with(raw, spec) -> np.ndarray:
    """Rows as read, encoded by a preprocessing fit (a StageError naming what does not fit)."""
    if not spec:
        raise StageError("the model carries no preprocessing spec to encode with")
    try:
        return features.encode_frame(raw, spec)
    except features.FeatureError as exc:
        raise StageError(f"the model cannot read these rows: {exc}") from None


def columns_phrase(card: dict) -> str:
    """The card's input columns, the first dozen by name."""
    columns = [c["name"] for c in card["preprocess"]["columns"]]
    more = f", ... ({len(columns)} in all)" if len(columns) > 12 else ""
    return ", ".join(columns[:12]) + more


def feature_labels(card: dict) -> dict[str, str]:
    """Bento labels of a model reading encoded features (tables, sequences)."""
    return {
        "input_shape": "x".join(str(d) for d in card["input_shape"]),
        "num_features": str(card["input_shape"][-1]),
        "columns": str(len(card["preprocess"]["columns"])),
    }


def check_features_servable(kind: str, rank: int, meta: DatasetMeta, meta_file) -> None:
    """Encoded features of ``rank`` dimensions and a preprocessing spec the adapter can apply."""
    from deploy.table import check_spec  # the serving adapter's own check of the spec

    if len(meta.input_shape) != rank:
        raise StageError(
            f"{meta_file}: input_shape of {kind} data must have {rank} dimension(s), got "
            f"{meta.input_shape}"
        )
    try:
        check_spec(meta.preprocess, meta.input_shape, kind, f"{meta_file}: preprocess")
    except ValueError as exc:
        raise StageError(str(exc)) from None
