"""The train stage: model families, optimisers and schedules from params, transfer learning,
resume after SIGKILL, and real multi-process DDP (gloo) on the CPU: one process per device,
and two "nodes" on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from components import ingest, train
from components.config import parse_params
from components.lightning_module import augment_batch
from components.stage import StageError
from tests.conftest import REPO_ROOT, TINY_CLASSES, make_images, tiny_params_dict
from tests.helpers import free_port, stage_workspace


def _params(root: Path, npz: Path, **train_updates):
    raw = tiny_params_dict(root, str(npz))
    raw["paths"]["external_dir"] = str(npz.parent)
    raw["train"].update(train_updates)
    return parse_params(raw)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "tiny.npz"
    x, y = make_images(per_class=20)
    np.savez(path, x=x, y=y, class_names=np.array(TINY_CLASSES))
    return path


@pytest.fixture(scope="module")
def rgb_source(tmp_path_factory) -> Path:
    """32x32x3 colour images, the seeds' CIFAR-like case."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 80, (36, 32, 32, 3))
    y = np.repeat(np.arange(3), 12)
    for i, label in enumerate(y):
        x[i, :, :, label] += 150  # each class is dominated by one colour channel
    path = tmp_path_factory.mktemp("rgb") / "rgb.npz"
    np.savez(path, x=x.astype(np.uint8), y=y)
    return path


def _fit(root: Path, npz: Path, **updates):
    params = _params(root, npz, **updates)
    ingest.run(params)
    return params, train.run(params)


def _model_json(params) -> dict:
    return json.loads((Path(params.paths.model_dir) / "model.json").read_text())


def test_seed_config_mlp_128_relu_adam_5_epochs(tmp_path, source):
    params, result = _fit(
        tmp_path, source, model="mlp", hidden_units=[128], activation="relu",
        optimizer="adam", max_epochs=5, learning_rate=0.001,
    )  # fmt: skip
    config = _model_json(params)["config"]
    assert config["family"] == "mlp" and config["hidden_units"] == [128]
    assert result.epochs_run == 5
    assert result.best_val_accuracy > 0.6


def test_seed_config_three_block_cnn_sgd_on_rgb(tmp_path, rgb_source):
    params, result = _fit(
        tmp_path, rgb_source, model="cnn", channels=[8, 16, 32], optimizer="sgd",
        learning_rate=0.01, momentum=0.9, max_epochs=2, batch_norm=True,
    )  # fmt: skip
    config = _model_json(params)["config"]
    assert config["input_shape"] == [3, 32, 32] and config["channels"] == [8, 16, 32]
    assert result.epochs_run == 2


@pytest.mark.parametrize(
    "updates",
    [
        {"lr_schedule": "step", "lr_step_epochs": 1, "optimizer": "sgd", "nesterov": True},
        {"lr_schedule": "cosine", "optimizer": "adamw", "weight_decay": 0.01},
        {"lr_schedule": "onecycle", "l1_penalty": 1e-4, "gradient_clip_norm": 1.0},
        {
            "activation": "tanh",
            "augment": {"crop_padding": 1, "max_rotation_degrees": 10.0, "horizontal_flip": True},
        },
    ],
    ids=["step-sgd-nesterov", "cosine-adamw", "onecycle-l1-clip", "tanh-augmented"],
)
def test_optimisers_schedules_and_regularisers_train(tmp_path, source, updates):
    params, result = _fit(tmp_path, source, max_epochs=2, **updates)
    assert result.epochs_run == 2
    assert np.isfinite(result.best_val_loss)


def test_augmentation_changes_pixels_not_shapes():
    torch.manual_seed(0)
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    params = parse_params(tiny_params_dict(Path("/tmp"), "x")).train
    crop = params.model_copy(
        update={"augment": params.augment.model_copy(update={"crop_padding": 2})}
    )
    out = augment_batch(x, crop)
    assert out.shape == x.shape and not torch.equal(out, x)
    flip = params.model_copy(
        update={"augment": params.augment.model_copy(update={"horizontal_flip": True})}
    )
    flipped = augment_batch(x.repeat(16, 1, 1, 1), flip)
    assert all(torch.equal(f, x[i % 2]) or torch.equal(f, x[i % 2].flip(-1))
               for i, f in enumerate(flipped))  # fmt: skip


