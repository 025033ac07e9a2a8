"""The tuning flow for real: an Optuna study (SQLite storage) whose trials are DVC experiments
of the real pipeline, run by the real Prefect flow in a fresh git + DVC repository on tiny data;
resuming it, two workers at once, and every kind of bad input refused before any trial."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from components.config import read_params_file
from components.tuning.study import TuneError, check_space
from flows.tune import preflight
from tests.conftest import REPO_ROOT, TINY_CLASSES, TINY_OVERRIDES, make_images
from tests.helpers import flatten, only_variants, project_repo

# Tiny data, tiny space: each trial is a couple of seconds of training.
TINY_SPACE = {
    "train.learning_rate": {"low": 0.003, "high": 0.03, "log": True},
    "train.model": {"choices": ["cnn", "mlp"]},
    "train.hidden_units": {"choices": [[16], [8, 8]]},
}


def _write_tune(params_file: Path, space=None, **values) -> None:
    """Replace the tune section's values (and space) in a params.yaml copy."""
    raw = read_params_file(params_file)
    raw["tune"].update(values)
    if space is not None:
        raw["tune"]["space"] = space
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the key, before any trial (no git, no DVC, no Prefect needed)


@pytest.fixture
def params_copy(tmp_path: Path) -> Path:
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path / "params.yaml"


@pytest.mark.parametrize(
    ("space", "values", "expected"),
    [
        ({"train.nope": {"low": 1, "high": 2}}, {}, "tune.space.train.nope"),
        ({"train.learning_rate": {"low": 0.01, "high": 0.001}}, {}, "inverted range"),
        ({"train.dropout": {"low": 0.2, "high": 0.2}}, {}, "empty or inverted range"),
        ({"train.model": {"choices": []}}, {}, "empty choices"),
        ({"train.model": {"choices": ["cnn", "resnet"]}}, {}, "tune.space.train.model: choice"),
        ({"train.dropout": {"low": 0.0, "high": 1.5}}, {}, "tune.space.train.dropout"),
        ({"orchestrate.retries": {"low": 1, "high": 3}}, {}, "tune.space.orchestrate.retries"),
        (None, {"n_trials": 0}, "tune.n_trials"),
        (None, {"timeout_seconds": 0}, "tune.timeout_seconds"),
        (None, {"sampler": "grid"}, "grid sampler needs choices"),
        (None, {"metric": "test_accuracy"}, "tune.metric"),
        (None, {"trial_overrides": ["evaluate.nope=0"]}, "tune.trial_overrides"),
    ],
)
def test_bad_input_is_refused_before_any_trial(params_copy, space, values, expected):
    _write_tune(params_copy, space, **values)
    with pytest.raises((TuneError, ValueError)) as err:
        preflight(params_copy.parent, [])
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("ingest", "metric", "models", "expected"),
    [
        ({"source": "data/external/houses.csv"}, "val_accuracy", ["cnn"],
         "choice 'cnn' cannot read this data (a table); use mlp"),
        ({"source": "data/external/houses.csv"}, "val_accuracy", ["cnn", "lstm"],
         "choices 'cnn', 'lstm' cannot read this data (a table); use mlp"),
        ({"source": "data/external/load.csv", "kind": "sequence"}, "val_rmse", ["cnn"],
         "choice 'cnn' cannot read this data (a sequence)"),
        ({"source": "data/external/houses.csv", "task": "regression"}, "val_accuracy", None,
         "tune.metric val_accuracy: the data is a regression task"),
    ],
)  # fmt: skip
def test_a_space_or_metric_that_does_not_fit_the_data_is_refused(params_copy, ingest, metric,
                                                                 models, expected):  # fmt: skip
    """Refused when no model of the space can read the data (one that can is searched alone:
    the next test)."""
    raw = yaml.safe_load(params_copy.read_text())
    raw["ingest"].update(ingest)
    raw["tune"]["metric"] = metric
    if models is not None:
        raw["tune"]["space"]["train.model"] = {"choices": models}
    params_copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(TuneError, match=re.escape(expected)):
        preflight(params_copy.parent, [])


def _fitted(params_file: Path, ingest: dict, metric: str, model: str = "cnn", **space):
    from components.config import load_params
    from components.tuning.fits import fit_space

    raw = yaml.safe_load(params_file.read_text())
    raw["ingest"].update(ingest)
    raw["train"]["model"] = model
    raw["tune"]["metric"] = metric
    raw["tune"]["space"].update(space)
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return fit_space(load_params(params_file), params_file.parent)


