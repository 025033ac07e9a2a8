"""The training recipe: what ``auto`` (or ``null``) means for each train param, for this data.

One pure function, :func:`resolve`, maps the data (its kind, training rows and example shape)
and the user's train params to train params with every value set, plus one
``"key value: why"`` line per value it chose. A value set in params.yaml (or by ``--set``) is
never changed: the recipe fills in only the keys left ``auto`` / ``null``.

- ``model: auto``: the family built for the data kind's examples (components/families.py
  ``built_for``): a CNN for images, an MLP for table rows, a GRU for sequences.
- its size (``channels``, ``hidden_units``, ``rnn_hidden_size`` null): conv blocks as many as
  the image's side allows, wider for small images (cheap there); a dense layer of 64; 64
  recurrent units.
- ``max_epochs: null``: the optimiser-step budget. At least ``min_steps`` optimiser steps and
  at least :data:`MIN_EPOCHS` epochs, at most :data:`MAX_EPOCHS`: a few hundred rows (a few
  steps an epoch) train for hundreds of epochs, the 3,500 training images of the MNIST sample
  (55 steps an epoch) for 19.
- ``early_stopping_patience: null``: a fifth of those epochs (at least 3), so a long budget is
  not cut short by a few flat epochs (the best weights by val_loss are kept whatever happens).
- ``forecast: auto``: for a time series whose windows hold the target, ``change`` when the
  window's last value alone explains at least :data:`CHANGE_MIN_PERSISTENCE_R2` of the training
  targets' variance (a series that moves slowly against its range: a lag-1 autocorrelation
  near 1, where Box-Jenkins practice differences a series): the network predicts the change
  from that value and adds it back (components/model.py), so a trending series' forecast can go
  beyond every value it was trained on. A level forecast, squashed by its training range,
  cannot: the S&P 500's test years lie above all its training years (R^2 0.52 as a level,
  0.95 as a change; bench/defaults.py). Below that share the series swings across its range
  from step to step and the level is forecast (an EEG channel, 0.79: 0.88 as a level, 0.72 as a
  change). ``level`` for every other data set.
- ``augment.crop_padding`` / ``max_rotation_degrees`` null: for images read by a CNN, a random
  shift of about 1/14 of the side and rotations up to 10 degrees (safe for any image: neither
  changes what it shows); never a flip unless ``horizontal_flip`` is set (a flipped digit is
  another symbol). Nothing for other kinds, nor for an MLP or RNN reading images (each pixel
  is a fixed input to them: a shifted image is a new one).

The train stage prints the lines and records them, with the resolved params, in model.json;
compress fine-tunes with the recorded params (:func:`recorded`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from components import kinds
from components.config import TrainParams
from components.families import FAMILIES

MIN_EPOCHS = 10  # a large data set still sees every example this often
MAX_EPOCHS = 500  # a tiny one (one step an epoch) stops here: ~20 ms an epoch, ~10 s
PATIENCE_SHARE = 5  # early stopping waits a fifth of the epochs ...
MIN_PATIENCE = 3  # ... and never fewer than this
ROTATION_DEGREES = 10.0  # small enough for digits and letters, and for photos
CROP_SHARE = 14  # shift up to side/14 pixels (2 for a 28 px image), at least 1
# forecast auto: change when persistence explains at least this share of the training targets'
# variance (1 - 2(1 - r1) for lag-1 autocorrelation r1: r1 >= 0.95). Measured: S&P 500 monthly
# 0.985 and a membrane potential 0.98 (change as good or better), an EEG channel 0.79 (change
# 0.72-0.84 R^2 against 0.87-0.88 as a level over three seeds).
CHANGE_MIN_PERSISTENCE_R2 = 0.9
SMALL_IMAGE_PIXELS = 16 * 16  # at or below: twice the conv channels (a small image is cheap)
DENSE_UNITS = (64,)
RNN_UNITS = 64
# The keys whose None (null) is the recipe's to fill in (train.model's is "auto").
AUTO_KEYS = ("max_epochs", "early_stopping_patience", "channels", "hidden_units", "rnn_hidden_size")
AUGMENT_KEYS = ("crop_padding", "max_rotation_degrees")


@dataclass(frozen=True)
class Recipe:
    params: TrainParams  # every value set
    choices: tuple[str, ...]  # "train.key value: why", one per value the recipe chose


def _steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(n_train / batch_size))


def _channels(input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], str]:
    """Conv blocks for an image ``(C, H, W)``; each halves the side (2x2 pooling)."""
    side = min(input_shape[1:])
    blocks = 1 if side < 4 else 2 if side < 32 else 3 if side < 64 else 4
    base = 32 if input_shape[1] * input_shape[2] <= SMALL_IMAGE_PIXELS else 16
    channels = tuple(base * 2**i for i in range(blocks))
    why = (
        f"{blocks} conv block(s) for {input_shape[1]}x{input_shape[2]} px images (2 below "
        "32 px, one more per doubling of the side from there)"
    )
    if base == 32:
        why += "; twice the channels at 16x16 px or less, where they cost little"
    return channels, why


def resolve(
    params: TrainParams,
    kind,
    n_train: int,
    input_shape: tuple[int, ...],
    last_value: str | None = None,
    persistence_r2: float | None = None,
) -> Recipe:
    """Train params with every ``auto`` / ``null`` value chosen for this data.

    ``kind`` is a data kind (components/kinds/): its ``auto_model`` and ``augmentable`` say
    what fits it; ``n_train`` is the number of training examples, ``input_shape`` one example's
    shape; ``last_value`` the target column of a time series whose windows hold its last
    observed value (None for any other data: components/model.py
    ``last_target_input``), and ``persistence_r2`` the share of the training targets' variance
    that value explains (None: not measured). (The task changes no other choice: the same
    budget serves classes and values.)"""
    if n_train < 1:
        raise ValueError("the training split is empty: nothing to size a recipe for")
    chosen: dict = {}
    choices: list[str] = []

    def choose(key: str, value, why: str) -> None:
        chosen[key] = value
        shown = list(value) if isinstance(value, tuple) else value
        choices.append(f"train.{key} {shown}: {why}")

    model = params.model
    if model == "auto":
        model = kind.auto_model
        choose("model", model, f"the family built for {kind.noun} data (train.model auto)")
    family = FAMILIES[model]

    if params.channels is None:
        if "channels" in family.widths and len(input_shape) == 3:
            value, why = _channels(input_shape)
            choose("channels", value, why)
        else:
            chosen["channels"] = ()  # a family without conv blocks: nothing to choose
    if params.hidden_units is None:
        choose("hidden_units", DENSE_UNITS, "one dense layer of 64 units before the output")
    if params.rnn_hidden_size is None:
        if family.recurrent:
            choose("rnn_hidden_size", RNN_UNITS, "64 units per recurrent layer")
        else:
            chosen["rnn_hidden_size"] = RNN_UNITS  # read by recurrent families only

    steps = _steps_per_epoch(n_train, params.batch_size)
    epochs = params.max_epochs
    if epochs is None:
        wanted = math.ceil(params.min_steps / steps)
        epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, wanted))
        why = (
            f"{n_train} training examples are {steps} step(s) of {params.batch_size} an epoch; "
            f"{epochs} epochs make {epochs * steps} optimiser steps"
        )
        if wanted > MAX_EPOCHS:
            why += f" (train.min_steps {params.min_steps} needs {wanted}; at most {MAX_EPOCHS})"
        elif wanted < MIN_EPOCHS:
            why += f" (at least {MIN_EPOCHS}; train.min_steps {params.min_steps} is reached)"
        else:
            why += f" (train.min_steps {params.min_steps})"
        choose("max_epochs", epochs, why)
    if params.early_stopping_patience is None:
        patience = max(MIN_PATIENCE, math.ceil(epochs / PATIENCE_SHARE))
        choose(
            "early_stopping_patience", patience,
            f"1/{PATIENCE_SHARE} of {epochs} epochs (at least {MIN_PATIENCE}); the best "
            "weights by val_loss are kept",
        )  # fmt: skip

    aug = params.augment
    augment: dict = {}
    images = kind.augmentable and len(input_shape) == 3
    if (
        images
        and not family.convolutional
        and (aug.crop_padding is None or aug.max_rotation_degrees is None)
    ):
        choices.append(
            f"train.augment off: {model} reads each pixel by position, so a shifted or turned "
            "image is a new one to it (only a cnn is augmented by default); set "
            "train.augment.* to augment anyway"
        )
        images = False
    if aug.crop_padding is None:
        if images:
            pad = max(1, round(min(input_shape[1:]) / CROP_SHARE))
            augment["crop_padding"] = pad
            choices.append(
                f"train.augment.crop_padding {pad}: random shifts of up to {pad} px "
                f"(~1/{CROP_SHARE} of the side) on training batches"
            )
        else:
            augment["crop_padding"] = 0
    if aug.max_rotation_degrees is None:
        if images:
            augment["max_rotation_degrees"] = ROTATION_DEGREES
            choices.append(
                f"train.augment.max_rotation_degrees {ROTATION_DEGREES:g}: small rotations are "
                "safe for any image (no flips unless train.augment.horizontal_flip is set)"
            )
        else:
            augment["max_rotation_degrees"] = 0.0
    if augment:
        chosen["augment"] = aug.model_copy(update=augment)
    if params.forecast == "auto":
        if last_value is None:
            chosen["forecast"] = "level"  # nothing to add a change to: not said for every set
        elif persistence_r2 is not None and persistence_r2 >= CHANGE_MIN_PERSISTENCE_R2:
            choose(
                "forecast", "change",
                f"the window's last {last_value!r} alone explains {persistence_r2:.3f} of the "
                f"training targets' variance (at least {CHANGE_MIN_PERSISTENCE_R2}: a slowly "
                "moving series): the network predicts the change from it and adds it back, so "
                "its forecast can leave the range of the training values (a trend)",
            )  # fmt: skip
        else:
            measured = (
                "was not measured (no training windows given)"
                if persistence_r2 is None
                else f"explains only {persistence_r2:.3f} of the training targets' variance "
                f"(under {CHANGE_MIN_PERSISTENCE_R2}: the series swings across its range from "
                "step to step)"
            )
            choose(
                "forecast", "level",
                f"the window's last {last_value!r} {measured}, so the network forecasts the "
                "value itself; train.forecast change forecasts the change from it",
            )  # fmt: skip
    elif params.forecast == "change" and last_value is None:
        raise ValueError(
            "train.forecast change: the data is not a time series whose windows hold its "
            "target as an input (ingest.features), so there is no last value to add a change "
            "to; use train.forecast level (or auto)"
        )
    resolved = params.model_copy(update=chosen)
    return Recipe(TrainParams.model_validate(resolved.model_dump()), tuple(choices))


def resolve_for(params: TrainParams, meta, n_train: int | None = None, train=None) -> Recipe:
    """:func:`resolve` for a prepared data set (its ``meta.json``); ``n_train`` defaults to
    the size of ``train`` (the training split, in memory or sharded), else the one recorded in meta.
    ``train``'s windows measure a time series for ``train.forecast: auto``."""
    from components.model import last_target_input  # torch: imported when needed

    if n_train is None:
        n_train = len(train) if train is not None else int(meta.split_sizes.get("train", 0))
    last = last_target_input(meta)
    r2 = None
    if last is not None and train is not None and len(train):
        r2 = persistence_r2(train.map_x(last.decode), train.y)
    return resolve(
        params, kinds.get(meta.kind), n_train, tuple(meta.input_shape),
        last.column if last is not None else None, r2,
    )  # fmt: skip