def test_transfer_learning_copies_and_freezes(tmp_path, source):
    first, _ = _fit(tmp_path / "a", source, max_epochs=1)
    donor = Path(first.paths.model_dir) / "model.pt"
    second, _ = _fit(tmp_path / "b", source, max_epochs=2, init_from=str(donor),
                     freeze=["features"])  # fmt: skip
    a = torch.load(donor, weights_only=True)
    b = torch.load(Path(second.paths.model_dir) / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("features."))
    head = [k for k in a if k.startswith("classifier.") and k.endswith(".weight")][-1]
    assert not torch.equal(a[head], b[head])


def test_bad_transfer_settings_are_named(tmp_path, source):
    with pytest.raises(StageError, match="train.init_from: .*not found"):
        _fit(tmp_path / "a", source, init_from=str(tmp_path / "nope.pt"))
    first, _ = _fit(tmp_path / "b", source, max_epochs=1)
    donor = str(Path(first.paths.model_dir) / "model.pt")
    with pytest.raises(StageError, match="train.freeze: 'encoder' matches no parameter"):
        _fit(tmp_path / "c", source, init_from=donor, freeze=["encoder"])


def test_bad_model_and_optimizer_names_fail_in_params(tmp_path, source):
    from components.config import ParamsError

    for key, value in (("model", "transformer"), ("optimizer", "lion")):
        raw = tiny_params_dict(tmp_path, str(source))
        raw["train"][key] = value
        with pytest.raises(ParamsError, match=f"train.{key}"):
            parse_params(raw)


# ---------------------------------------------------------------- the stage as a process


def _workspace(root: Path, source: Path, **train_updates) -> Path:
    """A folder with params.yaml and prepared data, where `python -m components.train` runs."""
    return stage_workspace(root, source, **train_updates)


def _stage_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **extra}
    env.pop("PIPELINE_DEBUG", None)
    return env


def _train_process(root: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "components.train"],
        cwd=root,
        env=_stage_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    """Enough images that an epoch takes a moment, so a kill lands mid-epoch."""
    path = tmp_path_factory.mktemp("big") / "big.npz"
    x, y = make_images(per_class=200, size=12)
    np.savez(path, x=x, y=y, class_names=np.array(TINY_CLASSES))
    return path


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_from_last_checkpoint(tmp_path, big_source):
    root = _workspace(tmp_path / "ws", big_source, max_epochs=3, batch_size=4,
                      early_stopping_patience=10)  # fmt: skip
    process = _train_process(root)
    checkpoints = root / "build" / "checkpoints"
    deadline = time.monotonic() + 180
    while not list(checkpoints.glob("*/last.ckpt")):
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    time.sleep(0.2)  # into the next epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (root / "models" / "model.pt").exists()

    out = _finish(_train_process(root))
    assert "resuming from" in out
    resumed_after = int(out.split("resuming from")[1].split("after epoch")[1].split()[0])
    assert 1 <= resumed_after < 3
    metrics = json.loads((root / "metrics" / "train.json").read_text())
    assert metrics["epochs_run"] == 3
    history = (root / "metrics" / "train_history.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in history[1:]] == [1, 2, 3]


@pytest.mark.slow
def test_ddp_two_processes_gloo_matches_single_process(tmp_path, source):
    single = _workspace(tmp_path / "single", source, max_epochs=3, devices=1)
    _finish(_train_process(single))
    ddp = _workspace(tmp_path / "ddp", source, max_epochs=3, devices=2, strategy="ddp")
    out = _finish(_train_process(ddp))
    assert "GLOBAL_RANK: 1" in out or "Initializing distributed: GLOBAL_RANK: 0" in out
    # One set of artefacts, written once, loadable without pickle.
    state = torch.load(ddp / "models" / "model.pt", weights_only=True)
    assert state and not (ddp / "build" / "checkpoints").exists()  # finished: nothing to resume
    a = json.loads((single / "metrics" / "train.json").read_text())
    b = json.loads((ddp / "metrics" / "train.json").read_text())
    assert b["epochs_run"] == a["epochs_run"] == 3
    assert abs(a["best_val_accuracy"] - b["best_val_accuracy"]) <= 0.2


@pytest.mark.slow
def test_two_nodes_on_loopback(tmp_path, source):
    root = _workspace(tmp_path / "nodes", source, max_epochs=2, devices=1, num_nodes=2,
                      strategy="ddp", accelerator="cpu")  # fmt: skip
    port = str(free_port())
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
              "LOCAL_RANK": "0"}  # fmt: skip
    nodes = [_train_process(root, NODE_RANK=str(rank), **common) for rank in (0, 1)]
    outs = [_finish(p) for p in nodes]
    assert any("GLOBAL_RANK: 1" in o for o in outs), outs[1][-2000:]
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert state
    metrics = json.loads((root / "metrics" / "train.json").read_text())
    assert metrics["epochs_run"] == 2