def test_the_repository_space_is_cut_to_what_a_table_or_a_sequence_can_use(params_copy):
    """A family that cannot read the data is never sampled, nor a key only it (or only images)
    uses; each one left out is said, and the rest of the space is kept as it is."""
    full = read_params_file(params_copy)["tune"]["space"]
    assert {"cnn", "mlp", "lstm", "gru"} <= set(full["train.model"]["choices"])
    assert {"train.channels", "train.rnn_layers", "train.augment.crop_padding"} <= set(full)

    image, notes = _fitted(params_copy, {}, "val_accuracy")
    assert set(image.space) == set(full) and notes == []  # images: every family, every key

    table, notes = _fitted(
        params_copy, {"source": "data/external/houses.csv"}, "val_accuracy", model="mlp"
    )
    assert table.space["train.model"].choices == ("mlp",)
    left_out = {"train.channels", "train.rnn_hidden_size", "train.rnn_layers",
                "train.augment.crop_padding", "train.augment.max_rotation_degrees"}  # fmt: skip
    assert set(table.space) == set(full) - left_out
    assert table.space["train.learning_rate"] == image.space["train.learning_rate"]
    assert notes[0] == (
        "tune.space.train.model: cnn, lstm, gru left out, they cannot read this data "
        "(a table); searching mlp"
    )
    assert "tune.space.train.channels left out: only cnn reads it" in " ".join(notes)
    assert "augment.crop_padding left out: crops, rotations and flips are for images, not a " \
        "table" in " ".join(notes)  # fmt: skip
    assert len(notes) == 1 + len(left_out)

    sequence, notes = _fitted(
        params_copy, {"source": "data/external/load.csv", "kind": "sequence"}, "val_rmse", "gru"
    )
    assert sequence.space["train.model"].choices == ("mlp", "lstm", "gru")
    assert {"train.rnn_hidden_size", "train.rnn_layers"} <= set(sequence.space)
    assert (
        "train.channels" not in sequence.space
        and "train.augment.crop_padding" not in sequence.space
    )


def test_the_step_budget_is_searched_only_while_train_max_epochs_is_left_to_it(params_copy):
    """The repository's space searches train.min_steps, which the recipe turns into epochs for
    the data's size; with train.max_epochs set it sizes nothing, and is left out, saying why."""
    assert "train.min_steps" in read_params_file(params_copy)["tune"]["space"]
    fitted, notes = _fitted(params_copy, {}, "val_accuracy")
    assert "train.min_steps" in fitted.space and notes == []
    raw = yaml.safe_load(params_copy.read_text())
    raw["train"]["max_epochs"] = 8
    params_copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    fitted, notes = _fitted(params_copy, {}, "val_accuracy")
    assert "train.min_steps" not in fitted.space
    assert notes == [
        "tune.space.train.min_steps left out: train.max_epochs is set (8), so the step budget "
        "sizes nothing (set it to null to search the budget)"
    ]


def test_a_choice_that_is_not_a_family_is_kept_and_stands_for_any_that_fits(params_copy):
    """``auto`` (the train stage picks the family) is never left out, and counts as every
    family that reads the data: only the keys of families that cannot are left out."""
    table, notes = _fitted(
        params_copy, {"source": "data/external/houses.csv"}, "val_accuracy",
        **{"train.model": {"choices": ["auto", "cnn"]}},
    )  # fmt: skip
    assert table.space["train.model"].choices == ("auto",)
    assert "train.channels" not in table.space and "train.hidden_units" in table.space
    assert "cnn left out, it cannot read this data (a table); searching auto" in notes[0]
    # the defaults' model cannot read a table: their trial will fail, and the flow says so first
    assert any(n.startswith("train.model cnn (params.yaml) cannot read this data") for n in notes)


# ---------------------------------------------------------------------------------------------
# The budget (make tune BUDGET=10m)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("600", 600), ("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("2.5m", 150),
     (" 10M ", 600), (45, 45)],
)  # fmt: skip
def test_a_budget_is_seconds_or_a_number_with_h_m_or_s(text, seconds):
    from components.tuning.budget import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10x", "ten", "m", "-5", "0", "0s", "", "30m1h", "1m1m", "1d"])
def test_a_budget_that_is_not_a_duration_is_refused_naming_the_accepted_forms(text):
    from components.tuning.budget import BudgetError, parse_duration

    with pytest.raises(BudgetError) as err:
        parse_duration(text)
    message = str(err.value)
    assert message.startswith(f"BUDGET {text!r}")
    assert "90s, 10m, 1h" in message or "more than 0" in message


def test_a_budget_lifts_the_trial_count_unless_the_run_gives_one():
    from components.tuning.budget import budget_for, format_duration
    from flows.tune import count_given

    plain = budget_for(1800, 10, None, False)
    assert (plain.seconds, plain.max_trials) == (1800, 10)
    timed = budget_for(1800, 10, "10m", count_given(["tune.workers=2"]))
    assert (timed.seconds, timed.max_trials) == (600, None)
    assert timed.describe() == "10m of trials (BUDGET=10m), no trial limit"
    capped = budget_for(1800, 3, "90s", count_given(["tune.n_trials=3"]))
    assert (capped.seconds, capped.max_trials) == (90, 3)
    assert capped.describe() == "1m30s of trials (BUDGET=90s), at most 3 trials"
    assert [format_duration(s) for s in (4.2, 95, 3600, 3630)] == ["4s", "1m35s", "1h", "1h0m30s"]


