"""What a run's output is read with: the line train prints per epoch, and the warnings in a
flow run's output (tests/test_progress_log.py tests these; the end-to-end test's first run
asserts there are none)."""

from __future__ import annotations

import re

# ``epoch 2/3: train_loss 1.0762, val_loss 1.0490, val_accuracy 0.6667; 187 samples/s, 0 s left``
EPOCH_LINE = re.compile(
    r"(?P<label>[\w -]*?) ?epoch (?P<epoch>\d+)/(?P<epochs>\d+): "
    r"train_loss (?P<train_loss>[\d.]+), val_loss (?P<val_loss>[\d.]+), "
    r"(?P<metric>val_\w+) (?P<value>[\d.]+); (?P<speed>\d+) samples/s, "
    r"(?P<left>\d+ (s|min \d+ s|h \d+ min)) left$"
)

# -- the flow-level count -------------------------------------------------------------------

# What marks a line of a flow's combined output (stdout + stderr) as a warning. A stage's
# stderr reaches Prefect at WARNING (flows/pipeline.py run_stage), so the first pattern alone
# catches every warning of a stage process; the others catch what bypasses the run logger.
WARNING_MARKS = (
    re.compile(r"\| (WARNING|ERROR|CRITICAL) +\|"),  # Prefect's console format
    re.compile(r"\b\w*Warning: "),  # Python's warnings (FutureWarning: ..., UserWarning: ...)
    re.compile(r"\.py:\d+: "),  # Lightning's own warning format (path:line: message)
    re.compile(r"\b[WE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ "),  # torch's logs (W1201 23:30:21...)
    re.compile(r"^(WARNING|ERROR): "),  # DVC's command-line format
    re.compile(r"💡 Tip|GPU available:|TPU available:|litlogger|litmodels"),  # Lightning notices
    re.compile(r"untracked files"),  # DVC listing files `dvc exp save` leaves out
)

# Warnings a default run still prints, each with the reason it cannot go. A pattern here must
# match the whole warning, so that a new warning never hides behind an old one.
ALLOWED_WARNINGS: dict[str, str] = {}


def warning_lines(output: str, allowed: dict[str, str] = ALLOWED_WARNINGS) -> list[str]:
    """The lines of a flow run's output that are warnings, less the allowed ones.

    The end-to-end test's first run asserts ``warning_lines(stdout + stderr) == []``: a
    default run prints no warning whose cause we can remove (issue 17, point 5)."""
    allow = [re.compile(pattern) for pattern in allowed]
    return [
        line
        for line in output.splitlines()
        if any(mark.search(line) for mark in WARNING_MARKS)
        and not any(a.search(line) for a in allow)
    ]
