"""Distillation: a smaller student of the same family, trained on the teacher's soft targets.

The student is the teacher's architecture with fewer channels and hidden units, and for an
LSTM/GRU fewer recurrent units (``compress.distillation``: a width factor, or explicit widths).
A classifier learns the teacher's softened class probabilities; a regression network its
predicted values (:mod:`components.finetune`). To tell what the teacher adds, the same
student (same initial weights, seed, epochs and optimiser) is also trained on the labels
alone: the ``student_alone`` step.
"""

from __future__ import annotations

import copy
import dataclasses

from components.config import DistillationParams, TrainParams
from components.dataset import ArraySet
from components.families import FAMILIES
from components.finetune import FitReport, Teacher, fit_network
from components.model import NetConfig, build_model
from components.stage import StageError


def count_parameters(net) -> int:
    return sum(p.numel() for p in net.parameters())


def student_config(teacher: NetConfig, params: DistillationParams) -> NetConfig:
    """The teacher's architecture with the student's widths (and recurrent units: an explicit
    ``compress.distillation.rnn_hidden_size`` when set, else the teacher's times ``width``)."""

    def scaled(widths: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(max(1, round(w * params.width)) for w in widths)

    channels = params.channels if params.channels is not None else scaled(teacher.channels)
    hidden = (
        params.hidden_units if params.hidden_units is not None else scaled(teacher.hidden_units)
    )
    spec = FAMILIES[teacher.family]
    if "channels" in spec.widths and not channels:
        raise StageError(
            f"compress.distillation.channels: a {spec.name} student needs at least one block"
        )
    rnn_hidden = teacher.rnn_hidden_size
    if "rnn_hidden_size" in spec.widths:
        explicit = params.rnn_hidden_size  # at least 1 when set: checked with params.yaml
        rnn_hidden = explicit if explicit is not None else scaled((rnn_hidden,))[0]
    return dataclasses.replace(
        teacher, channels=tuple(channels), hidden_units=tuple(hidden), rnn_hidden_size=rnn_hidden
    )


def describe(config: NetConfig) -> str:
    """The widths that set a network's size, for messages."""
    return FAMILIES[config.family].describe(config)


def check_student(teacher_net, teacher: NetConfig, params: DistillationParams) -> NetConfig:
    """Build the student once to fail early: it must exist and be smaller than its teacher."""
    config = student_config(teacher, params)
    try:
        student = build_model(config)
    except ValueError as exc:
        raise StageError(f"compress.distillation: the student cannot be built: {exc}") from None
    n_student, n_teacher = count_parameters(student), count_parameters(teacher_net)
    if n_student >= n_teacher:
        raise StageError(
            f"compress.distillation: the student ({describe(config)}) has {n_student:,} "
            f"parameters, not fewer than its teacher's {n_teacher:,} ({describe(teacher)}): "
            "make it smaller"
        )
    return config


def new_student(config: NetConfig, seed: int):
    """The student's initial weights, the same for every call with the same seed."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(config)


def distil(
    teacher_net,
    config: NetConfig,
    train_set: ArraySet,
    val_set: ArraySet,
    train: TrainParams,
    params: DistillationParams,
    student=None,
) -> tuple[object, FitReport]:
    """Train a student on the teacher's soft targets (and the labels); a regression student
    on the teacher's predicted values (and the targets).

    The student is a new network of ``config``, or a copy of ``student`` when given (e.g. a
    pruned network recovering with the teacher's help).
    """
    student = new_student(config, train.seed) if student is None else copy.deepcopy(student)
    student.requires_grad_(True)
    teacher = Teacher(teacher_net, params.temperature, params.soft_loss_weight)
    report = fit_network(
        student, train_set, val_set, train, params.max_epochs, train.learning_rate, teacher
    )
    return student, report


def train_alone(
    config: NetConfig,
    train_set: ArraySet,
    val_set: ArraySet,
    train: TrainParams,
    params: DistillationParams,
) -> tuple[object, FitReport]:
    """The same student, same start and recipe, trained on the labels only: the baseline."""
    student = new_student(config, train.seed)
    report = fit_network(
        student, train_set, val_set, train, params.max_epochs, train.learning_rate,
        label="student_alone",
    )  # fmt: skip
    return student, report
