"""Short Lightning runs for the compress stage: fine-tune a pruned network, train a student.

The loop is train's own: the LightningModule of ``components/train.py`` (its optimiser, lr
schedule, augmentation, L1 term and validation metrics) wraps the plain network, so a
compressed network is trained exactly as the teacher was, only for fewer epochs. Distillation
subclasses that module and replaces the training loss with the soft-target loss of Hinton et
al. (2015) for a classifier, or with the mean squared error to the teacher's outputs and to the
labels for a regression network. The weights of the epoch with the lowest validation loss are
kept, in memory: these runs are short and leave no checkpoints behind.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

from components.config import TrainParams
from components.dataset import Split
from components.lightning_module import (
    augment_batch,
    data_loader,
    epoch_progress,
    lightning_module,
    quiet_lightning,
    show_progress_bar,
)

log = logging.getLogger("pipeline.compress")


@dataclass(frozen=True)
class Teacher:
    """What a student learns from: the teacher network and how its outputs are softened."""

    net: object  # nn.Module, kept frozen and in eval mode
    temperature: float
    soft_loss_weight: float


@dataclass
class FitReport:
    epochs: int
    best_epoch: int
    best_val_loss: float
    best_val_accuracy: float | None  # classification
    best_val_rmse: float | None = None  # regression, in target units

    def summary(self) -> str:
        """``best val accuracy 0.9712`` or ``best val RMSE 1.234``, with its epoch."""
        if self.best_val_accuracy is not None:
            what = f"best val accuracy {self.best_val_accuracy:.4f}"
        elif self.best_val_rmse is not None:
            what = f"best val RMSE {self.best_val_rmse:.4g}"
        else:
            what = f"best val loss {self.best_val_loss:.4g}"
        return f"{what} (epoch {self.best_epoch})"


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, weight: float):
    """``w * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - w) * CE(s, labels)``.

    The ``T^2`` keeps the soft term's gradients on the scale of the hard term's whatever the
    temperature (Hinton et al., 2015).
    """
    from torch.nn import functional as F

    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    hard = F.cross_entropy(student_logits, labels)
    return weight * soft + (1 - weight) * hard


def regression_distillation_loss(
    student_out, teacher_out, targets, target_std: float, weight: float
):
    """``w * MSE(s, t) + (1 - w) * MSE(s, y)``, both on the standardised scale (divided by the
    training targets' variance, as train's regression loss is). Outputs are ``(N, 1)`` values
    in target units; there is no temperature: a value has no distribution to soften.
    """
    from torch.nn import functional as F

    s = student_out.reshape(-1)
    var = float(target_std) ** 2 or 1.0
    soft = F.mse_loss(s, teacher_out.reshape(-1)) / var
    hard = F.mse_loss(s, targets.reshape(-1).float()) / var
    return weight * soft + (1 - weight) * hard


def _augmenting(params: TrainParams) -> bool:
    a = params.augment
    return bool(a.crop_padding or a.max_rotation_degrees or a.horizontal_flip)


def _module(net, params: TrainParams, teacher: Teacher | None):
    base = lightning_module(net, params)
    if teacher is None:
        return base

    import torch

    frozen = copy.deepcopy(teacher.net).eval().requires_grad_(False)
    augmenting = _augmenting(params)
    regression = bool(getattr(net, "regression", False))
    target_std = float(net.target_std) if regression else 1.0

    class DistillationModule(type(base)):
        def __init__(self):
            super().__init__()
            self.teacher = frozen  # a submodule so Lightning moves it to the device

        def training_step(self, batch, _):
            x, y = batch
            x = x.float()
            if augmenting and x.dim() == 4:  # crops, rotations and flips are for images
                x = augment_batch(x, params)
            self.teacher.eval()  # Lightning puts every submodule in train mode: no dropout here
            with torch.no_grad():
                soft_targets = self.teacher(x)
            if regression:
                loss = regression_distillation_loss(
                    self.net(x), soft_targets, y, target_std, teacher.soft_loss_weight
                )
            else:
                loss = distillation_loss(
                    self.net(x), soft_targets, y, teacher.temperature, teacher.soft_loss_weight
                )
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            self._loss_sum += loss.detach() * len(y)  # the epoch's mean, for the progress line
            self._loss_count += len(y)
            if params.l1_penalty:
                weights = [p for p in self.net.parameters() if p.requires_grad and p.dim() > 1]
                loss = loss + params.l1_penalty * sum(p.abs().sum() for p in weights)
            return loss

    return DistillationModule()


def _best_weights_callback():
    import lightning as L

    class BestWeights(L.Callback):
        """Keeps a copy of the network's weights at its lowest validation loss."""

        def __init__(self):
            self.state = None
            self.report = FitReport(0, 0, float("inf"), None)

        def on_validation_epoch_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            epoch = trainer.current_epoch + 1
            self.report.epochs = epoch
            loss = float(m["val_loss"])
            if loss < self.report.best_val_loss:
                self.report.best_epoch, self.report.best_val_loss = epoch, loss
                # classification logs val_accuracy; regression val_mse (or val_rmse)
                if "val_accuracy" in m:
                    self.report.best_val_accuracy = float(m["val_accuracy"])
                if "val_rmse" in m:
                    self.report.best_val_rmse = float(m["val_rmse"])
                elif "val_mse" in m:
                    self.report.best_val_rmse = math.sqrt(float(m["val_mse"]))
                self.state = {
                    k: v.detach().cpu().clone() for k, v in module.net.state_dict().items()
                }

    return BestWeights()


def fit_network(
    net,
    train_set: Split,
    val_set: Split,
    params: TrainParams,
    epochs: int,
    learning_rate: float,
    teacher: Teacher | None = None,
    label: str | None = None,
) -> FitReport:
    """Train ``net`` in place for ``epochs`` with train's loop; keep its best validation weights.

    ``params`` is the train section (optimiser, batch size, seed, augmentation, precision,
    accelerator); ``epochs`` and ``learning_rate`` replace its own. One process, one device:
    these runs are seconds long, DDP would cost more than it saves. With a ``teacher`` the loss
    is :func:`distillation_loss`. Each epoch prints a line (components/lightning_module.py's
    ``epoch_progress``) that starts with ``label`` (default ``distil`` or ``fine-tune``).
    """
    import lightning as L

    params = params.model_copy(update={"max_epochs": epochs, "learning_rate": learning_rate})
    regression = bool(getattr(net, "regression", False))
    L.seed_everything(params.seed, workers=True, verbose=False)
    quiet_lightning()
    best = _best_weights_callback()
    if label is None:
        label = "distil" if teacher is not None else "fine-tune"
    task = "regression" if regression else "classification"
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=params.accelerator,
        devices=1,
        strategy="auto",
        precision=params.precision,
        deterministic=params.deterministic,
        gradient_clip_val=params.gradient_clip_norm or None,
        callbacks=[best, epoch_progress(log, len(train_set), task, label)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=show_progress_bar(),
        enable_model_summary=False,
    )

    def loader(data: Split, shuffle: bool):
        return data_loader(data, params.batch_size, shuffle=shuffle, seed=params.seed,
                           regression=regression, batch_norm=params.batch_norm)  # fmt: skip

    module = _module(net, params, teacher)
    # Lightning keeps each module's mode: a network handed over in eval mode (as loaded or
    # exported) would train without dropout. The teacher goes back to eval in every step.
    module.train()
    trainer.fit(module, loader(train_set, True), loader(val_set, False))
    net.cpu()
    if best.state is not None:
        net.load_state_dict(best.state)
    net.eval()
    return best.report
