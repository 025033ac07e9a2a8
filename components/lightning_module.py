"""The LightningModule every training run shares: the train stage and the compress fine-tunes.

It wraps a plain network (components/model.py) with the task's loss (components/tasks/), the
optimiser and learning-rate schedule of ``train`` params, the L1 term, image augmentation and
the validation metrics. Lightning is imported inside the functions: it is slow to import.
"""

from __future__ import annotations

import math

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
