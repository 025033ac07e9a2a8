"""The validate stage on tiny data made here: 3 classes, 8x8 grey images, 15 per class per split."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components.config import ValidateParams, parse_params, read_params_file
from components.dataset import SPLITS, ArraySet, DatasetMeta, meta_path, save_arrays, split_path
from components.kinds.image import image_table
from components.stage import StageError
from components.validate import check_splits, class_count_table, class_minimums, run

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("zero", "one", "two")
SHAPE = (1, 8, 8)
PER_CLASS = 15
PARAMS = ValidateParams(min_rows_per_class=10, max_missing_fraction=0.0)
META = DatasetMeta(
    class_names=CLASSES,
    input_shape=SHAPE,
    source="test",
    split_sizes={s: PER_CLASS * len(CLASSES) for s in SPLITS},
)


def make_split(seed: int, per_class: int = PER_CLASS, shape=SHAPE) -> ArraySet:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(CLASSES), dtype=np.int64), per_class)
    x = rng.integers(0, 256, size=(len(y), *shape), dtype=np.uint8)
    return ArraySet(x=x, y=y)


@pytest.fixture(scope="module")
def clean() -> dict[str, ArraySet]:
    return {split: make_split(seed) for seed, split in enumerate(SPLITS)}


def failures(splits: dict[str, ArraySet], params: ValidateParams = PARAMS) -> list[str]:
    result = check_splits(splits, META, params)
    assert result.success is not bool(result.failed)
    return list(result.failed)


def write_prepared(root: Path, splits: dict[str, ArraySet]) -> None:
    for split, images in splits.items():
        save_arrays(images, split_path(root / "prepared", split))
    META.save(meta_path(root / "prepared"))


def params_for(root: Path):
    """The real params.yaml with every path moved under ``root``."""
    raw = read_params_file(ROOT / "params.yaml")
    raw["paths"] = {key: str(root / Path(value).name) for key, value in raw["paths"].items()}
    return parse_params(raw)


# ---------------------------------------------------------------- tables


def test_image_table_has_one_summary_row_per_image():
    x = np.zeros((2, 1, 2, 2), np.float32)
    x[0, 0, 0, 0], x[0, 0, 1, 1], x[1, 0, 0, 0] = 300, -4, np.nan
    table = image_table(ArraySet(x=x, y=np.array([0, 2])))
    assert list(table["pixel_max"]) == [300, 0]
    assert list(table["pixel_min"]) == [-4, 0]
    assert list(table["has_nan"]) == [False, True]
    assert list(table[["channels", "height", "width"]].iloc[0]) == [1, 2, 2]


def test_class_count_table_adds_absent_classes_with_zero_rows():
    counts = class_count_table(np.array([0, 0, 2, 7]), n_classes=3)
    assert counts.to_dict("list") == {"label": [0, 1, 2], "count": [2, 0, 1]}


# ---------------------------------------------------------------- the checks


def test_clean_splits_pass_every_check(clean):
    result = check_splits(clean, META, PARAMS)
    assert result.success, result.failed
    # per split: 2 numpy dtype checks + 8 image expectations + 1 class-count expectation
    assert result.evaluated_expectations == 3 * 11
    assert result.stats["val"]["class_counts"] == dict.fromkeys(CLASSES, PER_CLASS)


def test_too_few_rows_of_a_class_fails_naming_split_and_class(clean):
    val = clean["val"]
    keep = np.r_[0 : 2 * PER_CLASS, 2 * PER_CLASS : 2 * PER_CLASS + 4]  # class 'two': 4 left
    failed = failures({**clean, "val": ArraySet(x=val.x[keep], y=val.y[keep])})
    assert failed == [
        "val: label counts per class >= 10 (class 'two' has 4"
        "; the limit is validate.min_rows_per_class in params.yaml)"
    ]


def test_a_class_absent_from_a_split_fails(clean):
    test = clean["test"]
    keep = test.y != 1
    failed = failures({**clean, "test": ArraySet(x=test.x[keep], y=test.y[keep])})
    assert failed == [
        "test: label counts per class >= 10 (class 'one' has 0"
        "; the limit is validate.min_rows_per_class in params.yaml)"
    ]


def test_min_rows_per_class_comes_from_params(clean):
    failed = failures(clean, ValidateParams(min_rows_per_class=16, max_missing_fraction=0.0))
    assert len(failed) == 3
    assert all("label counts per class >= 16" in f for f in failed)


def test_a_smaller_split_needs_its_share_of_the_training_minimum():
    """Stratified splits give a class rows in proportion: 10 in every split asked for 100 a
    class at the default fractions, and refused iris (5 a class in its validation split)."""
    assert class_minimums({"train": 105, "val": 15, "test": 30}, 10) == {
        "train": (10, ""),
        "val": (2, " (10 in train, scaled to this split's 15 rows of 105)"),
        "test": (3, " (10 in train, scaled to this split's 30 rows of 105)"),
    }
    assert class_minimums({"train": 45, "val": 45, "test": 60}, 10)["test"] == (10, "")
    assert class_minimums({"train": 1000, "val": 3}, 10)["val"][0] == 1  # never 0
    assert class_minimums({"train": 100, "val": 3}, 1)["val"] == (1, "")  # nothing to scale


def test_an_iris_sized_split_passes_and_a_class_short_of_its_share_fails():
    sizes = {"train": 35, "val": 5, "test": 10}  # iris, 50 a class, at the default fractions
    splits = {s: make_split(seed, per_class=n) for seed, (s, n) in enumerate(sizes.items())}
    meta = dataclasses.replace(META, split_sizes={s: len(d) for s, d in splits.items()})
    assert check_splits(splits, meta, PARAMS).success
    val = splits["val"]
    keep = np.r_[0:10, 10:11]  # class 'two': 1 left of 5
    broken = {**splits, "val": ArraySet(x=val.x[keep], y=val.y[keep])}
    assert list(check_splits(broken, meta, PARAMS).failed) == [
        "val: label counts per class >= 2 (10 in train, scaled to this split's 15 rows of 105) "
        "(class 'two' has 1; the limit is validate.min_rows_per_class in params.yaml)"
    ]


def test_pixels_out_of_range_fail_and_the_dtype_too(clean):
    x = clean["test"].x.astype(np.int16)
    x[3, 0, 2, 2] = 300
    failed = failures({**clean, "test": ArraySet(x=x, y=clean["test"].y)})
    assert failed == [
        "test: pixel dtype == uint8 (found int16)",
        "test: pixel max <= 255 (found 300 in 1 of 45 images)",
    ]


def test_negative_pixels_fail(clean):
    x = clean["train"].x.astype(np.float32)
    x[0, 0, 0, 0] = -1.5
    failed = failures({**clean, "train": ArraySet(x=x, y=clean["train"].y)})
    assert "train: pixel min >= 0 (found -1.5 in 1 of 45 images)" in failed


def test_shape_that_differs_from_meta_fails(clean):
    wrong = make_split(seed=7, shape=(1, 9, 8))
    failed = failures({**clean, "train": wrong})
    assert failed == ["train: image height == 8 (found 9 in 45 of 45 images)"]


def test_label_outside_the_class_set_fails(clean):
    y = clean["val"].y.copy()
    y[:2] = 3  # only 0, 1, 2 are known classes
    failed = failures({**clean, "val": ArraySet(x=clean["val"].x, y=y)})
    assert "val: labels in the known class set 0..2 (found 3 in 2 images)" in failed


def test_nan_pixels_fail(clean):
    x = clean["train"].x.astype(np.float64)
    x[5, 0, 1, 1] = np.nan
    failed = failures({**clean, "train": ArraySet(x=x, y=clean["train"].y)})
    assert failed == [
        "train: pixel dtype == uint8 (found float64)",
        "train: images with NaN pixels <= 0.0% (1 of 45 images, 2.2%"
        "; the limit is validate.max_missing_fraction in params.yaml)",
    ]


def test_max_missing_fraction_allows_a_few_nan_images(clean):
    x = clean["train"].x.astype(np.float64)
    x[5, 0, 1, 1] = np.nan
    lenient = ValidateParams(min_rows_per_class=10, max_missing_fraction=0.05)
    failed = failures({**clean, "train": ArraySet(x=x, y=clean["train"].y)}, lenient)
    assert failed == ["train: pixel dtype == uint8 (found float64)"]


def test_label_dtype_must_be_int64(clean):
    y = clean["val"].y.astype(np.int32)
    failed = failures({**clean, "val": ArraySet(x=clean["val"].x, y=y)})
    assert failed == ["val: label dtype == int64 (found int32)"]


# ---------------------------------------------------------------- the stage


def test_run_writes_data_docs_and_summary(tmp_path, monkeypatch, clean):
    write_prepared(tmp_path, clean)
    params = params_for(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    result = run(params)

    assert result.success
    docs = params.paths.reports_dir / "validation"
    assert (docs / "index.html").is_file()
    assert result.docs_index == docs / "index.html"
    pages = sorted(p.name for p in (docs / "validations").rglob("*.html"))
    assert pages == sorted(
        f"prepared-{s}_{t}.html" for s in SPLITS for t in ("images", "class_counts")
    )
    assert "passed" in (docs / "summary.html").read_text()
    landing = (docs / "index.html").read_text()
    assert "Data Docs: validation passed" in landing
    _assert_works_offline(docs)
    summary = json.loads((params.paths.metrics_dir / "validation.json").read_text())
    assert summary == {"success": True, "evaluated_expectations": 33, "failed": []}
    assert list(cwd.iterdir()) == []  # no GX project or state left in the working directory


def test_run_fails_naming_each_problem_after_writing_reports(tmp_path, clean):
    x = clean["test"].x.astype(np.int16)
    x[0, 0, 0, 0] = 300
    val = clean["val"]
    keep = val.y != 2
    write_prepared(
        tmp_path,
        {
            **clean,
            "val": ArraySet(x=val.x[keep], y=val.y[keep]),
            "test": ArraySet(x=x, y=clean["test"].y),
        },
    )
    params = params_for(tmp_path)
    stale = params.paths.reports_dir / "validation" / "stale.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier run")

    with pytest.raises(StageError) as err:
        run(params)

    expected = [
        "val: label counts per class >= 10 (class 'two' has 0"
        "; the limit is validate.min_rows_per_class in params.yaml)",
        "test: pixel dtype == uint8 (found int16)",
        "test: pixel max <= 255 (found 300 in 1 of 45 images)",
    ]
    for failure in expected:
        assert failure in str(err.value)
    summary = json.loads((params.paths.metrics_dir / "validation.json").read_text())
    assert summary["success"] is False
    assert summary["failed"] == expected
    docs = params.paths.reports_dir / "validation"
    assert (docs / "index.html").is_file()
    assert not stale.exists()
    assert "FAILED (3 checks)" in (docs / "summary.html").read_text()
    landing = (docs / "index.html").read_text()
    # val lacks a class (class_counts), test has a bad pixel (images): 2 of 6 suite runs
    assert "FAILED (2 of 6 suite runs)" in landing
    assert landing.count("<tr class=fail>") == 2
    _assert_works_offline(docs)


def _assert_works_offline(docs: Path) -> None:
    """The Data Docs landing page needs nothing from the network and every link resolves.

    GX's own index renders its tables in the browser from CDN scripts (an empty page offline);
    ours is plain HTML. One row per split and suite, each linking GX's page of that result.
    """
    landing = (docs / "index.html").read_text()
    assert "<script" not in landing
    assert not re.search(r'(src|href)="(https?:)?//', landing)
    links = re.findall(r'href="([^"]+)"', landing)
    assert links and all((docs / link).is_file() for link in links), links
    assert "gx-index.html" in links and "summary.html" in links
    results = [link for link in links if link.startswith("validations/")]
    assert len(results) == len(SPLITS) * 2  # each split: its kind's suite and class_counts
    assert sorted(Path(r).name for r in results) == sorted(
        f"prepared-{s}_{t}.html" for s in SPLITS for t in ("images", "class_counts")
    )


def test_run_names_missing_inputs(tmp_path):
    with pytest.raises(ValueError, match="meta.json not found"):
        run(params_for(tmp_path))


def test_importing_the_stage_does_not_import_great_expectations():
    code = "import sys, components.validate; sys.exit('great_expectations' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