def test_no_trial_runs_past_the_budget_and_none_starts_that_could_not_finish():
    from components.tuning.budget import Budget, Clock

    now = [1000.0]
    clock = Clock(Budget(100, None, "BUDGET=100"), trial_timeout=60, now=lambda: now[0])
    assert clock.why_not_start(started=0, quickest=None) is None
    assert clock.timeout() == (60, "tune.trial_timeout_seconds")
    now[0] += 70  # 30 s left: a trial may start, killed at the budget's end
    assert clock.timeout() == (30, "the budget (BUDGET=100) ran out")
    assert clock.why_not_start(started=1, quickest=None) is None
    assert clock.why_not_start(started=1, quickest=25) is None
    assert "the quickest finished trial took 40s" in clock.why_not_start(1, quickest=40)
    now[0] += 30
    assert clock.why_not_start(2, None) == "the budget of 1m40s is spent"
    assert clock.timeout()[0] == 0 and clock.elapsed() == 100

    counted = Clock(Budget(100, 2, "tune.timeout_seconds, tune.n_trials"), 60, lambda: 0.0)
    assert counted.why_not_start(1, None) is None
    assert counted.why_not_start(2, None) == "2 trial(s) started, the limit"


def test_make_tune_passes_the_budget_and_a_bad_one_stops_before_prefect(capsys):
    from flows.tune import main

    # --no-print-directory: under `make test` this make is nested, and would end its output
    # with "make[1]: Leaving directory ...".
    shown = subprocess.run(
        ["make", "--no-print-directory", "-n", "tune", "BUDGET=10m", "N_TRIALS=3", "WORKERS=2"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.splitlines()[-1]  # fmt: skip
    assert "-m flows.tune --budget '10m' --n-trials '3' --workers 2" in shown
    assert (
        "--budget"
        not in subprocess.run(
            ["make", "--no-print-directory", "-n", "tune"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert main(["--budget", "10x", "--root", str(REPO_ROOT)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Tuning not started: BUDGET '10x' is not a duration: use seconds")
    assert len(err.strip().splitlines()) == 1


def test_set_takes_tune_keys_only_and_validates_them(params_copy):
    with pytest.raises(TuneError, match="tune.\\* keys"):
        preflight(params_copy.parent, ["train.max_epochs=3"])
    with pytest.raises(ValueError, match="tune.n_trials"):
        preflight(params_copy.parent, ["tune.n_trials=0"])


def test_the_repository_space_is_valid():
    from components.config import load_params

    params = load_params(REPO_ROOT / "params.yaml")
    check_space(params.tune, REPO_ROOT / "params.yaml")
    assert "tune" not in " ".join(
        p
        for s in yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"].values()
        for p in s.get("params", [])
    ), "no stage may depend on the tune section: tuning settings must not re-run stages"


def test_bad_input_from_the_command_line_is_one_line_and_exit_2(params_copy):
    _write_tune(params_copy, {"train.model": {"choices": ["cnn", "resnet"]}})
    result = subprocess.run(
        [sys.executable, "-m", "flows.tune", "--root", str(params_copy.parent)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("Tuning not started: tune.space.train.model")
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# The study and its page, without DVC: trials told by hand


def test_a_study_resumes_draws_list_choices_and_reports_its_best_trial(tmp_path):
    import base64

    import optuna

    from components.config import TuneParams, load_params
    from components.tuning.page import png_img, summarise, trials_table, write_report
    from components.tuning.study import (
        ask,
        best_overrides,
        grid_exhausted,
        open_study,
        shared_sampler,
        storage_url,
    )  # fmt: skip

    space = {k: v for k, v in TINY_SPACE.items() if "choices" in v}
    raw = load_params(REPO_ROOT / "params.yaml").tune.model_dump(mode="json")
    tune = TuneParams.model_validate(
        {**raw, "space": space, "sampler": "grid", "study_name": "by-hand", "storage": ""}
    )
    url = storage_url(tmp_path, tune)
    assert url == f"sqlite:///{tmp_path / 'build' / 'tune' / 'optuna.db'}"
    open_study(url, tune, create=True)
    key = shared_sampler(url, tune, offset=0)
    drawn = []
    for value in (0.5, 0.9, 0.7, 0.6):  # the grid has 4 points
        study, trial, values = ask(url, tune, key)
        assert values["train.hidden_units"] in ([16], [8, 8])  # lists, not their JSON text
        trial.set_user_attr("experiment", f"by-hand-t{trial.number}")
        with contextlib.suppress(RuntimeError):  # the grid sampler's "grid exhausted"
            study.tell(trial, value)
        compact = json.dumps(values["train.hidden_units"], separators=(",", ":"))
        drawn.append((values["train.model"], compact))
    assert len(set(drawn)) == 4 and grid_exhausted(key, study)

    study = open_study(url, tune)  # resumed from storage
    best = study.best_trial
    assert best.value == 0.9 and tune.metric == "val_accuracy"
    model, hidden = drawn[1]
    # as `dvc exp run -S` and `--set` take them: compact JSON, a list as a list
    assert best_overrides(study, tune) == [f'train.model="{model}"', f"train.hidden_units={hidden}"]
    rows = trials_table(study)
    summary = summarise(study, tune, url, 0, 4, rows)
    assert summary["complete"] == 4 and summary["best_experiment"] == "by-hand-t1"
    page = write_report(tmp_path / "tuning.html", tmp_path / "tuning", summary, rows, study, tune)
    assert "data:image/png;base64," in page.read_text() and "by-hand-t3" in page.read_text()
    assert json.loads((tmp_path / "tuning" / "summary.json").read_text())["importance"]
    from components.tuning.page import format_summary

    # 4 trials rank noise as much as the params: the summary says so beside the figures
    assert "importance (4 finished trials: too few to rely on): " in format_summary(summary, page)
    assert json.loads((tmp_path / "tuning" / "trials.json").read_text())[1]["value"] == 0.9

    from matplotlib import pyplot as plt

    img = png_img(plt.subplots()[0], alt="a <plot>")
    assert img.startswith('<img class="plot" alt="a &lt;plot&gt;" src="data:image/png;base64,')
    assert base64.b64decode(img.split("base64,")[1].rstrip('">')).startswith(b"\x89PNG")
    assert optuna.trial.TrialState.RUNNING not in {t.state for t in study.trials}


def _hand_study(tmp_path: Path, space: dict, name: str):
    from components.config import TuneParams, load_params
    from components.tuning.study import open_study, shared_sampler, storage_url

    raw = load_params(REPO_ROOT / "params.yaml").tune.model_dump(mode="json")
    tune = TuneParams.model_validate({**raw, "space": space, "study_name": name, "storage": ""})
    url = storage_url(tmp_path, tune)
    study = open_study(url, tune, create=True)
    return tune, url, study, shared_sampler(url, tune, offset=0)


def test_equal_values_go_to_the_defaults_then_the_lower_validation_loss():
    """A small validation split saturates (several trials at val_accuracy 1.000): among equal
    values the defaults trial ranks first, then the lower val_loss, for the best params and the
    ensemble alike; the value itself still decides first, and without a loss the earlier trial
    wins."""
    import optuna

    from components.config import TuneParams, load_params
    from components.tuning.study import DEFAULTS_ATTR, best_of, best_overrides, ranked

    raw = load_params(REPO_ROOT / "params.yaml").tune.model_dump(mode="json")
    space = {"train.learning_rate": {"low": 0.001, "high": 0.1, "log": True}}
    tune = TuneParams.model_validate({**raw, "space": space, "metric": "val_accuracy"})
    dist = {"train.learning_rate": optuna.distributions.FloatDistribution(0.001, 0.1, log=True)}
    study = optuna.create_study(direction="maximize")
    for value, loss, lr in [(1.0, 0.30, 0.01), (0.9, 0.01, 0.02), (1.0, 0.05, 0.03),
                            (1.0, None, 0.04)]:  # fmt: skip
        attrs = {} if loss is None else {"val_loss": loss}
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"train.learning_rate": lr}, distributions=dist, user_attrs=attrs
        ))  # fmt: skip
    assert study.best_trial.number == 0  # Optuna: the first of the equal values
    assert [t.number for t in ranked(study, tune)] == [2, 0, 3, 1]
    assert best_of(study, tune).number == 2
    assert best_overrides(study, tune) == ["train.learning_rate=0.03"]

    rmse = TuneParams.model_validate({**raw, "space": space, "metric": "val_rmse"})
    study = optuna.create_study(direction="minimize")
    for value, loss in [(2.0, 0.5), (1.0, 0.9), (1.0, 0.4)]:
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"train.learning_rate": 0.01}, distributions=dist,
            user_attrs={"val_loss": loss},
        ))  # fmt: skip
    assert [t.number for t in ranked(study, rmse)] == [2, 1, 0]

    # the defaults trial keeps its place among equals: nothing on validation says to leave it
    study = optuna.create_study(direction="maximize")
    for value, loss, defaults in [(0.9, 0.1, False), (1.0, 0.2, True), (1.0, 0.1, False)]:
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"train.learning_rate": 0.01}, distributions=dist,
            user_attrs={"val_loss": loss, **({DEFAULTS_ATTR: {}} if defaults else {})},
        ))  # fmt: skip
    assert [t.number for t in ranked(study, tune)] == [1, 2, 0]
    with pytest.raises(ValueError, match="no trial of the study has finished"):
        best_of(optuna.create_study(), tune)


