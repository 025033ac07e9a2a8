"""The final run takes the best trial's trained model instead of training it again.

A trial is the real pipeline up to evaluate (components/tuning/trials.py), so its experiment
holds the train stage's whole result: the ``dvc.lock`` entry, the model in DVC's cache and the
git-kept metrics (``cache: false`` outputs, which DVC's run-cache never restores). The final run
brings that stage into the workspace as the trial left it; its ``dvc repro`` then finds train up
to date when the params, data and code are the trial's (the model it releases is the one the
study measured) and trains again, as before, when any of them differ.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.config import load_yaml
from components.restore import LOCK_FILE, cache_gap
from components.stage import venv_env, write_text
from components.tuning.trials import experiment_ref

STAGE = "train"


@dataclass(frozen=True)
class Taken:
    """What :func:`take_trained_stage` did: ``entry`` is the trial's train stage as its
    ``dvc.lock`` records it, now the workspace's (None when nothing was taken: ``note`` says
    why)."""

    experiment: str
    entry: dict | None
    note: str


def _show(root: Path, ref: str, path: str) -> bytes | None:
    """A file of an experiment's commit; None when git does not keep it there."""
    shown = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=root, capture_output=True)
    return shown.stdout if shown.returncode == 0 else None


def take_trained_stage(root: Path, experiment: str) -> Taken:
    """Put the train stage of ``experiment`` into the workspace at ``root`` as the trial left it:
    its ``dvc.lock`` entry, its cached outputs (checked out by DVC) and its git-kept ones. When
    the experiment or its model is not there (removed, garbage-collected, another clone), or
    DVC cannot check it out, nothing is changed and the final run trains the best params again.
    """
    root = Path(root)

    def left_alone(why: str) -> Taken:
        return Taken(experiment, None, f"{why}: the final run trains the best params again")

    ref = experiment_ref(root, experiment)
    if ref is None:
        return left_alone(f"experiment {experiment} is not in this repository")
    shown = _show(root, ref, LOCK_FILE)
    entry = ((load_yaml(shown) or {}).get("stages") or {}).get(STAGE) if shown else None
    lock_file = root / LOCK_FILE
    if not entry or not lock_file.is_file():
        return left_alone(f"experiment {experiment} records no {STAGE} stage in {LOCK_FILE}")
    kept = {}
    for out in entry.get("outs") or []:
        content = _show(root, ref, out["path"])
        if content is not None:  # a `cache: false` output: git keeps it in the experiment
            kept[out["path"]] = content
        elif out.get("md5"):
            gap = cache_gap(root, out["path"], out["md5"])
            if gap is not None:
                return left_alone(f"experiment {experiment}'s {gap.split(' (')[0]}")
        else:
            return left_alone(f"experiment {experiment}: {out['path']} has no hash in its lock")
    before = lock_file.read_bytes()
    lock = load_yaml(before) or {}
    lock.setdefault("stages", {})[STAGE] = entry

    def checkout() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dvc", "checkout", "--force", STAGE],
                              cwd=root, env=venv_env(), capture_output=True, text=True)  # fmt: skip

    write_text(lock_file, yaml.safe_dump(lock, sort_keys=False))
    done = checkout()
    if done.returncode != 0:
        write_text(lock_file, before)  # the workspace's own stage, as it was
        checkout()
        why = (done.stderr.strip().splitlines() or ["?"])[-1]
        return left_alone(f"dvc checkout {STAGE} of experiment {experiment} failed ({why})")
    for path, content in kept.items():
        write_text(root / path, content)
    taken = ", ".join(o["path"] for o in entry.get("outs") or [])
    return Taken(experiment, entry, f"taken from experiment {experiment}: {taken}")
