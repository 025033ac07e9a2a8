"""Progress and a quiet log: a line per epoch from train and the compress fine-tunes, flushed
as it is written; no warning from the ONNX export or the Lightning fit that we could remove;
and :func:`warning_lines`, the count of warnings in a flow run's output (the end-to-end test's
first run asserts it is empty)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from components import ingest, train
from components.config import parse_params
from components.lightning_module import progress_line
from tests.conftest import REPO_ROOT, TINY_CLASSES, make_images, tiny_params_dict
from tests.log_lines import EPOCH_LINE, warning_lines


def test_warning_lines_finds_each_kind_of_warning_and_passes_info():
    output = "\n".join(
        [
            "23:30:21.032 | INFO    | Task run 'train' - [train] epoch 1/3: train_loss 1.0",
            "23:30:21.032 | WARNING | Task run 'train' - something on stderr",
            "/x/copyreg.py:105: FutureWarning: `isinstance(treespec, LeafSpec)` is deprecated",
            "W1201 23:30:21.032000 29653 torch/onnx/_registration.py:107] torchvision is not ...",
            "/x/lightning/pytorch/utilities/_pytree.py:21: `isinstance(treespec, LeafSpec)` ...",
            "WARNING: The following untracked files were present in the workspace",
            "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]",
            "  stages: ingest ran, validate ran",
        ]
    )
    found = warning_lines(output)
    assert len(found) == 6 and not any("INFO" in line or "stages:" in line for line in found)
    assert warning_lines(output, {r"torchvision": "test"}) == [
        line for line in found if "torchvision" not in line
    ]


# -- the line itself ------------------------------------------------------------------------


def test_the_progress_line_names_epoch_losses_metric_speed_and_time_left():
    line = progress_line("", 3, 20, 0.41234, 0.399, "val_accuracy", 0.912, 1234.4, 130.2)
    assert line == (
        "epoch 3/20: train_loss 0.4123, val_loss 0.3990, val_accuracy 0.9120; "
        "1234 samples/s, 2 min 10 s left"
    )
    line = progress_line("prune_structured fine-tune", 1, 2, 1, 1, "val_rmse", 2, 9, 4000)
    m = EPOCH_LINE.match(line)
    assert m and m["label"] == "prune_structured fine-tune" and m["left"] == "1 h 06 min"


# -- train: a line per epoch, flushed -------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "tiny.npz"
    x, y = make_images(per_class=20)
    np.savez(path, x=x, y=y, class_names=np.array(TINY_CLASSES))
    return path


def _params(root: Path, npz: Path, **train_updates) -> dict:
    raw = tiny_params_dict(root, str(npz))
    raw["paths"]["external_dir"] = str(npz.parent)
    raw["train"].update(train_updates)
    return raw


def test_train_prints_one_line_per_epoch_that_agrees_with_its_history(tmp_path, source, caplog):
    params = parse_params(_params(tmp_path, source, max_epochs=3, early_stopping_patience=5))
    ingest.run(params)
    with caplog.at_level(logging.INFO, logger="pipeline.train"), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # Lightning's LeafSpec one is silenced
        train.run(params)
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.train"]
    matches = [m for m in map(EPOCH_LINE.match, lines) if m]
    assert [(int(m["epoch"]), int(m["epochs"])) for m in matches] == [(1, 3), (2, 3), (3, 3)]
    history = (Path(params.paths.metrics_dir) / "train_history.csv").read_text().splitlines()
    header = history[0].split(",")
    for m, row in zip(matches, history[1:], strict=True):
        values = dict(zip(header, row.split(","), strict=True))
        assert m["metric"] == "val_accuracy" and m["label"] == ""
        assert float(m["val_loss"]) == pytest.approx(float(values["val_loss"]), abs=1e-4)
        assert float(m["value"]) == pytest.approx(float(values["val_accuracy"]), abs=1e-4)
        assert float(m["train_loss"]) == pytest.approx(float(values["train_loss"]), abs=1e-4)
        assert int(m["speed"]) > 0
    assert matches[-1]["left"] == "0 s"


def test_the_train_stage_flushes_each_epoch_line_while_it_trains(tmp_path, source):
    """Through the stage's own entry point with stdout a pipe, as under DVC and Prefect: the
    first epoch's line arrives while later epochs still train (a buffered line would come only
    when the process ends)."""
    raw = _params(tmp_path, source, max_epochs=200, early_stopping_patience=200)
    params = parse_params(raw)
    ingest.run(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("PYTHONUNBUFFERED", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "components.train"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        seen = []
        for line in process.stdout:
            seen.append(line)
            if "epoch 1/200:" in line:
                break
        still_training = process.poll() is None
    finally:
        process.kill()
        process.wait(timeout=60)
    assert seen and EPOCH_LINE.match(seen[-1].removeprefix("[train] ").rstrip()), seen[-5:]
    assert still_training, "the first epoch's line came only when the stage ended"


def test_a_terminal_gets_lightnings_progress_bar_and_the_lines(tmp_path, source):
    """With stdout a terminal (a pseudo-terminal here) the stage draws Lightning's bar (Rich's,
    as rich is installed), and prints the epoch lines above it; piped, as in every other test
    here, there is no bar."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    raw = _params(tmp_path, source, max_epochs=2)
    ingest.run(parse_params(raw))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    terminal, child_side = pty.openpty()
    # A terminal as wide as a usual window (a new pty has no size: Rich would wrap at 80).
    fcntl.ioctl(child_side, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    drawn = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # the child closed its side
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "components.train"],
            cwd=tmp_path,
            # Rich takes COLUMNS before the terminal's size; a test run may have it at 80.
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "200", "LINES": "50"},
            stdout=child_side,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(child_side)
        reader.join(timeout=10)
        os.close(terminal)
    screen = drawn.decode(errors="replace")
    assert done.returncode == 0, done.stderr[-2000:] + screen[-2000:]
    assert re.search(r"Epoch 1\b", screen), screen[-2000:]  # Lightning's bar (Rich or tqdm)
    segments = re.split(r"[\r\n]+", screen)
    lines = [m for m in map(EPOCH_LINE.search, segments) if m]
    assert [m["epoch"] for m in lines] == ["1", "2"], screen[-2000:]


