"""Train: fit the CNN with a Lightning Trainer, keep the best weights by validation loss.

``devices``, ``strategy`` and ``precision`` from params.yaml go straight to Lightning, so the
same stage runs on a CPU, one GPU or several. Under DDP only rank zero writes files.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from components.config import Params, TrainParams
from components.dataset import DatasetMeta, ImageSet, load_images, meta_path, split_path
from components.model import CNNConfig, SmallCNN, save_model
from components.stage import StageError, main, write_json

log = logging.getLogger("pipeline.train")

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    epochs_run: int
    best_val_loss: float
    best_val_accuracy: float
    samples_per_second: float


def _lightning_module(net: SmallCNN, params: TrainParams):
    """Wrap the plain network in a LightningModule (imported lazily: Lightning is slow)."""
    import lightning as L
    import torch
    from torch.nn import functional as F

    class ClassifierModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            loss = F.cross_entropy(self.net(x.float()), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            logits = self.net(x.float())
            self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
            acc = (logits.argmax(dim=1) == y).float().mean()
            self.log("val_accuracy", acc, on_epoch=True, sync_dist=True)

        def configure_optimizers(self):
            if params.optimizer == "sgd":
                return torch.optim.SGD(
                    self.parameters(),
                    lr=params.learning_rate,
                    momentum=params.momentum,
                    weight_decay=params.weight_decay,
                )
            return torch.optim.Adam(
                self.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay
            )

    return ClassifierModule()


def _history_callback(history: list[dict]):
    import lightning as L

    class History(L.Callback):
        """Collects epoch metrics (already synchronised across ranks) for the plots file."""

        def on_validation_epoch_end(self, trainer, _module):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            row = {"epoch": trainer.current_epoch + 1}
            for key in HISTORY_FIELDS[1:]:
                row[key] = round(float(m[key]), 6) if key in m else None
            history.append(row)

    return History()


def fit(
    train_set: ImageSet,
    val_set: ImageSet,
    meta: DatasetMeta,
    params: TrainParams,
    checkpoint_dir: Path,
):
    """The core: train a fresh network; return it (best weights loaded), config and history."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    L.seed_everything(params.seed, workers=True, verbose=False)
    logging.getLogger("lightning.pytorch").propagate = False  # it has its own handler
    config = CNNConfig(
        image_shape=tuple(meta.image_shape),
        num_classes=len(meta.class_names),
        channels=tuple(params.channels),
        hidden_units=params.hidden_units,
        dropout=params.dropout,
    )
    try:
        net = SmallCNN(config)
    except ValueError as exc:
        raise StageError(str(exc)) from None

    def loader(images: ImageSet, shuffle: bool) -> DataLoader:
        tensors = TensorDataset(torch.from_numpy(images.x), torch.from_numpy(images.y))
        generator = torch.Generator().manual_seed(params.seed)
        return DataLoader(
            tensors, batch_size=params.batch_size, shuffle=shuffle, generator=generator
        )

    history: list[dict] = []
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor="val_loss", mode="min", save_last=True
    )
    trainer = L.Trainer(
        max_epochs=params.max_epochs,
        accelerator=params.accelerator,
        devices=params.devices,
        strategy=params.strategy,
        precision=params.precision,
        deterministic=params.deterministic,
        callbacks=[
            checkpoint,
            EarlyStopping(monitor="val_loss", patience=params.early_stopping_patience),
            _history_callback(history),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=checkpoint_dir,
    )
    module = _lightning_module(net, params)
    started = time.perf_counter()
    trainer.fit(module, loader(train_set, shuffle=True), loader(val_set, shuffle=False))
    seconds = time.perf_counter() - started

    # Back to the best epoch's weights (the checkpoint holds tensors only for the state dict).
    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    net.load_state_dict({k.removeprefix("net."): v for k, v in best["state_dict"].items()})
    net.eval()
    samples_per_second = len(train_set) * len(history) / seconds if seconds else 0.0
    return net, config, history, trainer, samples_per_second


def run(params: Params) -> TrainResult | None:
    paths, cfg = params.paths, params.train
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    train_set = load_images(split_path(paths.prepared_dir, "train"))
    val_set = load_images(split_path(paths.prepared_dir, "val"))

    checkpoint_dir = Path("build") / "checkpoints" / "train"
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # a fresh run; resume is opt-in
    net, config, history, trainer, speed = fit(train_set, val_set, meta, cfg, checkpoint_dir)
    if not trainer.is_global_zero:
        return None  # under DDP only rank zero writes artefacts

    best = min(history, key=lambda row: row["val_loss"])
    save_model(
        net,
        config,
        paths.model_dir,
        extra={"class_names": list(meta.class_names), "trained_epochs": len(history)},
    )
    metrics_dir = Path(paths.metrics_dir)
    write_json(
        metrics_dir / "train.json",
        {
            "epochs_run": len(history),
            "best_epoch": best["epoch"],
            "best_val_loss": best["val_loss"],
            "best_val_accuracy": best["val_accuracy"],
        },
    )
    with (metrics_dir / "train_history.csv").open("w") as fh:
        fh.write(",".join(HISTORY_FIELDS) + "\n")
        for row in history:
            fh.write(",".join(json.dumps(row[k]) for k in HISTORY_FIELDS) + "\n")
    log.info(
        "%d epochs, best val_loss %.4f (epoch %d), val_accuracy %.4f, %.0f samples/s",
        len(history),
        best["val_loss"],
        best["epoch"],
        best["val_accuracy"],
        speed,
    )
    return TrainResult(
        Path(paths.model_dir), len(history), best["val_loss"], best["val_accuracy"], speed
    )


if __name__ == "__main__":
    main("train", run)
