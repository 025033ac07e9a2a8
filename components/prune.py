"""Pruning: structured (remove channels and hidden units) and unstructured (zero weights).

Structured pruning uses torch-pruning's dependency graph (DepGraph, Fang et al. 2023): taking
out one output channel of a conv also takes out the matching input channel of the next conv
(or the matching block of inputs of the dense layer after the flatten), so the network stays
consistent and really gets smaller: fewer parameters, a smaller file, less compute. The
output layer is never pruned (it is one unit per class).

Unstructured pruning zeroes the weights of smallest magnitude across all conv and dense
layers. The tensors stay dense, so the ONNX file has the same size and runs at the same
speed; only a compressed archive (gzip) gets smaller. It is here to be measured, not sold.

Both are followed by a short fine-tune with train's loop (:mod:`components.finetune`).
"""

from __future__ import annotations

import copy

from components.config import PruningParams, TrainParams
from components.dataset import ImageSet
from components.finetune import FitReport, fit_network


def _output_layer(net):
    from torch import nn

    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


def prune_structured(net, image_shape: tuple[int, ...], amount: float):
    """A copy of ``net`` with ``amount`` of the channels / hidden units of every layer removed.

    Importance is the L2 norm of each channel's weights (grouped over every layer the
    channel touches).
    """
    import torch
    import torch_pruning as tp

    net = copy.deepcopy(net).cpu().eval()
    pruner = tp.pruner.MetaPruner(
        net,
        torch.zeros(1, *image_shape),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=amount,
        ignored_layers=[_output_layer(net)],
    )
    pruner.step()
    return net


def _prunable(net) -> list[tuple[object, str]]:
    from torch import nn

    return [(m, "weight") for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def prune_unstructured(net, amount: float):
    """A copy of ``net`` with ``amount`` of its conv/dense weights masked to zero (global L1).

    The masks stay attached (``torch.nn.utils.prune``), so a fine-tune keeps the zeros;
    :func:`make_permanent` bakes them in before export.
    """
    from torch.nn.utils import prune

    net = copy.deepcopy(net).cpu().eval()
    prune.global_unstructured(_prunable(net), pruning_method=prune.L1Unstructured, amount=amount)
    return net


def make_permanent(net):
    """Fold pruning masks into the weights (no-op for a network without masks)."""
    from torch.nn.utils import prune

    for module, name in _prunable(net):
        if prune.is_pruned(module) and hasattr(module, f"{name}_mask"):
            prune.remove(module, name)
    return net


def count_nonzero(net) -> int:
    return int(sum(int((p != 0).sum()) for p in net.parameters()))


def prune_and_finetune(
    net,
    method: str,
    image_shape: tuple[int, ...],
    train_set: ImageSet,
    val_set: ImageSet,
    train: TrainParams,
    params: PruningParams,
) -> tuple[object, FitReport | None]:
    """``method`` is ``prune_structured`` or ``prune_unstructured``; returns a new network."""
    if method == "prune_structured":
        pruned = prune_structured(net, image_shape, params.structured_amount)
    elif method == "prune_unstructured":
        pruned = prune_unstructured(net, params.unstructured_amount)
    else:
        raise ValueError(f"unknown pruning method {method!r}")
    pruned.requires_grad_(True)
    report = None
    if params.finetune_epochs:
        report = fit_network(
            pruned, train_set, val_set, train, params.finetune_epochs,
            params.finetune_learning_rate,
        )  # fmt: skip
    return make_permanent(pruned), report