# -- the compress fine-tunes ----------------------------------------------------------------


def test_every_fine_tune_prints_its_epochs(caplog):
    """Pruning's fine-tune, distillation and the student alone: each epoch a line that says
    which, through compress's logger."""
    import torch

    from components import distill, prune
    from components.dataset import ArraySet
    from components.model import NetConfig, build_model

    x, y = make_images(per_class=10)
    train_set, val_set = ArraySet(x[::2, None], y[::2]), ArraySet(x[1::2, None], y[1::2])
    params = parse_params(tiny_params_dict(Path("/tmp"), "unused"))
    config = NetConfig("cnn", (1, 8, 8), 3, (4, 8), (16,), 0.0, False, "relu")
    torch.manual_seed(0)
    net = build_model(config)
    student = NetConfig("cnn", (1, 8, 8), 3, (2, 4), (8,), 0.0, False, "relu")
    d = params.compress.distillation.model_copy(update={"max_epochs": 2})
    pruning = params.compress.pruning.model_copy(update={"finetune_epochs": 2})
    with caplog.at_level(logging.INFO, logger="pipeline.compress"):
        prune.prune_and_finetune(
            net, "prune_structured", (1, 8, 8), train_set, val_set, params.train, pruning
        )
        distill.distil(net, student, train_set, val_set, params.train, d)
        distill.train_alone(student, train_set, val_set, params.train, d)
    matches = [m for r in caplog.records if (m := EPOCH_LINE.match(r.getMessage()))]
    assert [(m["label"], m["epoch"]) for m in matches] == [
        ("prune_structured fine-tune", "1"), ("prune_structured fine-tune", "2"),
        ("distil", "1"), ("distil", "2"), ("student_alone", "1"), ("student_alone", "2"),
    ]  # fmt: skip
    # The distillation loss is the student's own (soft targets), not a zero placeholder.
    assert all(float(m["train_loss"]) > 0 for m in matches)


