"""What every stage's ``python -m components.<stage>`` entry point shares.

A stage run from DVC must exit non-zero with one line that says why, not a traceback: the
Prefect flow shows that line as the stage's failure reason. Set ``PIPELINE_DEBUG=1`` to get
the traceback as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from components.config import Params, ParamsError, load_params

log = logging.getLogger("pipeline")


class StageError(RuntimeError):
    """A stage cannot finish: bad input, or a gate that did not pass. The message says why."""


# Errors whose message is the whole story; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (StageError, ParamsError, ValueError, FileNotFoundError)

FAILURE_PREFIX = "STAGE FAILED"


def set_quiet_env() -> None:
    """Switch off telemetry and keep tool state in the project (call before the imports)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Per-project state, under the repository (git-ignored), not in the user's home.
    os.environ.setdefault("BENTOML_HOME", str(Path.cwd() / ".bentoml"))
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
    # The temporary Prefect server of a run by hand needs more than the default 20 s to
    # start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks (model files and archives can be large)."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, payload: dict) -> None:
    """Write a small JSON file (metrics, verdicts) with a stable layout for git diffs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def main(stage: str, run: Callable[[Params], object]) -> None:
    """Load params.yaml, call ``run`` and turn an expected failure into one line + exit 1."""
    set_quiet_env()
    # Our own loggers speak at INFO; libraries (ONNX optimiser, GX, ...) only when they warn.
    logging.basicConfig(level=logging.WARNING, format=f"[{stage}] %(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)
    try:
        params = load_params()
        run(params)
    except EXPECTED_ERRORS as exc:
        if os.environ.get("PIPELINE_DEBUG"):
            traceback.print_exc()
        message = " ".join(str(exc).split())
        print(f"{FAILURE_PREFIX} {stage}: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
