"""What every stage's ``python -m components.<stage>`` entry point shares.

A stage run from DVC must exit non-zero with one line that says why, not a traceback: the
Prefect flow shows that line as the stage's failure reason. Set ``PIPELINE_DEBUG=1`` to get
the traceback as well.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
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


def failure_reason(line: str) -> str | None:
    """The reason a stage's failure line gives (``STAGE FAILED train: ...`` -> ``train: ...``),
    or None for any other line of its output."""
    line = line.strip()
    return line.removeprefix(FAILURE_PREFIX).strip() if line.startswith(FAILURE_PREFIX) else None


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


def venv_env() -> dict:
    """This process's environment, with dvc.yaml's `python` resolving to this interpreter (the
    project's venv): for the DVC commands a flow, a trial or a benchmark starts."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def repo_relative(path: Path, root: Path = Path(".")) -> str:
    """``path`` relative to ``root`` (the repository, where stages run) when it lies inside
    it, as a POSIX string: what records keep, so they read the same in every clone; an
    outside path stays as given."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks (model files and archives can be large)."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def replacing(path: Path, mode: str = "wb"):
    """Open a new file that takes ``path``'s place whole, or not at all, when the block ends.

    The file is a temporary one of a unique name beside ``path``; at the end it is flushed to
    disk and moved over ``path`` with ``os.replace``. A run killed mid-write leaves the old file
    or the new one, never half of one (DVC keeps a truncated ``persist`` metric); two writers
    never share a temporary file; a reader that has the old file open keeps reading it whole.
    An error in the block removes the temporary file and leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; open() would give this
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to ``path`` whole or not at all (see :func:`replacing`)."""
    with replacing(path, "wb") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)


@functools.cache
def _umask() -> int:
    # Read once: os.umask can only be read by setting it, which races with other threads.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: Path, payload) -> None:
    """Write a small JSON file (a dict or a pydantic model) with a stable layout for git diffs,
    atomically (:func:`write_text`)."""
    if hasattr(payload, "model_dump"):
        payload = payload.model_dump(mode="json", exclude_none=True)
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


# A URL's credentials: ``scheme://user:secret@host`` (the user part can be a token too).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#@\s]*@)")
_QUERY = re.compile(r"(?P<url>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#]*)\?[^\s#]*")
REDACTED = "***"


def redact(text: str) -> str:
    """``text`` with every URL's credentials (user and password) and query string (SAS tokens,
    signed keys) replaced by ``***``: what may be logged, printed or written into a report."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", str(text))
    return _QUERY.sub(lambda m: f"{m['url']}?{REDACTED}", text)


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
