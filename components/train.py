"""Train: fit the network with a Lightning Trainer, keep the best weights by validation loss.

``accelerator``, ``devices``, ``num_nodes``, ``strategy`` and ``precision`` from params.yaml
go straight to Lightning, so the same stage runs on a CPU, one GPU, N GPUs or M machines.
Under DDP only global rank zero writes files; epoch metrics are synchronised across ranks.

Checkpoints go to ``paths.checkpoint_dir/<run key>/``, where the key hashes the train params
and the data. A run that was killed resumes from its last checkpoint when started again with
the same key (``train.resume``); a changed param or data set starts afresh. A run that
finished removes its checkpoints: a forced re-run trains again from the start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from components import kinds, tasks
from components.config import Params, TrainParams
from components.dataset import DatasetMeta, Split, load_split, meta_path, split_digest
from components.lightning_module import (
    data_loader,
    epoch_progress,
    lightning_module,
    quiet_lightning,
    show_progress_bar,
)
from components.model import (
    NetConfig,
    build_model,
    change_forecast,
    load_state_dict,
    save_model,
)
from components.recipe import Recipe, require_resolved, resolve_for
from components.records import TRAIN_FILE, TrainSummary, train_headline, write_headline
from components.stage import StageError, main, replacing, write_json
from components.trial import trial_callbacks

log = logging.getLogger("pipeline.train")

# The history file has every column for either task (the other task's is left empty), so the
# plots declared once in dvc.yaml find their fields whatever the data (their templates leave
# the empty cells out).
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_rmse")
HISTORY_FILE = "train_history.csv"
LAST_CHECKPOINT = "last.ckpt"
STEP_CHECKPOINT = "step.ckpt"  # train.checkpoint_every_n_steps: the latest mid-epoch one


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    epochs_run: int
    best_val_loss: float
    best_val_accuracy: float | None  # classification
    samples_per_second: float
    resumed_from_epoch: int  # 0 for a fresh run


@dataclass
class FitOutput:
    net: object  # the plain nn.Module, best weights loaded (rank zero only)
    config: NetConfig
    recipe: Recipe  # the train params it ran with, every auto value chosen, and why
    history: list[dict]
    is_global_zero: bool
    resumed_from_epoch: int
    samples_per_second: float


def net_config(meta: DatasetMeta, params: TrainParams, train_y=None, train_x=None) -> NetConfig:
    """The network for this data: its input shape and outputs come from the data, the rest
    from params (resolved: components/recipe.py). A regression net learns the training
    targets' mean and spread (``train_y``; a change forecast: of their change from the last
    value in ``train_x``'s windows)."""
    require_resolved(params, "the network's configuration")
    target_mean, target_std = 0.0, 1.0
    if meta.is_regression and train_y is not None and len(train_y):
        target_mean = float(train_y.astype("float64").mean())
        target_std = float(train_y.astype("float64").std()) or 1.0
    config = NetConfig(
        family=params.model,
        input_shape=tuple(meta.input_shape),
        num_classes=meta.num_outputs,
        channels=tuple(params.channels),
        hidden_units=tuple(params.hidden_units),
        dropout=params.dropout,
        batch_norm=params.batch_norm,
        activation=params.activation,
        task=meta.task,
        input_scale=kinds.get(meta.kind).input_scale,
        rnn_hidden_size=params.rnn_hidden_size,
        rnn_layers=params.rnn_layers,
        target_mean=target_mean,
        target_std=target_std,
    )
    if params.forecast == "change":
        return change_forecast(config, meta, train_x, train_y)
    return config


def check_model_fits_data(meta: DatasetMeta, params: TrainParams) -> None:
    """Refuse a model family that cannot read this kind of data, before any training."""
    kind = kinds.get(meta.kind)
    kind.check_model(params.model, meta.source)
    aug = params.augment
    if not kind.augmentable and (
        aug.crop_padding or aug.max_rotation_degrees or aug.horizontal_flip
    ):
        raise StageError(
            f"train.augment: crops, rotations and flips are for images, not a {kind.noun}; "
            "set them to 0 / false"
        )


def run_key(params: TrainParams, prepared_dir: Path) -> str:
    """Hash of what decides the result: train params (but ``resume`` and how often to
    checkpoint) and the data (the train and val splits' files, and meta.json)."""
    digest = hashlib.sha256(
        json.dumps(
            params.model_dump(mode="json", exclude={"resume", "checkpoint_every_n_steps"}),
            sort_keys=True,
        ).encode()
    )
    for split in ("train", "val"):
        digest.update(split_digest(prepared_dir, split))
    digest.update(hashlib.sha256(meta_path(prepared_dir).read_bytes()).digest())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- transfer learning