def persistence_r2(last, y) -> float | None:
    """R^2 of forecasting each target ``y`` as the window's last value ``last`` (None for a
    constant target, whose variance explains nothing)."""
    y = np.asarray(y, dtype=np.float64)
    total = float(((y - y.mean()) ** 2).sum())
    if total <= 0:
        return None
    return 1.0 - float(((y - np.asarray(last, dtype=np.float64)) ** 2).sum()) / total


def recorded(card, params: TrainParams, meta) -> TrainParams:
    """The train params the network of ``card`` (model.json) was trained with, as the train
    stage recorded them; for a model.json written before the recipe, ``params`` resolved for
    ``meta``. What compress fine-tunes with, so it trains as train did."""
    if card.recipe is None:
        return resolve_for(params, meta).params
    # A recipe recorded before train.forecast existed: every network then forecast the level.
    train = {"forecast": "level", **card.recipe.train}
    try:
        return TrainParams.model_validate(train)
    except ValueError as exc:
        problem = " ".join(str(exc).split())[:300]
        raise ValueError(
            f"model.json's recipe does not hold train params this code reads ({problem}): "
            "re-run the train stage"
        ) from None


def unresolved(params: TrainParams) -> list[str]:
    """The keys still ``auto`` / ``null`` (empty once :func:`resolve` has run)."""
    keys = [k for k in AUTO_KEYS if getattr(params, k) is None]
    if params.model == "auto":
        keys.insert(0, "model")
    keys += [f"augment.{k}" for k in AUGMENT_KEYS if getattr(params.augment, k) is None]
    if params.forecast == "auto":
        keys.append("forecast")
    return keys


def require_resolved(params: TrainParams, where: str) -> None:
    """Refuse train params that still hold ``auto`` values where a network is trained."""
    left = unresolved(params)
    if left:
        raise ValueError(
            f"{where} needs resolved train params, but {', '.join('train.' + k for k in left)} "
            "are still auto: pass them through components.recipe.resolve first"
        )
