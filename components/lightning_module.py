"""The LightningModule every training run shares: the train stage and the compress fine-tunes.

It wraps a plain network (components/model.py) with the task's loss (components/tasks/), the
optimiser and learning-rate schedule of ``train`` params, the L1 term, image augmentation and
the validation metrics. :func:`epoch_progress` is the line per epoch both print, and
:func:`quiet_lightning` the notices of Lightning we silence, with the reasons. Lightning is
imported inside the functions: it is slow to import.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings

from components import tasks
from components.config import TrainParams


def augment_batch(x, params):
    """Random crop (pad, then shift), small rotation and horizontal flip, per image.

    Works on float batches (N, C, H, W) on any device; uses torch's global RNG, which the
    seeded Trainer makes reproducible.
    """
    import torch
    from torch.nn import functional as F

    aug = params.augment
    n = x.shape[0]
    if aug.crop_padding:
        p = aug.crop_padding
        padded = F.pad(x, (p, p, p, p))
        dx = torch.randint(0, 2 * p + 1, (n,)).tolist()
        dy = torch.randint(0, 2 * p + 1, (n,)).tolist()
        h, w = x.shape[2:]
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if aug.max_rotation_degrees:
        angles = (torch.rand(n, device=x.device) * 2 - 1) * math.radians(aug.max_rotation_degrees)
        cos, sin = torch.cos(angles), torch.sin(angles)
        zero = torch.zeros_like(cos)
        theta = torch.stack(
            [torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    if aug.horizontal_flip:
        flip = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def lightning_module(net, params: TrainParams):
    """Wrap the plain network in a LightningModule (imported lazily: Lightning is slow); the
    fine-tunes of compress (components/finetune.py) train through the same module."""
    import lightning as L
    import torch
    from torch.nn import functional as F

    if params.max_epochs is None:  # the fine-tunes set their own; train resolves it first
        raise ValueError(
            "train.max_epochs is still auto (null): resolve the train params first "
            "(components/recipe.py)"
        )
    augmenting = bool(
        params.augment.crop_padding
        or params.augment.max_rotation_degrees
        or params.augment.horizontal_flip
    )
    regression = bool(getattr(net, "regression", False))
    task = tasks.REGRESSION if regression else tasks.CLASSIFICATION
    target_var = float(net.target_std) ** 2 if regression else 1.0

    def task_loss(out, y):
        return task.loss(out, y, target_var)

    class NetworkModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def on_train_epoch_start(self):
            self._loss_sum = torch.zeros((), device=self.device)
            self._loss_count = torch.zeros((), device=self.device)

        # A run resumed mid-epoch (train.checkpoint_every_n_steps) does not start that epoch
        # again: the running loss of its first part travels in the checkpoint.
        def on_save_checkpoint(self, checkpoint):
            if hasattr(self, "_loss_sum"):
                checkpoint["epoch_train_loss"] = [float(self._loss_sum), float(self._loss_count)]

        def on_load_checkpoint(self, checkpoint):
            total, count = checkpoint.get("epoch_train_loss", (0.0, 0.0))
            self._loss_sum = torch.tensor(total)
            self._loss_count = torch.tensor(count)

        def on_train_start(self):
            for name in ("_loss_sum", "_loss_count"):  # loaded on the CPU: to this device
                if hasattr(self, name):
                    setattr(self, name, getattr(self, name).to(self.device))

        def training_step(self, batch, _):
            x, y = batch
            x = x.float()
            if augmenting:
                x = augment_batch(x, params)
            loss = task_loss(self.net(x), y)
            # Our own running mean: Lightning aggregates logged epoch values only after the
            # validation of that epoch, which is when the history row is written.
            self._loss_sum += loss.detach() * len(y)
            self._loss_count += len(y)
            if params.l1_penalty:
                weights = [p for p in self.net.parameters() if p.requires_grad and p.dim() > 1]
                loss = loss + params.l1_penalty * sum(p.abs().sum() for p in weights)
            return loss

        def epoch_train_loss(self) -> float | None:
            """Mean training loss of the current epoch over all ranks (a collective call)."""
            if not hasattr(self, "_loss_sum"):
                return None
            total = self.trainer.strategy.reduce(self._loss_sum, reduce_op="sum")
            count = self.trainer.strategy.reduce(self._loss_count, reduce_op="sum")
            return float(total / count.clamp(min=1))

        def validation_step(self, batch, _):
            x, y = batch
            out = self.net(x.float())
            self.log("val_loss", task_loss(out, y), on_epoch=True, sync_dist=True)
            if regression:
                # The mean of per-batch squared errors; its root is taken per epoch (History).
                mse = F.mse_loss(out[:, 0], y.float())
                self.log("val_mse", mse, on_epoch=True, sync_dist=True)
            else:
                acc = (out.argmax(dim=1) == y).float().mean()
                self.log("val_accuracy", acc, on_epoch=True, sync_dist=True)

        def configure_optimizers(self):
            trainable = [p for p in self.parameters() if p.requires_grad]
            lr, wd = params.learning_rate, params.weight_decay
            if params.optimizer == "sgd":
                opt = torch.optim.SGD(
                    trainable, lr=lr, momentum=params.momentum, nesterov=params.nesterov,
                    weight_decay=wd,
                )  # fmt: skip
            elif params.optimizer == "adamw":
                opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=wd)
            else:
                opt = torch.optim.Adam(trainable, lr=lr, weight_decay=wd)
            sched = torch.optim.lr_scheduler
            if params.lr_schedule == "step":
                s = sched.StepLR(opt, step_size=params.lr_step_epochs, gamma=params.lr_step_gamma)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "epoch"}}
            if params.lr_schedule == "cosine":
                s = sched.CosineAnnealingLR(opt, T_max=params.max_epochs)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "epoch"}}
            if params.lr_schedule == "onecycle":
                steps = int(self.trainer.estimated_stepping_batches)
                s = sched.OneCycleLR(opt, max_lr=lr, total_steps=steps)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}
            return opt

    return NetworkModule()


def data_loader(data, batch_size: int, *, shuffle: bool, seed: int, regression: bool,
                batch_norm: bool):  # fmt: skip
    """Batches of a split for one process: a seeded DataLoader over an in-memory split, or a
    :class:`~components.shards.ShardLoader` over a sharded one (each DDP rank reads its own
    share of every epoch; its place in the epoch is saved in checkpoints)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from components.dataset import SeriesWindows, ShardedSet
    from components.shards import ShardLoader

    # A last batch of one example breaks batch norm's statistics: drop it.
    drop_last = shuffle and batch_norm and len(data) % batch_size == 1
    if isinstance(data, ShardedSet):
        return ShardLoader(data.directory, batch_size, shuffle=shuffle, seed=seed,
                           drop_last=shuffle and batch_norm,
                           y_dtype="float32" if regression else None)  # fmt: skip
    y = data.y.astype("float32") if regression else data.y
    if isinstance(data, SeriesWindows):  # each window cut from the rows as it is drawn
        tensors = _Windows(torch.from_numpy(data.rows), torch.from_numpy(y), data.window)
    else:
        tensors = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(y))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        tensors, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
    )


