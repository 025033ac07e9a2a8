"""The docs' examples run as written: the stage cores compose in a user's own Prefect flow."""

from __future__ import annotations

import runpy

import numpy as np

from tests.conftest import REPO_ROOT, TINY_CLASSES, make_images
from tests.helpers import drain_prefect_logs


def test_two_families_example_trains_both_and_keeps_the_better(tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    x, y = make_images(per_class=20)
    np.savez(tmp_path / "digits.npz", x=x, y=y, class_names=np.array(TINY_CLASSES))
    example = runpy.run_path(str(REPO_ROOT / "docs" / "examples" / "two_families.py"))
    # Against the session's Prefect server, as a user with `make prefect-server` running: a
    # temporary server per flow takes 10-25 s to start on a busy 2-core machine, and its start-up
    # timeout is read when prefect is first imported, so an env var set here would come too late.
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        result = example["two_families"](str(tmp_path / "digits.npz"), str(tmp_path), max_epochs=3)
        drain_prefect_logs()
    assert set(result["val_accuracy"]) == {"cnn", "mlp"}
    assert result["best"] == max(result["val_accuracy"], key=result["val_accuracy"].get)
    assert 0.5 <= result["test_accuracy"] <= 1.0 and result["passed"]
