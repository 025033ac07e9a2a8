"""Pruning: structured (remove channels and hidden units) and unstructured (zero weights).

Structured pruning uses torch-pruning's dependency graph (DepGraph, Fang et al. 2023): taking
out one output channel of a conv also takes out the matching input channel of the next conv
(or the matching block of inputs of the dense layer after the flatten), so the network stays
consistent and really gets smaller: fewer parameters, a smaller file, less compute. The
output layer is never pruned (it is one unit per class, or the one predicted value).

LSTM / GRU networks: torch-pruning 1.6.1 cannot prune them (its LSTM pruner slices the wrong
dimensions and fails, and it knows no GRU), so their recurrent units are removed here
(:func:`prune_recurrent`): a unit goes with its rows in every gate of its layer, its column of
the layer's recurrent weights and its input column in the next layer (or the dense head); then
DepGraph prunes the dense head alone.

Unstructured pruning zeroes the weights of smallest magnitude across all conv, dense and
recurrent layers. The tensors stay dense, so the ONNX file has the same size and runs at the same
speed; only a compressed archive (gzip) gets smaller. It is here to be measured, not sold.

Both are followed by a short fine-tune with train's loop (:mod:`components.finetune`).
"""

from __future__ import annotations

import copy

from components.config import PruningParams, TrainParams
from components.dataset import ArraySet
from components.finetune import FitReport, fit_network


def _output_layer(net):
    from torch import nn

    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


def _rnn(net):
    from torch import nn

    return next((m for m in net.modules() if isinstance(m, nn.LSTM | nn.GRU)), None)


def _depgraph_prune(net, example, amount: float) -> None:
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(
        net,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=amount,
        ignored_layers=[_output_layer(net)],
    )
    pruner.step()


def prune_structured(net, input_shape: tuple[int, ...], amount: float):
    """A copy of ``net`` with ``amount`` of the channels / hidden units of every layer removed.

    Importance is the L2 norm of each channel's weights (grouped over every layer the
    channel touches). For an LSTM / GRU network the recurrent units go first
    (:func:`prune_recurrent`), then the dense head's hidden units.
    """
    import torch

    net = copy.deepcopy(net).cpu().eval()
    rnn = _rnn(net)
    if rnn is None:
        _depgraph_prune(net, torch.zeros(1, *input_shape), amount)
        return net
    head = net.classifier
    prune_recurrent(rnn, _first_linear(head), amount)
    if sum(1 for m in head.modules() if isinstance(m, torch.nn.Linear)) > 1:  # hidden layers
        _depgraph_prune(head, torch.zeros(1, rnn.hidden_size), amount)
    return net


def _first_linear(head):
    from torch import nn

    return next(m for m in head.modules() if isinstance(m, nn.Linear))


def prune_recurrent(rnn, reader, amount: float) -> None:
    """Remove ``amount`` of the units of every layer of ``rnn`` (an ``nn.LSTM`` / ``nn.GRU``,
    ``batch_first``, one direction), in place, and the matching inputs of ``reader``, the
    ``nn.Linear`` that reads the last layer's output.

    A unit's importance is the L2 norm of every weight it owns or feeds: its rows in each gate
    (input and recurrent weights, biases), its column of the recurrent weights and its input
    column in the next layer. Every layer keeps the same number of units (``nn.LSTM`` has one
    ``hidden_size``), each its own most important ones.
    """
    import torch
    from torch import nn

    if rnn.bidirectional or getattr(rnn, "proj_size", 0):
        raise ValueError("prune_recurrent: bidirectional or projected RNNs are not supported")
    hidden, layers = rnn.hidden_size, rnn.num_layers
    gates = rnn.weight_ih_l0.shape[0] // hidden  # LSTM 4 (i, f, g, o), GRU 3 (r, z, n)
    keep_n = max(1, hidden - int(round(amount * hidden)))
    if keep_n == hidden:
        return
    w = {name: p.detach() for name, p in rnn.named_parameters()}

    def rows(idx: torch.Tensor) -> torch.Tensor:  # the unit's row in every gate
        return torch.cat([idx + g * hidden for g in range(gates)])

    keep: list[torch.Tensor] = []
    for layer in range(layers):
        score = torch.zeros(hidden)
        for name in (f"weight_ih_l{layer}", f"weight_hh_l{layer}"):
            score += w[name].reshape(gates, hidden, -1).pow(2).sum(dim=(0, 2))
        for name in (f"bias_ih_l{layer}", f"bias_hh_l{layer}"):
            if name in w:
                score += w[name].reshape(gates, hidden).pow(2).sum(dim=0)
        score += w[f"weight_hh_l{layer}"].pow(2).sum(dim=0)  # what the unit feeds back
        readers = w[f"weight_ih_l{layer + 1}"] if layer + 1 < layers else reader.weight.detach()
        score += readers.pow(2).sum(dim=0)  # what it feeds forward
        keep.append(torch.sort(torch.topk(score.sqrt(), keep_n).indices).values)

    new = {}
    for layer in range(layers):
        r = rows(keep[layer])
        w_ih = w[f"weight_ih_l{layer}"][r]
        if layer > 0:
            w_ih = w_ih[:, keep[layer - 1]]
        new[f"weight_ih_l{layer}"] = w_ih
        new[f"weight_hh_l{layer}"] = w[f"weight_hh_l{layer}"][r][:, keep[layer]]
        for name in (f"bias_ih_l{layer}", f"bias_hh_l{layer}"):
            if name in w:
                new[name] = w[name][r]
    for name, value in new.items():
        setattr(rnn, name, nn.Parameter(value.clone().contiguous()))
    rnn.hidden_size = keep_n
    rnn.flatten_parameters()
    reader.weight = nn.Parameter(reader.weight.detach()[:, keep[-1]].clone().contiguous())
    reader.in_features = keep_n


def _prunable(net) -> list[tuple[object, str]]:
    from torch import nn

    out = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            out.append((m, "weight"))
        elif isinstance(m, nn.LSTM | nn.GRU):  # names stay put while masks are attached
            directions = ("", "_reverse") if m.bidirectional else ("",)
            out += [
                (m, f"weight_{kind}_l{layer}{d}")
                for layer in range(m.num_layers)
                for d in directions
                for kind in ("ih", "hh")
            ]
    return out


def prune_unstructured(net, amount: float):
    """A copy of ``net`` with ``amount`` of its conv/dense/recurrent weights masked to zero
    (global L1).

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
    input_shape: tuple[int, ...],
    train_set: ArraySet,
    val_set: ArraySet,
    train: TrainParams,
    params: PruningParams,
) -> tuple[object, FitReport | None]:
    """``method`` is ``prune_structured`` or ``prune_unstructured``; returns a new network."""
    if method == "prune_structured":
        pruned = prune_structured(net, input_shape, params.structured_amount)
    elif method == "prune_unstructured":
        pruned = prune_unstructured(net, params.unstructured_amount)
    else:
        raise ValueError(f"unknown pruning method {method!r}")
    pruned.requires_grad_(True)
    report = None
    if params.finetune_epochs:
        report = fit_network(
            pruned, train_set, val_set, train, params.finetune_epochs,
            params.finetune_learning_rate, label=f"{method} fine-tune",
        )  # fmt: skip
    return make_permanent(pruned), report