class _Windows:
    """A series' windows as a map-style dataset: item ``i`` is rows ``i .. i + window - 1``
    (a view: the rows are held once) and its target, as TensorDataset would give them."""

    def __init__(self, rows, targets, window: int) -> None:
        self.rows, self.targets, self.window = rows, targets, window

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.rows[i : i + self.window], self.targets[i]


def show_progress_bar() -> bool:
    """Lightning's progress bar only on a terminal: piped into DVC and Prefect, a bar redrawn
    in place is one ever-growing line; the per-epoch lines of :func:`epoch_progress` are what
    a log shows. Lightning draws its bar on stdout, so stdout is the stream that must be one
    (``python -m components.train | tee log`` gets the lines, not the bar)."""
    return sys.stdout.isatty()


def quiet_lightning() -> None:
    """Silence what Lightning says on every fit that a user can do nothing about.

    Each filter matches one message where it arises; anything else Lightning warns about shows.
    """
    # Lightning 2.6's CombinedLoader flattens the loaders with ``LeafSpec()``, a class torch
    # 2.13 deprecated (FutureWarning). Lightning's own code, not ours: nothing to change here.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # Our loaders are tensors in memory: worker processes would copy them and cost more than
    # they save (Lightning suggests them on any machine with more than 2 cores).
    warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")
    # Per-fit notices (GPU/TPU available, litlogger/litmodels tips, "max_epochs reached")
    # would bury the stage's own lines; Lightning's warnings still show.
    logging.getLogger("lightning.pytorch").propagate = False
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_line(
    label: str,
    epoch: int,
    epochs: int,
    train_loss: float | None,
    val_loss: float | None,
    metric: str,
    value: float | None,
    samples_per_second: float,
    seconds_left: float,
) -> str:
    """``epoch 3/20: train_loss 0.4123, val_loss 0.3990, val_accuracy 0.9120; 1234 samples/s,
    2 min 10 s left``, after ``label`` when there is one."""

    def number(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    head = f"{label} epoch" if label else "epoch"
    return (
        f"{head} {epoch}/{epochs}: train_loss {number(train_loss)}, val_loss {number(val_loss)}, "
        f"{metric} {number(value)}; {samples_per_second:.0f} samples/s, "
        f"{_duration(seconds_left)} left"
    )


def epoch_progress(logger: logging.Logger, train_samples: int, task: str, label: str = ""):
    """A Lightning callback that prints one line per epoch (:func:`progress_line`): the mean
    training loss, the validation loss and the task's validation metric, the epoch's samples
    per second (training and validation time), and the time left at the mean epoch time so
    far (an upper bound: early stopping may end sooner).

    It only reads: no numbers, seeds or steps of the run change. Every rank takes part in the
    reduction of the training loss (a collective call); global rank zero prints. Through
    ``logger`` the line is flushed at once (a logging handler flushes every record), so a log
    streamed from a pipe gets it when the epoch ends; with Lightning's progress bar on (a
    terminal) it is printed above the bar instead.
    """
    import lightning as L

    metric = tasks.get(task).val_metric

    class EpochProgress(L.Callback):
        def __init__(self):
            self.started = 0.0
            self.seconds: list[float] = []

        def on_train_start(self, trainer, module):  # a run resumed mid-epoch starts here
            self.started = time.perf_counter()

        def on_train_epoch_start(self, trainer, module):
            self.started = time.perf_counter()

        def on_validation_epoch_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            train_loss = module.epoch_train_loss()  # on every rank: a collective call
            if not trainer.is_global_zero:
                return
            self.seconds.append(time.perf_counter() - self.started)
            m = trainer.callback_metrics
            val_loss = float(m["val_loss"]) if "val_loss" in m else None
            if metric in m:
                value = float(m[metric])
            elif metric == "val_rmse" and "val_mse" in m:
                value = math.sqrt(float(m["val_mse"]))
            else:
                value = None
            epoch, epochs = trainer.current_epoch + 1, trainer.max_epochs
            mean = sum(self.seconds) / len(self.seconds)
            line = progress_line(
                label, epoch, epochs, train_loss, val_loss, metric, value,
                train_samples / self.seconds[-1] if self.seconds[-1] > 0 else 0.0,
                mean * max(0, epochs - epoch),
            )  # fmt: skip
            bar = trainer.progress_bar_callback  # None unless enable_progress_bar
            if bar is not None:
                bar.print(line)
            else:
                logger.info("%s", line)

    return EpochProgress()