def test_no_num_workers_advice_on_a_machine_with_many_cores(monkeypatch):
    """Lightning advises DataLoader workers on any machine with more than 2 cores (this one has
    2, so it is told it has 16); our loaders are tensors in memory, the fits silence it. The
    control first: Lightning's own check does warn on such a machine."""
    import lightning as L
    import lightning.fabric.utilities.data as fabric_data
    import torch
    from lightning.pytorch.trainer.connectors.data_connector import _worker_check
    from torch.utils.data import DataLoader, TensorDataset

    from components.dataset import ArraySet
    from components.finetune import fit_network
    from components.model import NetConfig, build_model

    monkeypatch.setattr(fabric_data, "_num_cpus_available", lambda: 16)
    x, y = make_images(per_class=4)
    loader = DataLoader(TensorDataset(torch.from_numpy(x[:, None]), torch.from_numpy(y)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _worker_check(L.Trainer(logger=False, accelerator="cpu", devices=1), loader, "x")
    assert any("does not have many workers" in str(w.message) for w in caught)

    params = parse_params(tiny_params_dict(Path("/tmp"), "unused"))
    torch.manual_seed(0)
    net = build_model(NetConfig("cnn", (1, 8, 8), 3, (4,), (8,), 0.0, False, "relu"))
    data = ArraySet(x[:, None], y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_network(net, data, data, params.train, 1, 0.01)
    assert not [str(w.message) for w in caught if "many workers" in str(w.message)]


# -- the ONNX export ------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_onnx_export_says_nothing_we_could_remove(tmp_path):
    """No "torchvision is not installed" notice and no FutureWarning from torch's exporter.
    The control first: torch's exporter on its own says both, so the check can fail."""
    import torch

    from components import onnx_files
    from components.model import NetConfig, build_model

    torch.manual_seed(0)
    net = build_model(NetConfig("cnn", (1, 8, 8), 3, (4,), (8,), 0.0, False, "relu"))
    samples = make_images(per_class=4)[0][:, None].astype(np.float32)
    # torch's own handler holds the stream it found at import: read the records instead.
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    records = _Records()
    registry.addHandler(records)
    ours = [f for f in registry.filters if isinstance(f, onnx_files._NotTorchvision)]
    try:
        for f in ours:  # an earlier export in this process installed it
            registry.removeFilter(f)
        onnx_files._BUILT_REGISTRIES.clear()  # the notices come when the registry is built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(
                net.eval(), (torch.from_numpy(samples[:4]),), dynamo=True, external_data=False,
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}},
            )  # fmt: skip
        assert any(m.startswith("torchvision is not installed") for m in records.messages)
        assert any("LeafSpec" in str(w.message) for w in caught)
        for f in ours:
            registry.addFilter(f)
        ours = []
        records.messages.clear()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            onnx_files.export_onnx(net, (1, 8, 8), tmp_path / "m.onnx", 1e-4, samples)
        assert not [m for m in records.messages if "torchvision" in m]
        assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]

        # A recurrent network (sequences): torch's LSTM/GRU export notices are silenced too.
        gru = build_model(NetConfig("gru", (6, 2), 3, (), (), 0.0, False, "relu", input_scale=1))
        rows = np.random.default_rng(0).normal(size=(8, 6, 2)).astype(np.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            onnx_files.export_onnx(gru, (6, 2), tmp_path / "gru.onnx", 1e-4, rows)
        assert not [
            str(w.message)[:200]
            for w in caught
            if issubclass(w.category, FutureWarning | UserWarning)
        ]
    finally:
        registry.removeHandler(records)
        for f in ours:
            registry.addFilter(f)


# -- DVC's listing of untracked files -------------------------------------------------------


def test_dvc_exp_save_counts_untracked_files_instead_of_listing_them(tmp_path):
    """A real `dvc exp save` in a fresh project with a data folder git does not track: one
    warning that counts the files per folder, never the listing of every path."""
    from flows.experiments import save_experiment
    from flows.pipeline import _untracked_files_counted
    from tests.helpers import GIT

    ws = tmp_path / "repo"
    (ws / "data" / "external").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "params.yaml", ws / "params.yaml")  # no stages: nothing to run
    (ws / "data" / "external" / "notes.txt").write_text("tracked\n")
    subprocess.run([*GIT, "init", "-q"], cwd=ws, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=ws, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=ws, check=True)
    subprocess.run([*GIT, "commit", "-qm", "init"], cwd=ws, check=True)
    for i in range(12):
        folder = ws / "data" / "external" / "photos" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i}.png").write_bytes(b"not really a png")
    (ws / "scratch.txt").write_text("a file at the top\n")
    # Handlers of our own: importing Prefect (flows.pipeline, above) reconfigured the root
    # logger, caplog's included.
    logger, ours, everything = logging.getLogger("test.flow"), _Records(), _Records()
    logger.addHandler(ours)
    logging.getLogger().addHandler(everything)
    try:
        with _untracked_files_counted(logger):
            save_experiment(ws, "quiet-exp", "a test")
    finally:
        logger.removeHandler(ours)
        logging.getLogger().removeHandler(everything)
    assert len(ours.messages) == 1, ours.messages
    message = ours.messages[0]
    assert message.startswith("13 file(s) git does not track")
    assert "data/external/ (12)" in message and "scratch.txt (1)" in message
    assert not [m for m in everything.messages if "img0.png" in m]  # DVC's listing is gone


# -- a stage's stderr ------------------------------------------------------------------------


def test_a_stages_stdout_and_stderr_come_apart_and_whole():
    """run_stage logs stdout at INFO and stderr at WARNING: each line keeps its stream, and a
    full pipe on one side (here 200 KB of stderr) blocks neither."""
    from flows.pipeline import _output_lines

    script = (
        "import sys\n"
        "print('one', flush=True)\n"
        "for i in range(4000): print('warning %d ' % i + 'x' * 40, file=sys.stderr)\n"
        "print('two', flush=True)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines = list(_output_lines(process))
    assert process.wait(timeout=60) == 0
    assert [line for err, line in lines if not err] == ["one\n", "two\n"]
    errors = [line for err, line in lines if err]
    assert len(errors) == 4000 and errors[0].startswith("warning 0 ")
