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

from components import kinds
from components.config import TrainParams
from components.families import FAMILIES

MIN_EPOCHS = 10  # a large data set still sees every example this often
MAX_EPOCHS = 500  # a tiny one (one step an epoch) stops here: ~20 ms an epoch, ~10 s
PATIENCE_SHARE = 5  # early stopping waits a fifth of the epochs ...
MIN_PATIENCE = 3  # ... and never fewer than this
ROTATION_DEGREES = 10.0  # small enough for digits and letters, and for photos
CROP_SHARE = 14  # shift up to side/14 pixels (2 for a 28 px image), at least 1
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


def resolve(params: TrainParams, kind, n_train: int, input_shape: tuple[int, ...]) -> Recipe:
    """Train params with every ``auto`` / ``null`` value chosen for this data.

    ``kind`` is a data kind (components/kinds/): its ``auto_model`` and ``augmentable`` say
    what fits it; ``n_train`` is the number of training examples, ``input_shape`` one example's
    shape. (The task changes no choice: the same budget serves classes and values.)"""
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
    resolved = params.model_copy(update=chosen)
    return Recipe(TrainParams.model_validate(resolved.model_dump()), tuple(choices))


def resolve_for(params: TrainParams, meta, n_train: int | None = None) -> Recipe:
    """:func:`resolve` for a prepared data set (its ``meta.json``); ``n_train`` defaults to
    the training split's size recorded there."""
    if n_train is None:
        n_train = int(meta.split_sizes.get("train", 0))
    return resolve(params, kinds.get(meta.kind), n_train, tuple(meta.input_shape))


def recorded(card, params: TrainParams, meta) -> TrainParams:
    """The train params the network of ``card`` (model.json) was trained with, as the train
    stage recorded them; for a model.json written before the recipe, ``params`` resolved for
    ``meta``. What compress fine-tunes with, so it trains as train did."""
    if card.recipe is None:
        return resolve_for(params, meta).params
    try:
        return TrainParams.model_validate(card.recipe.train)
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
    return keys


def require_resolved(params: TrainParams, where: str) -> None:
    """Refuse train params that still hold ``auto`` values where a network is trained."""
    left = unresolved(params)
    if left:
        raise ValueError(
            f"{where} needs resolved train params, but {', '.join('train.' + k for k in left)} "
            "are still auto: pass them through components.recipe.resolve first"
        )
