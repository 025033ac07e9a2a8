"""What fits the data a study tunes for: the metrics its task logs, the models its kind needs.

Checked before any trial, so a study that could only fail (a cnn offered for a table, an
accuracy objective on a regression) is refused with one line naming the key.
"""

from __future__ import annotations

from pathlib import Path

from components import kinds, tasks
from components.config import Params
from components.families import MODELS
from components.tuning.study import TuneError


def check_fits_data(params: Params, root: Path) -> None:
    """``tune.metric`` must be one the train stage logs for this data's task (the task of the
    prepared data when there is some, else ``ingest.task`` when it is not ``auto``), and every
    model the space offers must read this kind of data. Raises :class:`TuneError`."""
    from components.dataset import DatasetMeta, meta_path

    meta_file = meta_path(root / params.paths.prepared_dir)
    meta = DatasetMeta.load(meta_file) if meta_file.is_file() else None
    task = meta.task if meta else params.ingest.task if params.ingest.task != "auto" else None
    logged = ("val_loss", tasks.get(task).val_metric) if task is not None else ()
    if task is not None and params.tune.metric not in logged:
        raise TuneError(
            f"tune.metric {params.tune.metric}: the data is a {task} task, whose train stage "
            f"logs {' and '.join(logged)}"
        )
    kind = meta.kind if meta else kinds.detect(params.ingest)
    unfit = [m for m in MODELS if m not in kinds.get(kind).models]  # as the families declare
    dim = params.tune.space.get("train.model")
    choices = list(dim.choices) if dim is not None and dim.choices is not None else []
    for model in choices or [params.train.model]:
        if model in unfit:
            where = "tune.space.train.model: choice" if choices else "train.model"
            fits = [m for m in MODELS if m not in unfit]
            raise TuneError(
                f"{where} {model!r} cannot read this data (a {kind}); use {', '.join(fits)}"
            )
