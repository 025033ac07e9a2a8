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
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from components.config import Params, ParamsError, load_params
from components.restore import Restored, keep_last_good

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


def write_json(path: Path, payload) -> None:
    """Write a small JSON file (a dict or a pydantic model) with a stable layout for git diffs.

    Through a temporary file, flushed to disk, then ``os.replace``: a run killed mid-write leaves
    the old file or the new one, never half of one (DVC would keep a truncated verdict).
    """
    if hasattr(payload, "model_dump"):
        payload = payload.model_dump(mode="json", exclude_none=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(stage: str, run: Callable[[Params], object]) -> None:
    """Load params.yaml, call ``run`` and turn an expected failure into one line + exit 1.

    A run that fails or is killed (Ctrl-C, SIGTERM) leaves the stage's outputs as the last good
    run left them (components/restore.py); the failure line says so.
    """
    set_quiet_env()
    # Our own loggers speak at INFO; libraries (ONNX optimiser, GX, ...) only when they warn.
    logging.basicConfig(level=logging.WARNING, format=f"[{stage}] %(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)
    # SIGTERM (a cancelled flow run, `kill`) unwinds like Ctrl-C, so the outputs are put back.
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    restored = Restored()
    try:
        # DVC names the stage it runs (DVC_STAGE); run by hand, the module's own stage.
        with keep_last_good(os.environ.get("DVC_STAGE") or stage) as restored:
            params = load_params()
            run(params)
    except EXPECTED_ERRORS as exc:
        if os.environ.get("PIPELINE_DEBUG"):
            traceback.print_exc()
        message = " ".join(str(exc).split())
        print(f"{FAILURE_PREFIX} {stage}: {message}{restored.note()}", file=sys.stderr,
              flush=True)  # fmt: skip
        sys.exit(1)
    except BaseException:
        if restored.guarded:
            print(f"[{stage}] stopped;{restored.note()}", file=sys.stderr, flush=True)
        raise