def test_the_best_params_leave_out_the_keys_the_best_model_ignores():
    """A trial records the drawn keys its model does not read (and leaves them out of its
    experiment): they are not best params, printed or written back."""
    import optuna

    from components.config import TuneParams, load_params
    from components.tuning.study import IGNORED_ATTR, best_overrides

    raw = load_params(REPO_ROOT / "params.yaml").tune.model_dump(mode="json")
    space = {"train.model": {"choices": ["mlp", "cnn"]},
             "train.channels": {"choices": [[8, 16], [16, 32]]}}  # fmt: skip
    tune = TuneParams.model_validate({**raw, "space": space, "metric": "val_accuracy"})
    dist = {
        "train.model": optuna.distributions.CategoricalDistribution(["mlp", "cnn"]),
        "train.channels": optuna.distributions.CategoricalDistribution(["[8, 16]", "[16, 32]"]),
    }
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(
        value=0.9, params={"train.model": "mlp", "train.channels": "[16, 32]"},
        distributions=dist, user_attrs={IGNORED_ATTR: ["train.channels"]},
    ))  # fmt: skip
    assert best_overrides(study, tune) == ['train.model="mlp"']
    study.add_trial(optuna.trial.create_trial(
        value=0.95, params={"train.model": "cnn", "train.channels": "[8, 16]"}, distributions=dist
    ))  # fmt: skip
    assert best_overrides(study, tune) == ['train.model="cnn"', "train.channels=[8,16]"]


