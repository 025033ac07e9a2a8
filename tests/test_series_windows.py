"""A time series' splits hold its rows once: windows are views of them, stored as the rows, and
cut from them as training draws them (components/dataset.py SeriesWindows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.dataset import (
    ArraySet,
    DatasetError,
    SeriesWindows,
    load_arrays,
    save_arrays,
)
from components.lightning_module import data_loader


def _series(rows: int = 300, features: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    encoded = rng.normal(size=(rows, features)).astype(np.float32)
    return encoded, rng.normal(size=rows)  # targets as read: float64


def _copied(encoded, target, window, horizon) -> ArraySet:
    """The windows as they were stored before: each one a copy of its rows."""
    n = len(encoded) - window - horizon + 1
    x = np.stack([encoded[i : i + window] for i in range(n)]).astype(np.float32)
    return ArraySet(x, target[window + horizon - 1 :][:n].astype(np.float32))


@pytest.mark.parametrize(("window", "horizon"), [(1, 1), (8, 1), (24, 5), (10, 0)])
def test_windows_are_the_rows_they_cover_and_the_target_horizon_after(window, horizon):
    encoded, target = _series()
    windows, copied = (
        SeriesWindows(encoded, target, window, horizon),
        _copied(encoded, target, window, horizon),
    )
    assert windows.x.shape == copied.x.shape and windows.x.dtype == np.float32
    np.testing.assert_array_equal(windows.x, copied.x)
    np.testing.assert_array_equal(windows.y, copied.y)
    assert not windows.x.flags.writeable  # a write would change every window sharing the row
    assert np.shares_memory(windows.x, windows.rows)


def test_a_stored_split_holds_the_rows_once_and_reads_back_the_same_windows(tmp_path):
    encoded, target = _series(rows=2000, features=4)
    windows = SeriesWindows(encoded, target, window=32, horizon=1)
    save_arrays(windows, tmp_path / "rows.npz")
    save_arrays(_copied(encoded, target, 32, 1), tmp_path / "copied.npz")
    stored, copied = ((tmp_path / f).stat().st_size for f in ("rows.npz", "copied.npz"))
    assert stored < encoded.nbytes * 1.3 < copied / 20  # the rows, not 32 copies of them
    assert windows.nbytes < encoded.nbytes * 1.3  # what ingest's `storage: auto` weighs

    back = load_arrays(tmp_path / "rows.npz")
    assert isinstance(back, SeriesWindows) and (back.window, back.horizon) == (32, 1)
    np.testing.assert_array_equal(back.x, windows.x)
    np.testing.assert_array_equal(back.y, windows.y)


def test_a_series_too_short_for_one_window_is_refused_with_its_sizes():
    encoded, target = _series(rows=10)
    with pytest.raises(DatasetError, match="10 rows hold no window of 8 steps with a target 3"):
        SeriesWindows(encoded, target, 8, 3)
    with pytest.raises(DatasetError, match="one target per row"):
        SeriesWindows(encoded, target[:-1], 2, 1)


def test_training_draws_the_same_batches_from_the_rows_as_from_copied_windows():
    """Same seed, same order, same values: a series trains as it did when stored copied."""
    encoded, target = _series(rows=500)
    windows, copied = SeriesWindows(encoded, target, 16, 2), _copied(encoded, target, 16, 2)
    kw = {"shuffle": True, "seed": 7, "regression": True, "batch_norm": False}
    ours, before = data_loader(windows, 32, **kw), data_loader(copied, 32, **kw)
    assert len(ours) == len(before)
    for (x, y), (x0, y0) in zip(ours, before, strict=True):
        assert x.is_contiguous() and x.dtype == torch.float32
        torch.testing.assert_close(x, x0, rtol=0, atol=0)
        torch.testing.assert_close(y, y0, rtol=0, atol=0)


def test_windows_handed_out_are_writable_copies_in_chunks(monkeypatch):
    import components.dataset as dataset

    monkeypatch.setattr(dataset, "WINDOWS_PER_CHUNK", 50)  # several chunks of 283 windows
    encoded, target = _series()
    windows = SeriesWindows(encoded, target, 16, 2)
    seen = []

    def model(x):
        assert x.flags.c_contiguous and x.flags.writeable and len(x) <= 50
        seen.append(len(x))
        return torch.as_tensor(x).sum(dim=(1, 2)).numpy()

    whole = torch.as_tensor(np.ascontiguousarray(windows.x)).sum(dim=(1, 2)).numpy()
    np.testing.assert_array_equal(windows.map_x(model), whole)
    assert sum(seen) == len(windows) and len(seen) == 6
    for part in (windows.head(40), windows.sample(40, seed=1), windows.sample(10**6, seed=1)):
        assert type(part) is ArraySet and part.x.flags.writeable and part.x.flags.c_contiguous
    np.testing.assert_array_equal(windows.sample(10**6, seed=1).x, windows.x)