def init_source(source: str) -> Path:
    """``train.init_from``'s file, or a stage error naming it: checked before any training
    library is imported (seconds), so the run fails at once."""
    path = Path(source)
    if not path.is_file():
        raise StageError(f"train.init_from: {source} not found")
    return path


def initialise_from(net, source: str, freeze: tuple[str, ...]) -> list[str]:
    """Copy every weight of ``source`` whose name and shape match; freeze named prefixes.

    Returns the names that were copied. Layers that do not match (e.g. a classifier head
    for another number of classes) keep their fresh initialisation.
    """
    state = load_state_dict(init_source(source))
    own = net.state_dict()
    copied = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not copied:
        raise StageError(
            f"train.init_from: no weight of {source} fits this network (different architecture?)"
        )
    net.load_state_dict(copied, strict=False)
    names = [name for name, _ in net.named_parameters()]
    for prefix in freeze:
        matched = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            raise StageError(
                f"train.freeze: {prefix!r} matches no parameter; names are {', '.join(names)}"
            )
        for name, param in net.named_parameters():
            if name in matched:
                param.requires_grad_(False)
    return sorted(copied)


def _history_callback():
    import lightning as L

    class History(L.Callback):
        """Epoch metrics (synchronised across ranks) for the plots file; kept in checkpoints
        so a resumed run still reports every epoch."""

        def __init__(self):
            self.rows: list[dict] = []

        def on_validation_epoch_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            train_loss = module.epoch_train_loss()
            row = {"epoch": trainer.current_epoch + 1}
            row["train_loss"] = round(train_loss, 6) if train_loss is not None else None
            row["val_loss"] = round(float(m["val_loss"]), 6) if "val_loss" in m else None
            if "val_mse" in m:
                row["val_rmse"] = round(math.sqrt(float(m["val_mse"])), 6)
            else:
                row["val_accuracy"] = (
                    round(float(m["val_accuracy"]), 6) if "val_accuracy" in m else None
                )
            self.rows.append(row)

        def state_dict(self):
            return {"rows": self.rows}

        def load_state_dict(self, state_dict):
            self.rows = list(state_dict["rows"])

    return History()


def fit(
    train_set: Split,
    val_set: Split,
    meta: DatasetMeta,
    params: TrainParams,
    checkpoint_dir: Path,
) -> FitOutput:
    """The core: train (or resume) a network; rank zero gets it back with the best weights.

    ``params`` may leave values ``auto`` (null): the recipe (components/recipe.py) chooses them
    for this data first, and each choice is logged with its reason."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    L.seed_everything(params.seed, workers=True, verbose=False)
    quiet_lightning()
    if params.model != "auto":
        check_model_fits_data(meta, params)  # an explicit family that cannot read the data
    recipe = resolve_for(params, meta, len(train_set), train_set)
    params = recipe.params
    check_model_fits_data(meta, params)
    config = net_config(meta, params, train_set.y, train_set)
    try:
        net = build_model(config)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    if params.init_from:
        copied = initialise_from(net, params.init_from, params.freeze)
        log.info("initialised %d tensors from %s; frozen: %s", len(copied), params.init_from,
                 list(params.freeze) or "none")  # fmt: skip

    history = _history_callback()
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor="val_loss", mode="min", save_last=True
    )
    every_steps = []
    if params.checkpoint_every_n_steps:
        every_steps.append(ModelCheckpoint(
            dirpath=checkpoint_dir, filename=STEP_CHECKPOINT.removesuffix(".ckpt"),
            every_n_train_steps=params.checkpoint_every_n_steps, save_top_k=1,
            enable_version_counter=False,
        ))  # fmt: skip
    trainer = L.Trainer(
        max_epochs=params.max_epochs,
        accelerator=params.accelerator,
        devices=params.devices,
        num_nodes=params.num_nodes,
        strategy=params.strategy,
        precision=params.precision,
        deterministic=params.deterministic,
        gradient_clip_val=params.gradient_clip_norm or None,
        callbacks=[
            checkpoint,
            *every_steps,
            EarlyStopping(monitor="val_loss", patience=params.early_stopping_patience),
            history,
            epoch_progress(log, len(train_set), meta.task),
            *trial_callbacks(),  # Optuna pruning when run as a tuning trial (flows/tune.py)
        ],
        logger=False,
        enable_progress_bar=show_progress_bar(),
        enable_model_summary=False,
        default_root_dir=checkpoint_dir,
    )

    per_process = max(1, params.batch_size // trainer.world_size)  # keep the global batch

    def loader(data: Split, shuffle: bool):
        return data_loader(data, per_process, shuffle=shuffle, seed=params.seed,
                           regression=meta.is_regression, batch_norm=params.batch_norm)  # fmt: skip

    resume_from, resumed_epoch = (
        latest_checkpoint(Path(checkpoint_dir)) if params.resume else (None, 0)
    )
    if resume_from is not None and trainer.is_global_zero:
        where = ("mid-epoch, " if resume_from.name == STEP_CHECKPOINT else "") + (
            f"after epoch {resumed_epoch} of {params.max_epochs}"
        )
        log.info("resuming from %s %s", resume_from, where)

    if trainer.is_global_zero:
        for line in recipe.choices:
            log.info("recipe: %s", line)
    module = lightning_module(net, params)
    started = time.perf_counter()
    trainer.fit(
        module,
        loader(train_set, shuffle=True),
        loader(val_set, shuffle=False),
        ckpt_path=resume_from,
        weights_only=True,  # checkpoints hold tensors and plain data only
    )
    seconds = time.perf_counter() - started
    epochs_now = len(history.rows) - resumed_epoch
    speed = len(train_set) * epochs_now / seconds if seconds and epochs_now > 0 else 0.0

    if trainer.is_global_zero:
        net.load_state_dict(load_state_dict(Path(checkpoint.best_model_path)))
        net.eval()
    return FitOutput(
        net, config, recipe, history.rows, trainer.is_global_zero, resumed_epoch, speed
    )


def latest_checkpoint(checkpoint_dir: Path) -> tuple[Path | None, int]:
    """The checkpoint a resumed run starts from, the later (by optimiser step) of the last
    epoch's and the last mid-epoch one, and the epochs it had finished."""
    import torch

    found = []
    for name in (LAST_CHECKPOINT, STEP_CHECKPOINT):
        path = Path(checkpoint_dir) / name
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            found.append((int(state["global_step"]), name == LAST_CHECKPOINT, path, state))
    if not found:
        return None, 0
    step, end_of_epoch, path, state = max(found, key=lambda f: (f[0], f[1]))
    # An epoch's checkpoint is saved when that epoch is done; a mid-epoch one during it.
    return path, int(state["epoch"]) + (1 if end_of_epoch else 0)


