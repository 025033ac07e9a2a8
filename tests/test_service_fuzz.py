"""Fuzzing the cloud service against its own OpenAPI schema (schemathesis): no input gets a 5xx.

Schemathesis reads ``/docs.json`` from the running server (the ``cloud`` fixture of
tests/conftest.py) and sends schema-derived and schema-violating requests to every operation:
a bounded number of examples per operation and a time budget for the whole run. The server's
log must show no exception other than BentoML's own (logged) refusals of bodies its schema
rejects.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 15  # per operation and phase
MAX_SECONDS = 25  # for the whole run


def _schemathesis() -> list[str]:
    exe = Path(sys.executable).with_name("st")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("st") or shutil.which("schemathesis")
    if found is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    return [found]


def test_fuzzing_the_openapi_schema_finds_no_server_error(cloud, tmp_path):
    served = cloud
    log_before = served.log.read_text(errors="replace")
    run = subprocess.run(
        [
            *_schemathesis(),
            "run",
            f"{served.url}/docs.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--max-time",
            str(MAX_SECONDS),
            "--seed",
            "7",
            "--no-color",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=MAX_SECONDS + 60,
        cwd=tmp_path,  # schemathesis and hypothesis keep their databases in the cwd
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    tested = re.search(r"Tested: (\d+)", out)
    assert tested and int(tested.group(1)) >= 7, out[-2000:]  # every operation was tried
    cases = re.search(r"(\d+) generated, (\d+) passed", out)
    assert cases and cases.group(1) == cases.group(2) and int(cases.group(1)) > 100, out[-2000:]
    new_log = served.log.read_text(errors="replace")[len(log_before) :]
    errors = set(re.findall(r"^(\w[\w.]*(?:Error|Exception)): ", new_log, flags=re.M))
    assert errors <= {"pydantic_core._pydantic_core.ValidationError"}, errors
