"""What fits the data a study tunes for: the metrics its task logs, the space its kind can use.

Checked before any trial. A metric the task does not log, or a space none of whose models can
read the data, is refused with one line naming the key. A space that offers, beside models that
fit, some that cannot read this kind (``cnn`` for a table, with the repository's space of every
family) is searched without them, and without the keys only they read (``train.channels``) or
only images use (``train.augment.*``); nor the step budget (``train.min_steps``) when
``train.max_epochs`` is set, which it then sizes nothing. The flow says what it left out.
"""

from __future__ import annotations

from pathlib import Path

from components import kinds, tasks
from components.config import Params, SearchDimension, TuneParams
from components.families import MODELS, readers_of
from components.tuning.study import TuneError


def data_kind_and_task(params: Params, root: Path) -> tuple[str, str | None]:
    """The kind and task of the prepared data when there is some, else what ingest will make
    of its source (the task: None while ``ingest.task`` is ``auto``)."""
    from components.dataset import DatasetMeta, meta_path

    meta_file = meta_path(root / params.paths.prepared_dir)
    meta = DatasetMeta.load(meta_file) if meta_file.is_file() else None
    if meta is not None:
        return meta.kind, meta.task
    task = params.ingest.task if params.ingest.task != "auto" else None
    return kinds.detect(params.ingest), task


def check_metric(params: Params, task: str | None) -> None:
    """``tune.metric`` must be one the train stage logs for this data's task."""
    logged = ("val_loss", tasks.get(task).val_metric) if task is not None else ()
    if task is not None and params.tune.metric not in logged:
        raise TuneError(
            f"tune.metric {params.tune.metric}: the data is a {task} task, whose train stage "
            f"logs {' and '.join(logged)}"
        )


def _models(names) -> str:
    return ", ".join(map(str, names))


def fit_space(params: Params, root: Path) -> tuple[TuneParams, list[str]]:
    """``params.tune`` with its space cut to what this data's kind can use, and one note per
    key or choice left out. Raises :class:`TuneError` when the metric does not fit the task,
    when no model of the space (or ``train.model``, when the space has none) can read the
    data, or when nothing is left to search.

    A choice that is not a family (``auto``: the train stage picks one) is kept, and counts as
    any family that reads the data."""
    kind_name, task = data_kind_and_task(params, root)
    check_metric(params, task)
    kind = kinds.get(kind_name)
    fits = kind.models  # as the families declare what they read
    space: dict[str, SearchDimension] = dict(params.tune.space)
    notes: list[str] = []

    dim = space.get("train.model")
    if dim is not None and dim.choices is not None:
        unfit = [m for m in dim.choices if m in MODELS and m not in fits]
        kept = tuple(m for m in dim.choices if m not in unfit)
        if not kept:
            what = "choice" if len(unfit) == 1 else "choices"
            raise TuneError(
                f"tune.space.train.model: {what} {_models(map(repr, unfit))} cannot read this "
                f"data (a {kind_name}); use {_models(fits)}"
            )
        if unfit:
            space["train.model"] = dim.model_copy(update={"choices": kept})
            notes.append(
                f"tune.space.train.model: {_models(unfit)} left out, "
                f"{'it cannot' if len(unfit) == 1 else 'they cannot'} read this data "
                f"(a {kind_name}); searching {_models(kept)}"
            )
        families = {m for m in kept if m in MODELS}
        if any(m not in MODELS for m in kept):
            families |= set(fits)
        if params.train.model in MODELS and params.train.model not in fits:
            notes.append(
                f"train.model {params.train.model} (params.yaml) cannot read this data "
                f"(a {kind_name}): the trial of the defaults will fail; set it to "
                f"{' or '.join(fits)}"
            )
    else:
        model = params.train.model
        if model in MODELS and model not in fits:
            raise TuneError(
                f"train.model {model!r} cannot read this data (a {kind_name}); use "
                f"{_models(fits)}, or offer them in tune.space.train.model"
            )
        families = {model} if model in MODELS else set(fits)

    if "train.min_steps" in space and params.train.max_epochs is not None:
        del space["train.min_steps"]
        notes.append(
            f"tune.space.train.min_steps left out: train.max_epochs is set "
            f"({params.train.max_epochs}), so the step budget sizes nothing (set it to null to "
            "search the budget)"
        )
    searched = _models(sorted(families, key=MODELS.index))
    for key in list(space):
        section, _, name = key.partition(".")
        if section != "train":
            continue
        if name.partition(".")[0] == "augment":
            if not kind.augmentable:
                del space[key]
                notes.append(
                    f"tune.space.{key} left out: crops, rotations and flips are for images, "
                    f"not a {kind.noun}"
                )
            continue
        readers = readers_of(name)
        if readers and not families & set(readers):
            del space[key]
            notes.append(
                f"tune.space.{key} left out: only {' and '.join(readers)} "
                f"{'reads' if len(readers) == 1 else 'read'} it, and the models searched are "
                f"{searched}"
            )
    if not space:
        raise TuneError(
            f"tune.space: nothing is left to search for this data (a {kind_name}): "
            + "; ".join(notes)
        )
    return params.tune.model_copy(update={"space": space}), notes