def write_history_csv(path: Path, history: list[dict]) -> None:
    """One row per epoch, every task's column (the other task's cells empty): the file the
    training curves of `dvc plots show` and the report are drawn from."""
    with replacing(path, "w") as fh:
        fh.write(",".join(HISTORY_FIELDS) + "\n")
        for row in history:
            cells = ("" if row.get(k) is None else json.dumps(row[k]) for k in HISTORY_FIELDS)
            fh.write(",".join(cells) + "\n")


def run(params: Params) -> TrainResult | None:
    paths, cfg = params.paths, params.train
    if cfg.init_from:
        init_source(cfg.init_from)
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    train_set, val_set = (load_split(paths.prepared_dir, s) for s in ("train", "val"))

    root = Path(paths.checkpoint_dir)
    key = run_key(cfg, Path(paths.prepared_dir))
    out = fit(train_set, val_set, meta, cfg, root / key)
    if not out.is_global_zero:
        return None  # under DDP only rank zero writes artefacts

    history = out.history
    best = min(history, key=lambda row: row["val_loss"])
    save_model(
        out.net,
        out.config,
        paths.model_dir,
        extra={
            "class_names": list(meta.class_names),
            "trained_epochs": len(history),
            "kind": meta.kind,
            "task": meta.task,
            "target": meta.target,
            "feature_names": list(meta.feature_names),
            "preprocess": meta.preprocess,
            "recipe": {
                "choices": list(out.recipe.choices),
                "train": out.recipe.params.model_dump(mode="json"),
            },
        },
    )
    metrics_dir = Path(paths.metrics_dir)
    key = tasks.get(meta.task).val_metric
    summary = TrainSummary(
        epochs_run=len(history),
        best_epoch=best["epoch"],
        **{f"best_{k}": best[k] for k in ("val_loss", key)},
    )
    write_json(metrics_dir / TRAIN_FILE, summary)
    write_headline(metrics_dir, "train", train_headline(summary))
    write_history_csv(metrics_dir / HISTORY_FILE, history)
    # Checkpoints only serve to resume an interrupted run: once a run has finished they are
    # of no further use (and resuming a finished, early-stopped run would train on).
    shutil.rmtree(root, ignore_errors=True)
    log.info(
        "%d epochs, best val_loss %.4f (epoch %d), %s %.4f, %.0f samples/s",
        len(history), best["val_loss"], best["epoch"], key, best[key], out.samples_per_second,
    )  # fmt: skip
    return TrainResult(
        Path(paths.model_dir), len(history), best["val_loss"], best.get("val_accuracy"),
        out.samples_per_second, out.resumed_from_epoch,
    )  # fmt: skip


if __name__ == "__main__":
    main("train", run)