def test_the_defaults_are_the_first_trial_once_and_keep_what_lies_outside_the_space(tmp_path):
    """params.yaml as it is becomes the study's next trial (never twice for the same params);
    a value outside the space is not set by the trial, and not written back as a best param."""
    import optuna

    from components.tuning.study import (
        DEFAULTS_ATTR,
        ask,
        best_overrides,
        contains,
        defaults_fingerprint,
        enqueue_defaults,
        measured_defaults,
    )  # fmt: skip

    space = {
        **TINY_SPACE,
        "train.learning_rate": {"low": 0.001, "high": 0.01, "log": True},
        "train.hidden_units": {"choices": [[16], [64], [8, 8]]},
    }
    # params.yaml leaves the family and widths to the recipe (auto, null): values no space
    # holds, so its defaults trial leaves them to the recipe too.
    raw = read_params_file(REPO_ROOT / "params.yaml")
    tune0, _, study0, _ = _hand_study(tmp_path, space, "recipe")
    assert enqueue_defaults(study0, tune0, raw)[1] == ["train.model", "train.hidden_units"]
    # Defaults inside the space, set by hand: the trial takes them as they are.
    raw = {**raw, "train": {**raw["train"], "model": "cnn", "hidden_units": [64]}}
    tune, url, study, key = _hand_study(tmp_path, space, "defaults")
    fingerprint, outside = enqueue_defaults(study, tune, raw)
    assert outside == [] and enqueue_defaults(study, tune, raw)[0] == fingerprint
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1  # not twice
    study, trial, values = ask(url, tune, key)
    assert values == {k: raw["train"][k.split(".")[1]] for k in space}  # cnn, 0.002, [64]
    assert trial.user_attrs[DEFAULTS_ATTR] == fingerprint
    assert measured_defaults(study, fingerprint) is None  # not finished yet
    study.tell(trial, 0.5)
    assert measured_defaults(study, fingerprint).number == trial.number
    enqueue_defaults(study, tune, raw)  # measured already: nothing enqueued
    study, trial, _ = ask(url, tune, key)
    assert DEFAULTS_ATTR not in trial.user_attrs

    # Another params.yaml is other defaults; its learning rate lies outside the space.
    changed = {**raw, "train": {**raw["train"], "learning_rate": 0.5}}
    assert defaults_fingerprint(changed) != fingerprint
    tune2, url2, study2, key2 = _hand_study(tmp_path, space, "outside")
    assert enqueue_defaults(study2, tune2, changed)[1] == ["train.learning_rate"]
    study2, trial2, values2 = ask(url2, tune2, key2)
    assert "train.learning_rate" not in values2 and values2["train.model"] == "cnn"
    study2.tell(trial2, 0.9)
    assert best_overrides(study2, tune2) == ['train.model="cnn"', "train.hidden_units=[64]"]

    from components.config import SearchDimension

    steps = SearchDimension(low=4, high=12, step=2)
    assert contains(steps, 10) and not contains(steps, 9) and not contains(steps, 14)
    assert contains(SearchDimension(choices=(0.0, 10.0)), 0) and not contains(
        SearchDimension(choices=(0, 1)), False
    )


