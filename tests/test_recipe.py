"""The training recipe (components/recipe.py): what ``auto`` / ``null`` train params become for
the data, that a value set by the user is kept, and that train prints the choices and records
them in model.json, where compress reads them."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from components import ingest, kinds, recipe, train
from components.config import parse_params, read_params_file
from components.model import read_card
from tests.conftest import REPO_ROOT, TINY_CLASSES, make_images, tiny_params_dict

MNIST = ("image", 3500, (1, 28, 28))  # the default run: 5,000 images, 70 % to train


def _default_train(**updates):
    """params.yaml's own train section (its auto values), ``updates`` set."""
    raw = read_params_file(REPO_ROOT / "params.yaml")
    for key, value in updates.items():
        node = raw["train"]
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return parse_params(raw).train


def _resolve(kind: str, n_train: int, shape: tuple, **updates) -> recipe.Recipe:
    return recipe.resolve(_default_train(**updates), kinds.get(kind), n_train, shape)


def _chosen(r: recipe.Recipe) -> set[str]:
    return {line.split(" ", 1)[0] for line in r.choices}


@pytest.mark.parametrize(
    ("kind", "shape", "family"),
    [("image", (1, 28, 28), "cnn"), ("table", (4,), "mlp"), ("sequence", (16, 2), "gru")],
)
def test_each_kind_gets_the_family_built_for_it(kind, shape, family):
    r = _resolve(kind, 500, shape)
    assert r.params.model == family
    assert any(line.startswith(f"train.model {family}: ") for line in r.choices)
    assert recipe.unresolved(r.params) == []  # every auto value chosen


def test_a_plugin_kind_of_rows_gets_the_mlp():
    signals = kinds.get("tests.signal_kind:SignalKind")
    assert recipe.resolve(_default_train(), signals, 60, (32,)).params.model == "mlp"


def test_the_mnist_sample_keeps_its_network_and_gets_the_step_budget():
    """The default run's 3,500 training images (55 steps an epoch) keep the network they had;
    the step budget (min_steps 1000) gives them 19 epochs instead of 10."""
    p = _resolve(*MNIST).params
    assert (p.model, p.channels, p.hidden_units) == ("cnn", (16, 32), (64,))
    steps = math.ceil(3500 / p.batch_size)
    assert p.max_epochs == math.ceil(p.min_steps / steps) == 19
    assert p.early_stopping_patience == 4


def test_a_few_hundred_rows_train_for_more_epochs_to_reach_the_step_budget():
    small, large = _resolve("table", 300, (8,)), _resolve("table", 100_000, (8,))
    steps = math.ceil(300 / small.params.batch_size)
    assert small.params.max_epochs * steps >= small.params.min_steps
    assert small.params.max_epochs > large.params.max_epochs == recipe.MIN_EPOCHS
    assert small.params.early_stopping_patience > large.params.early_stopping_patience
    line = next(c for c in small.choices if c.startswith("train.max_epochs"))
    assert "300 training examples" in line and "optimiser steps" in line
    # A handful of rows is capped: one step an epoch would otherwise mean min_steps epochs.
    tiny = _resolve("table", 12, (8,), min_steps=5000)
    assert tiny.params.max_epochs == recipe.MAX_EPOCHS


def test_explicit_params_win_and_are_not_reported_as_choices():
    r = _resolve(
        "image", 300, (1, 8, 8), model="mlp", max_epochs=5, early_stopping_patience=2,
        hidden_units=[128], **{"augment.crop_padding": 0, "augment.max_rotation_degrees": 0.0},
    )  # fmt: skip
    p = r.params
    assert (p.model, p.max_epochs, p.early_stopping_patience, p.hidden_units) == (
        "mlp", 5, 2, (128,),
    )  # fmt: skip
    assert (p.augment.crop_padding, p.augment.max_rotation_degrees) == (0, 0.0)
    assert _chosen(r) == set()  # an MLP has no channels and no recurrent units to choose


