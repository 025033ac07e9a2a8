"""Optuna pruning inside the train stage, when the stage runs as a trial of a tuning study.

``flows/tune.py`` runs each trial as ``dvc exp run --temp``; it passes the study's storage URL,
the study's name and the trial's id to the train stage in environment variables. Then
:func:`trial_callbacks` gives the Lightning callback that reports the validation metric to the
trial after every epoch and stops the run when the study's pruner says the trial is not
promising. Outside a study (``dvc repro``, ``make pipeline``) the variables are absent and the
list is empty: the stage trains exactly as it always does.

A pruned run fails the stage with a one-line reason (``pruned by Optuna ...``) instead of
ending early with a model: DVC then records neither its outputs in the run-cache nor an
experiment, so a later ``dvc repro`` with the same params can never restore a model that was
cut short. The flow marks the trial PRUNED; its epoch values stay in the study.
"""

from __future__ import annotations

import json
import os
import warnings

from components.stage import StageError

ENV_STORAGE = "TUNE_OPTUNA_STORAGE"
ENV_STUDY = "TUNE_OPTUNA_STUDY"
ENV_TRIAL_ID = "TUNE_OPTUNA_TRIAL_ID"
ENV_METRIC = "TUNE_OPTUNA_METRIC"  # the epoch metric logged by the train stage: val_loss, ...
ENV_PRUNER = "TUNE_OPTUNA_PRUNER"  # tune.pruning as JSON: Optuna does not store the pruner
PRUNED_MARK = "pruned by Optuna"  # the flow recognises a pruned trial by this phrase


def open_storage(url: str, **heartbeat):
    """Optuna's RDB storage for ``url``; SQLite waits up to a minute for a busy database
    (several workers and their train stages write to one file) instead of failing at once.
    ``heartbeat``: RDBStorage's ``heartbeat_interval`` and ``grace_period`` (the tuning flow's)."""
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)


def pruner_from(pruning: dict):
    """The study's pruner from ``tune.pruning`` (enabled, startup_trials, warmup_epochs): the
    median rule, or none."""
    import optuna

    if not pruning["enabled"]:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=pruning["startup_trials"], n_warmup_steps=pruning["warmup_epochs"]
    )


def trial_from_env() -> dict | None:
    """The study and trial this process trains for, or None outside a study."""
    names = (ENV_STORAGE, ENV_STUDY, ENV_TRIAL_ID, ENV_METRIC, ENV_PRUNER)
    values = {name: os.environ.get(name, "") for name in names}
    if not any(values.values()):
        return None
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise StageError(f"tuning trial: environment variable(s) {', '.join(missing)} not set")
    return {
        "storage": values[ENV_STORAGE],
        "study": values[ENV_STUDY],
        "trial_id": int(values[ENV_TRIAL_ID]),
        "metric": values[ENV_METRIC],
        "pruning": json.loads(values[ENV_PRUNER]),
    }


def _pruning_callback(info: dict):
    import lightning as L
    import optuna

    class OptunaPruning(L.Callback):
        """Report ``metric`` after each validation epoch; stop the trial when told to prune.

        Only global rank zero talks to the study; its decision is broadcast so every rank
        stops together under DDP.
        """

        def __init__(self):
            self.trial = None

        def setup(self, trainer, module, stage):
            if trainer.is_global_zero and self.trial is None:
                study = optuna.load_study(
                    study_name=info["study"],
                    storage=open_storage(info["storage"]),
                    pruner=pruner_from(info["pruning"]),
                )
                self.trial = optuna.Trial(study, info["trial_id"])

        def on_validation_epoch_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            epoch = trainer.current_epoch + 1
            prune, value = False, None
            if trainer.is_global_zero:
                metrics = dict(trainer.callback_metrics)
                if info["metric"] == "val_rmse" and "val_mse" in metrics:  # regression
                    metrics["val_rmse"] = metrics["val_mse"] ** 0.5
                if info["metric"] not in metrics:
                    raise StageError(
                        f"tune.metric: the train stage logs no {info['metric']!r} "
                        f"(logged: {', '.join(sorted(metrics)) or 'nothing'})"
                    )
                value = float(metrics[info["metric"]])
                self.trial.report(value, step=epoch)
                prune = self.trial.should_prune()
            prune = trainer.strategy.broadcast(prune, src=0)
            if prune:
                shown = f" ({info['metric']} {value:.4f})" if value is not None else ""
                raise StageError(
                    f"{PRUNED_MARK} after epoch {epoch}{shown}: trial {info['trial_id']} of "
                    f"study {info['study']!r} is less promising than the others"
                )

    return OptunaPruning()


def trial_callbacks() -> list:
    """Lightning callbacks for a tuning trial: the pruning callback, or [] outside a study."""
    info = trial_from_env()
    return [] if info is None else [_pruning_callback(info)]
