"""A failed run's roll-back never deletes what it cannot put back (flows/pipeline.py).

After a failed stage the flow writes the last good run's ``dvc.lock`` back and runs ``dvc
checkout``. In a fresh clone that pulled nothing, DVC's cache lacks the last good run's
outputs, and that checkout deleted the model, its ONNX exports and the bento archive, putting
nothing in their place (its error, printed with ``--quiet``, was empty). Now the roll-back
checks the cache first and keeps this run's outputs and ``dvc.lock`` when it cannot.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from components.restore import RunStart, cached_object, not_in_cache
from flows.pipeline import roll_back


def _lock(outs: dict[str, str]) -> bytes:
    stages = {"train": {"cmd": "python -m components.train",
                        "outs": [{"path": p, "md5": m} for p, m in outs.items()]}}  # fmt: skip
    return yaml.safe_dump({"schema": "2.0", "stages": stages}).encode()


def _cache(root: Path, md5: str, data: bytes) -> None:
    obj = cached_object(root, md5)
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(data)


def test_outputs_whose_contents_the_cache_lacks_are_named(tmp_path):
    (tmp_path / ".dvc").mkdir()
    _cache(tmp_path, "a" * 32, b"model")
    _cache(
        tmp_path,
        "b" * 32 + ".dir",
        json.dumps([{"relpath": "fp32.onnx", "md5": "c" * 32}]).encode(),
    )
    lock = _lock({"models/model.pt": "a" * 32, "models/onnx": "b" * 32 + ".dir",
                  "artefacts": "d" * 32 + ".dir"})  # fmt: skip
    # The folder's listing is cached but not its file; the archive not at all.
    assert not_in_cache(tmp_path, lock) == ["models/onnx", "artefacts"]
    _cache(tmp_path, "c" * 32, b"onnx")
    assert not_in_cache(tmp_path, lock) == ["artefacts"]


def test_a_roll_back_the_cache_cannot_serve_keeps_this_runs_outputs(tmp_path, caplog):
    (tmp_path / ".dvc").mkdir()
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"this run's model")
    this_run = _lock({"models/model.pt": "e" * 32})
    (tmp_path / "dvc.lock").write_bytes(this_run)
    last_good = _lock({"models/model.pt": "f" * 32})  # committed, never pulled here

    with caplog.at_level(logging.WARNING):
        line = roll_back(tmp_path, RunStart(last_good), logging.getLogger("test"))

    assert line.startswith("this run's outputs and dvc.lock are kept: the last good run's "
                           "models/model.pt are not in this clone's DVC cache")  # fmt: skip
    assert "dvc pull" in line
    assert (tmp_path / "dvc.lock").read_bytes() == this_run
    assert model.read_bytes() == b"this run's model"
    assert "not rolled back" in caplog.text


def test_a_run_keeps_a_copy_of_the_outputs_no_checkout_can_put_back(tmp_path):
    """run_start copies the outputs dvc.lock records that git keeps (the `cache: false`
    metrics, even where the cache holds their contents too), where the file is what the lock
    says; the cached ones, which DVC lists in a .gitignore, are dvc checkout's."""
    import hashlib
    import subprocess

    from components.restore import run_start

    (tmp_path / ".dvc").mkdir()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("/model.pt\n")  # as DVC lists a cached output
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "gate.json").write_bytes(b'{"passed": true}')
    (metrics / "stale.json").write_bytes(b"changed since")
    (tmp_path / "model.pt").write_bytes(b"model")
    md5 = {name: hashlib.md5(data).hexdigest()
           for name, data in (("gate", b'{"passed": true}'), ("model", b"model"))}  # fmt: skip
    _cache(tmp_path, md5["model"], b"model")
    _cache(tmp_path, md5["gate"], b'{"passed": true}')  # in the cache too: still git's to keep
    lock = _lock({"metrics/gate.json": md5["gate"], "metrics/stale.json": "0" * 32,
                  "model.pt": md5["model"], "metrics/gone.json": "1" * 32})  # fmt: skip
    (tmp_path / "dvc.lock").write_bytes(lock)

    with run_start(tmp_path) as start:
        assert start.lock == lock and set(start.kept) == {"metrics/gate.json"}
        (metrics / "gate.json").write_bytes(b'{"passed": false}')  # a later stage of the run
        start.put_back_kept(tmp_path)
        assert (metrics / "gate.json").read_bytes() == b'{"passed": true}'
        copies = list(start.kept.values())
    assert not any(c.exists() for c in copies)  # removed with the run