def test_images_are_augmented_by_default_but_never_flipped_and_other_data_not_at_all():
    image = _resolve("image", 3500, (1, 28, 28)).params.augment
    assert image.crop_padding == 2 and image.max_rotation_degrees == 10.0
    assert image.horizontal_flip is False
    table = _resolve("table", 300, (8,))
    assert (table.params.augment.crop_padding, table.params.augment.max_rotation_degrees) == (
        0, 0.0,
    )  # fmt: skip
    assert not any("augment" in c for c in table.choices)
    asked = _resolve("image", 3500, (3, 32, 32), **{"augment.horizontal_flip": True})
    assert asked.params.augment.horizontal_flip is True


@pytest.mark.parametrize("model", ["mlp", "lstm"])
def test_images_read_by_a_dense_or_recurrent_net_are_not_augmented_by_default(model):
    r = _resolve("image", 3500, (1, 28, 28), model=model)
    assert (r.params.augment.crop_padding, r.params.augment.max_rotation_degrees) == (0, 0.0)
    assert any(c.startswith(f"train.augment off: {model} reads each pixel") for c in r.choices)
    asked = _resolve("image", 3500, (1, 28, 28), model=model, **{"augment.crop_padding": 2})
    assert asked.params.augment.crop_padding == 2  # set: kept


@pytest.mark.parametrize(
    ("shape", "channels"),
    [((1, 8, 8), (32, 64)), ((1, 28, 28), (16, 32)), ((3, 32, 32), (16, 32, 64)),
     ((3, 96, 96), (16, 32, 64, 128)), ((1, 2, 2), (32,))],
)  # fmt: skip
def test_the_cnn_is_sized_to_the_image(shape, channels):
    from components.dataset import DatasetMeta
    from components.model import build_model
    from components.train import net_config

    r = _resolve("image", 1000, shape)
    assert r.params.channels == channels
    meta = DatasetMeta(("a", "b"), shape, "x.npz", {"train": 1000, "val": 10, "test": 10})
    build_model(net_config(meta, r.params))  # every block fits the image


def test_unresolved_params_are_refused_where_a_network_is_built():
    from components.dataset import DatasetMeta
    from components.train import net_config

    meta = DatasetMeta(("a", "b"), (1, 8, 8), "x.npz", {"train": 10, "val": 2, "test": 2})
    with pytest.raises(ValueError, match=r"train\.model, train\.max_epochs.*still auto"):
        net_config(meta, _default_train())


def test_a_slowly_moving_series_forecasts_the_change_and_a_swinging_one_the_level():
    """forecast auto: change when the window's last target value explains most of the training
    targets' variance, level when it does not; every other data set forecasts the level
    without a line about it. A value set is kept."""
    seq = kinds.get("sequence")
    slow = recipe.resolve(_default_train(), seq, 258, (16, 1), "close", 0.982)
    assert slow.params.forecast == "change"
    line = next(c for c in slow.choices if c.startswith("train.forecast change: "))
    assert "'close' alone explains 0.982" in line and "leave the range" in line
    swinging = recipe.resolve(_default_train(), seq, 544, (16, 4), "ch0", 0.789)
    assert swinging.params.forecast == "level"
    assert any(c.startswith("train.forecast level: the window's last 'ch0' explains only 0.789")
               for c in swinging.choices)  # fmt: skip
    for kind, shape in (("image", (1, 28, 28)), ("table", (4,))):
        r = _resolve(kind, 500, shape)
        assert r.params.forecast == "level" and "train.forecast" not in _chosen(r)
    npz_sequences = recipe.resolve(_default_train(), seq, 500, (16, 2))  # no target column
    assert npz_sequences.params.forecast == "level"
    kept = recipe.resolve(_default_train(forecast="level"), seq, 258, (16, 1), "close", 0.982)
    assert kept.params.forecast == "level" and "train.forecast" not in _chosen(kept)
    with pytest.raises(ValueError, match="train.forecast change: the data is not a time series"):
        _resolve("table", 500, (4,), forecast="change")
    assert "forecast" in recipe.unresolved(_default_train())


def test_persistence_r2_is_the_share_of_variance_the_last_value_explains():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert recipe.persistence_r2(y, y) == 1.0
    assert recipe.persistence_r2(np.full(4, y.mean()), y) == pytest.approx(0.0)
    assert recipe.persistence_r2(y, np.full(4, 2.0)) is None  # a constant target