def test_the_comparison_reads_the_defaults_trial_and_the_baselines(tmp_path):
    """Choosing on validation (best vs defaults, in the metric's direction); reporting on test
    with the baselines, here the workspace's (no experiment to read them from), said so."""
    import optuna

    from components.records import BaselineFigures, Baselines, write_json
    from components.tuning.compare import compare, format_comparison
    from components.tuning.page import comparison_table

    tune, *_ = _hand_study(tmp_path, TINY_SPACE, "compare")
    study = optuna.create_study(direction="maximize")  # in memory: no heartbeat
    for value in (0.90, 0.95, 0.80):
        trial = study.ask()
        trial.suggest_float("train.learning_rate", 0.003, 0.03, log=True)
        study.tell(trial, value)
    metrics = tmp_path / "metrics"
    figures = {"accuracy": 0.91, "macro_f1": 0.905}
    write_json(metrics / "baselines.json", Baselines(
        network={"accuracy": 0.97, "macro_f1": 0.97},
        baselines={"rbf_svc": BaselineFigures(metrics=figures, fit_seconds=1.0, train_rows=9)},
        best="rbf_svc", lift=0.06,
    ))  # fmt: skip
    result = compare(tmp_path, "metrics", study, tune, study.trials[0], None)
    assert [r["trial"] for r in result["validation"]] == [0, 1]
    assert result["gain_over_defaults"] == pytest.approx(0.05)
    assert result["test"] == [{"label": "baseline rbf_svc", "metrics": figures}]
    assert "baselines: metrics/baselines.json of the last pipeline run" in result["notes"]
    text = "\n".join(format_comparison(result))
    assert "choosing, on the validation split (val_accuracy, higher is better):" in text
    assert re.search(r"defaults \(params.yaml\), trial 0 +0.9000", text)
    assert (
        re.search(r"best, trial 1 +0.9500", text) and "best vs defaults: +0.0500 (better)" in text
    )
    assert re.search(r"baseline rbf_svc +0.9100 +0.9050", text)
    assert "Reporting: test split (never used to choose)" in comparison_table(result)


def test_the_tuning_modules_import_no_private_name_and_make_no_cycle():
    """components/tuning/ and flows/tune.py meet only through public names, one way."""
    import ast

    tuning = sorted((REPO_ROOT / "components" / "tuning").glob("*.py"))
    files = [*tuning, REPO_ROOT / "flows" / "tune.py"]
    graph = {}
    for path in files:
        name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name} imports {private} from {node.module}"
                graph[name].add(node.module)

    def visit(module, seen):
        for dep in graph.get(module, ()):
            assert dep not in seen, f"import cycle: {' -> '.join([*seen, dep])}"
            visit(dep, [*seen, dep])

    for module in graph:
        visit(module, [module])


# ---------------------------------------------------------------------------------------------
# The real flow, on a fresh repository


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    def tiny_study(params_file: Path) -> None:
        _write_tune(params_file, TINY_SPACE, n_trials=3, seed=1)
        only_variants(params_file)  # the final run's compress: two quick variants

    def write_data(external: Path) -> None:
        x, y = make_images(per_class=20)
        np.savez(external / "tiny.npz", x=x, y=y, class_names=np.array(TINY_CLASSES))

    return project_repo(
        tmp_path_factory.mktemp("tune-repo"),
        tmp_path_factory.mktemp("tune-dvc-remote"),
        write_data,
        [*flatten(TINY_OVERRIDES), "ingest.source=data/external/tiny.npz"],
        tiny_study,
    )