def test_the_tuning_space_values_resolve():
    """Every choice and both ends of every range of params.yaml's tune.space, set as a trial
    sets it, still validates and resolves (an explicit train.max_epochs from the space wins)."""
    import copy

    raw = read_params_file(REPO_ROOT / "params.yaml")
    for key, dim in raw["tune"]["space"].items():
        section, *path = key.split(".")  # train.augment.crop_padding: a nested key
        values = dim.get("choices") or [dim["low"], dim["high"]]
        for value in values:
            trial = copy.deepcopy(raw)
            node = trial[section]
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
            params = parse_params(trial)
            r = recipe.resolve(params.train, kinds.get("image"), 3500, (1, 28, 28))
            got = r.params
            for part in path:
                got = getattr(got, part)
            assert got == (tuple(value) if isinstance(value, list) else value), key


# ---------------------------------------------------------------- through the train stage


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The real train stage on tiny images with the recipe's epochs (a small step budget)."""
    root = tmp_path_factory.mktemp("recipe")
    x, y = make_images(per_class=20)
    source = root / "data" / "external" / "tiny.npz"
    source.parent.mkdir(parents=True)
    np.savez(source, x=x, y=y, class_names=np.array(TINY_CLASSES))
    raw = tiny_params_dict(root, str(source))
    raw["train"].update(max_epochs=None, min_steps=12)  # 30 rows, batch 16: 2 steps an epoch
    params = parse_params(raw)
    ingest.run(params)
    logger = logging.getLogger("pipeline.train")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = train.run(params)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return params, result, records


def test_train_prints_every_choice_and_records_it_in_model_json(trained):
    params, result, logged = trained
    card = read_card(params.paths.model_dir)
    assert card.recipe is not None
    choices = card.recipe.choices
    assert [f"recipe: {c}" for c in choices] == [m for m in logged if m.startswith("recipe: ")]
    keys = {c.split(" ", 1)[0] for c in choices}
    assert {"train.model", "train.max_epochs", "train.early_stopping_patience",
            "train.augment.crop_padding", "train.augment.max_rotation_degrees"} <= keys  # fmt: skip
    assert "train.channels" not in keys  # the tiny params set it
    recorded = card.recipe.train
    assert recorded["model"] == card.config["family"] == "cnn"
    assert recorded["max_epochs"] == 10  # min 10 epochs: more than 12 steps' worth
    assert recorded["channels"] == [4, 8] and recorded["augment"]["crop_padding"] == 1
    assert result.epochs_run <= recorded["max_epochs"]


def test_compress_fine_tunes_with_the_recorded_params(trained):
    params, _, _ = trained
    from components.dataset import DatasetMeta, meta_path

    card = read_card(params.paths.model_dir)
    meta = DatasetMeta.load(meta_path(params.paths.prepared_dir))
    fine_tune = recipe.recorded(card, params.train, meta)
    assert recipe.unresolved(fine_tune) == []
    assert fine_tune.model_dump(mode="json") == card.recipe.train
    # A model.json from before the recipe: the same params, resolved for the data again.
    old = card.model_copy(update={"recipe": None})
    assert recipe.recorded(old, params.train, meta) == fine_tune
    # A recipe recorded before train.forecast: the network forecast the level.
    train_before = {k: v for k, v in card.recipe.train.items() if k != "forecast"}
    before = card.model_copy(
        update={"recipe": card.recipe.model_copy(update={"train": train_before})}
    )
    assert recipe.recorded(before, params.train, meta).forecast == "level"


def test_a_recorded_recipe_this_code_cannot_read_is_refused(trained, tmp_path):
    params, _, _ = trained
    path = Path(params.paths.model_dir) / "model.json"
    data = json.loads(path.read_text())
    data["recipe"]["train"]["max_epochs"] = "many"
    (tmp_path / "model.json").write_text(json.dumps(data))
    card = read_card(tmp_path)
    with pytest.raises(ValueError, match="re-run the train stage"):
        recipe.recorded(card, params.train, None)