def _tune(root: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "flows.tune", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_data_that_fails_validation_stops_the_study_before_any_trial(tmp_path):
    """Ingest and validate run once before the trials: data the gate refuses ends the study
    there, with the stage's reason, and no trial spends the budget on it."""

    def write_data(external: Path) -> None:
        x, y = make_images(per_class=20)
        np.savez(external / "tiny.npz", x=x, y=y, class_names=np.array(TINY_CLASSES))

    def strict(params_file: Path) -> None:
        _write_tune(params_file, TINY_SPACE, n_trials=2, seed=1)

    root = project_repo(
        tmp_path / "repo",
        tmp_path / "remote",
        write_data,
        [*flatten(TINY_OVERRIDES), "ingest.source=data/external/tiny.npz",
         "validate.min_rows_per_class=1000"],
        strict,
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "flows.tune", "--no-final-run"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "the data is not ready for trials, no trial started: validate:" in out, out[-3000:]
    assert "min_rows_per_class" in out
    assert len(_study(root).trials) == 0
    assert not _experiments(root)


def _study(root: Path):
    import optuna

    return optuna.load_study(study_name="digits", storage=f"sqlite:///{root}/build/tune/optuna.db")


def _best(root: Path, study):
    from components.config import load_params
    from components.tuning.study import best_of

    return best_of(study, load_params(root / "params.yaml").tune)


def _experiment_refs(root: Path) -> list[str]:
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [r for r in refs if r.count("/") == 4]


def _experiments(root: Path) -> set[str]:
    return {r.rsplit("/", 1)[1] for r in _experiment_refs(root)}


def _git_show(root: Path, what: str) -> str:
    return subprocess.run(
        ["git", "show", what], cwd=root, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")  # no temporary Prefect server per `flows.tune`
def test_a_study_of_three_trials_leaves_three_experiments_and_a_best_trial(workspace):
    result = _tune(workspace, "--no-final-run")
    out = result.stdout + result.stderr
    study = _study(workspace)
    assert len(study.trials) == 3
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert {f"digits-t{i}" for i in range(3)} <= _experiments(workspace)
    assert "best trial:" in out and "dvc exp apply digits-t" in out
    assert "a trial's task failed" not in out  # each finished task's own state was read
    # ingest and validate ran once, in the workspace, not in every trial's copy
    assert "data: ingest, validate ran once here; every trial reuses them" in out
    staged = subprocess.run(
        ["git", "diff", "--cached", "--name-only"], cwd=workspace, capture_output=True, text=True
    ).stdout.split()
    assert "metrics/validation.json" in staged  # what a trial's copy needs to skip validate
    # the first trial measured the defaults: the workspace's params.yaml, no value drawn
    defaults = study.trials[0]
    assert "defaults" in defaults.user_attrs and "the first trial measures the defaults" in out
    # (train.model is auto in params.yaml: no space choice, so the recipe picks it, cnn here)
    assert defaults.params == {"train.learning_rate": 0.01, "train.hidden_units": "[16]"}
    assert "defaults" not in study.trials[1].user_attrs
    # compared on validation; on test the defaults and the best trial's experiments (no final
    # run), and no baselines: trials fit none, and this workspace has no pipeline run yet
    assert "Compared with the defaults and the baselines" in out
    assert re.search(r"defaults \(params.yaml\), trial 0 +\d\.\d{4}", out)
    assert re.search(r"defaults, trial 0 +\d\.\d{4} +\d\.\d{4}", out)
    best = _best(workspace, study)  # the flow's ranking: ties go to the lower val_loss
    assert re.search(rf"best trial {best.number} +\d\.\d{{4}}", out)
    assert "note: no classical baselines to compare with" in out
    assert "budget: 30m of trials (tune.timeout_seconds, tune.n_trials), at most 3 trials" in out
    # every trial ran through the train stage's pruning callback (env reached `--temp`), unless
    # DVC's run-cache restored an identical trial
    assert any(t.intermediate_values for t in study.trials)
    # the objective is the validation metric the experiment recorded
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"],
        cwd=workspace,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert best.user_attrs["experiment"] in shown
    ref = next(
        r
        for r in subprocess.run(
            ["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
            cwd=workspace,
            capture_output=True,
            text=True,
        ).stdout.split()
        if r.endswith("/" + best.user_attrs["experiment"])
    )
    train = json.loads(
        subprocess.run(
            ["git", "show", f"{ref}:metrics/train.json"],
            cwd=workspace,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert best.value == pytest.approx(train["best_val_accuracy"])
    assert best.user_attrs["val_loss"] == pytest.approx(train["best_val_loss"])  # the tie-break
    page = (workspace / "reports" / "tuning.html").read_text()
    assert "data:image/png;base64," in page and "digits-t2" in page
    assert len(json.loads((workspace / "reports" / "tuning" / "trials.json").read_text())) == 3
    ensemble = json.loads((workspace / "reports" / "tuning" / "ensemble.json").read_text())
    assert len(ensemble["members"]) == 3 and ensemble["onnx_check_max_prob_diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_reopened_by_two_workers_the_study_resumes_and_its_best_params_are_released(workspace):
    """One more `make tune WORKERS=2` on the same study: it resumes (trials are added, not
    started over), both workers run trials at the same time without a lock error or a lost
    trial, and the best params then go through the whole pipeline and its gates."""
    before = len(_study(workspace).trials)
    assert before >= 3
    result = _tune(
        workspace, "--no-ensemble", "--workers", "2", "--budget", "10m", "--n-trials", "2"
    )
    out = result.stdout + result.stderr
    assert "Unable to acquire lock" not in out and "is busy" not in out
    assert "a trial's task failed" not in out
    assert "data: ingest and validate up to date; every trial reuses them" in out
    # BUDGET=10m with a count given too: both limits; the final run is said to come after
    assert "budget: 10m of trials (BUDGET=10m), at most 2 trials; then the final run" in out
    assert "trials stopped after" in out and "2 trial(s) started, the limit" in out
    assert "the defaults (params.yaml as it is) were measured in trial 0" in out  # not again
    study = _study(workspace)
    new = study.trials[before:]
    # Finished, none lost; with 3 trials done the median rule may prune one (it then leaves
    # no experiment: its train stage stopped without a model).
    assert len(new) == 2 and all(t.state.name in ("COMPLETE", "PRUNED") for t in new), [
        (t.number, t.state.name, t.user_attrs) for t in new
    ]
    done = {f"digits-t{t.number}" for t in new if t.state.name == "COMPLETE"}
    assert done <= _experiments(workspace)
    starts = sorted(t.datetime_start for t in new)
    ends = sorted(t.datetime_complete for t in new)
    assert starts[1] < ends[0]  # they did run at the same time

    assert "Pipeline summary" in out and "gate before packaging: PASS" in out
    params = read_params_file(workspace / "params.yaml")
    best = _best(workspace, study)
    for key, value in best.params.items():
        section, name = key.split(".")
        expected = json.loads(value) if isinstance(value, str) and value[:1] == "[" else value
        assert params[section][name] == expected  # written back to params.yaml
    assert params["evaluate"]["min_accuracy"] == TINY_OVERRIDES["evaluate"]["min_accuracy"]
    assert (workspace / "artefacts" / "bento.json").is_file()
    assert not any("defaults" in t.user_attrs for t in new)
    # the final run released the best trial's own model: DVC found train up to date with it
    assert "final run's model: the best trial's, not trained again" in out, out[-3000:]
    assert "final run model: the best trial's, not trained again" in out  # in the summary too
    ref = next(
        r for r in _experiment_refs(workspace) if r.endswith("/" + best.user_attrs["experiment"])
    )
    trial_lock = yaml.safe_load(_git_show(workspace, f"{ref}:dvc.lock"))
    final_lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert final_lock["stages"]["train"] == trial_lock["stages"]["train"]
    assert "train skipped" in out and "evaluate ran" in out

    # the comparison: validation chose, the final run's test metrics beside the defaults
    # trial's and the baselines the final run's evaluate fitted
    assert re.search(r"defaults \(params.yaml\), trial 0 +\d\.\d{4}", out)
    assert re.search(rf"best, trial {best.number} +\d\.\d{{4}}", out)
    assert re.search(r"final run: network \(best params\) +\d\.\d{4} +\d\.\d{4}", out)
    served = json.loads((workspace / "metrics" / "gate.json").read_text())["served_variant"]
    assert re.search(rf"final run: served {served} \(gated\) +\d\.\d{{4}} +\d\.\d{{4}}", out)
    baselines = json.loads((workspace / "metrics" / "baselines.json").read_text())["baselines"]
    for name, figures in baselines.items():
        assert re.search(rf"baseline {name} +{figures['metrics']['accuracy']:.4f}", out)
    assert re.search(r"time: trials [\dhms]+, final run [\dhms]+", out)
    page = (workspace / "reports" / "tuning.html").read_text()
    assert "Compared with the defaults and the baselines" in page and "final run: served" in page
    summary = json.loads((workspace / "reports" / "tuning" / "summary.json").read_text())
    assert summary["comparison"]["test_keys"] == ["accuracy", "macro_f1"]


def test_an_unpromising_trial_is_pruned_by_the_real_train_stage(tiny_params, tmp_path, monkeypatch):
    """The pruning callback in a real Lightning fit: earlier trials reported a far lower
    val_loss at every epoch, so the median rule stops this one after its first epoch."""
    import optuna

    from components import ingest, train
    from components.stage import StageError
    from components.trial import (
        ENV_METRIC,
        ENV_PRUNER,
        ENV_STORAGE,
        ENV_STUDY,
        ENV_TRIAL_ID,
        PRUNED_MARK,
        open_storage,
    )  # fmt: skip

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(
        study_name="prune-me",
        storage=open_storage(url),
        direction="minimize",
    )
    for _ in range(2):
        done = study.ask()
        for epoch in (1, 2, 3):
            done.report(1e-6, step=epoch)
        study.tell(done, 1e-6)
    trial = study.ask()
    monkeypatch.setenv(ENV_STORAGE, url)
    monkeypatch.setenv(ENV_STUDY, "prune-me")
    monkeypatch.setenv(ENV_TRIAL_ID, str(trial._trial_id))
    monkeypatch.setenv(ENV_METRIC, "val_loss")
    pruning = {"enabled": True, "startup_trials": 1, "warmup_epochs": 0}
    monkeypatch.setenv(ENV_PRUNER, json.dumps(pruning))

    ingest.run(tiny_params)
    with pytest.raises(StageError, match=f"{PRUNED_MARK} after epoch 1"):
        train.run(tiny_params)
    assert not (Path(tiny_params.paths.model_dir) / "model.pt").exists()  # no half-trained model
    reported = optuna.load_study(study_name="prune-me", storage=open_storage(url)).trials[-1]
    assert list(reported.intermediate_values) == [1]
