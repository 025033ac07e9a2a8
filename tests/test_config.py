"""params.yaml, its typed schema and dvc.yaml must agree; overrides behave like `dvc exp run -S`."""

from __future__ import annotations

import difflib
import importlib
import shutil
from pathlib import Path

import pytest
import yaml

from components.config import (
    Params,
    ParamsError,
    load_params,
    parse_params,
    read_params_file,
)
from components.overrides import apply_overrides, check_overrides
from tests.conftest import REPO_ROOT


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def test_repository_params_validate():
    from components import kinds, recipe

    params = load_params(REPO_ROOT / "params.yaml")
    # max_epochs may be left to the recipe (null): the epochs it gives the default data, the
    # MNIST sample's 3,500 training images, must be a real count.
    default_data = (kinds.get("image"), 3500, (1, 28, 28))
    assert recipe.resolve(params.train, *default_data).params.max_epochs >= 1


def test_every_dvc_param_key_exists_in_the_schema():
    raw = read_params_file(REPO_ROOT / "params.yaml")
    for name, stage in _dvc_stages().items():
        for key in stage.get("params", []):
            node = raw
            for part in key.split("."):
                assert part in node, f"stage {name}: params key {key!r} not in params.yaml"
                node = node[part]
            section = key.split(".")[0]
            field = "validate_" if section == "validate" else section
            assert field in Params.model_fields, f"{key!r} has no typed section"


def test_every_stage_runs_its_own_module_and_lists_it_as_a_dep():
    for name, stage in _dvc_stages().items():
        assert stage["cmd"] == f"python -m components.{name}"
        assert f"components/{name}.py" in stage["deps"]
        module = importlib.import_module(f"components.{name}")
        assert callable(module.run), f"components.{name} has no run(params)"


def test_every_templated_path_is_a_paths_key():
    raw = read_params_file(REPO_ROOT / "params.yaml")
    text = (REPO_ROOT / "dvc.yaml").read_text()
    import re

    for key in re.findall(r"\$\{paths\.(\w+)\}", text):
        assert key in raw["paths"], f"dvc.yaml uses ${{paths.{key}}}, not in params.yaml"


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("train", "optimizer", "rmsprop", "train.optimizer"),
        ("train", "max_epochs", 0, "train.max_epochs"),
        ("train", "learning_rate", "fast", "train.learning_rate"),
        ("ingest", "test_fraction", 1.5, "ingest.test_fraction"),
        ("train", "unknown_knob", 1, "train.unknown_knob"),
    ],
)
def test_bad_values_are_named(section, key, value, fragment):
    raw = read_params_file(REPO_ROOT / "params.yaml")
    raw[section][key] = value
    with pytest.raises(ParamsError, match=fragment.replace(".", r"\.")):
        parse_params(raw)


def test_missing_section_is_named():
    raw = read_params_file(REPO_ROOT / "params.yaml")
    del raw["evaluate"]
    with pytest.raises(ParamsError, match="evaluate"):
        parse_params(raw)


@pytest.fixture
def params_copy(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(REPO_ROOT / "params.yaml", path)
    return path


def test_override_is_applied_and_comments_kept(params_copy: Path):
    applied = apply_overrides(["train.max_epochs=2", "train.channels=[8, 8]"], params_copy)
    assert applied == {"train.max_epochs": 2, "train.channels": [8, 8]}
    params = load_params(params_copy)
    assert params.train.max_epochs == 2 and params.train.channels == (8, 8)
    assert "# Every tunable of the pipeline" in params_copy.read_text()


@pytest.mark.parametrize("text", ["1e-7", "0.0000001", "1.0e-07", "1E-7"])
def test_a_small_float_is_written_as_yaml_1_1_and_1_2_both_read_it(params_copy: Path, text):
    """Python and ruamel write 1e-07, a string to PyYAML (YAML 1.1) and a float to DVC (YAML
    1.2): written as 1.0e-07, and read as a float wherever it was written by hand."""
    import yaml
    from ruamel.yaml import YAML

    from components.config import load_yaml

    assert apply_overrides([f"train.learning_rate={text}"], params_copy) == {
        "train.learning_rate": 1e-07
    }
    written = params_copy.read_text()
    assert "learning_rate: 1.0e-07" in written
    assert yaml.safe_load(written)["train"]["learning_rate"] == 1e-07  # any YAML 1.1 reader
    assert YAML(typ="safe").load(written)["train"]["learning_rate"] == 1e-07  # DVC's
    assert load_params(params_copy).train.learning_rate == 1e-07
    by_hand = written.replace("learning_rate: 1.0e-07", "learning_rate: 3e-4")
    assert load_yaml(by_hand)["train"]["learning_rate"] == 3e-4


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.nope=1", "no such parameter"),
        ("nosection.key=1", "no section"),
        ("train.max_epochs=two", "train.max_epochs"),
        ("train", "must look like"),
        ("train=1", "no such parameter"),
    ],
)
def test_bad_override_leaves_params_untouched(params_copy: Path, override: str, fragment: str):
    before = params_copy.read_bytes()
    with pytest.raises(ParamsError, match=fragment):
        check_overrides([override], params_copy)
    with pytest.raises(ParamsError, match=fragment):
        apply_overrides(["train.max_epochs=3", override], params_copy)
    assert params_copy.read_bytes() == before


def test_a_run_of_list_overrides_keeps_params_yaml_readable_and_laid_out(params_copy: Path):
    """Once `[64, 32]` then `[]` for hidden_units garbled the next line (ruamel kept the old
    list's comment): every override must leave a file that reads back as what was applied."""
    before = params_copy.read_text()
    steps = [
        ["train.hidden_units=[64, 32]"],
        ["train.hidden_units=[]", "train.rnn_hidden_size=32"],
        ["train.hidden_units=[8]"],
        ['tune.trial_overrides=["evaluate.min_accuracy=0", "train.seed=3"]'],  # a block list
    ]
    for overrides in steps:
        apply_overrides(overrides, params_copy)
    raw = yaml.safe_load(params_copy.read_text())
    assert raw["train"]["hidden_units"] == [8] and raw["train"]["rnn_hidden_size"] == 32
    assert raw["tune"]["trial_overrides"] == ["evaluate.min_accuracy=0", "train.seed=3"]
    text = params_copy.read_text()
    assert "  hidden_units: [8]  " in text  # inline, as written, with its comment after it
    assert "    - train.seed=3" in text  # the block list keeps its indentation
    assert "channels: null" in text  # null stays null
    diff = difflib.ndiff(before.splitlines(), text.splitlines())
    changed = [line for line in diff if line[:1] in "+-"]
    # 3 values (a line out, a line in each) and the list's items (now 2): no other line moved
    items = len(yaml.safe_load(before)["tune"]["trial_overrides"])
    assert len(changed) <= 6 + items, changed


def test_a_renamed_key_is_named_with_its_new_name():
    raw = read_params_file(REPO_ROOT / "params.yaml")
    raw["evaluate"]["max_regression"] = raw["evaluate"].pop("max_drop_vs_champion")
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    message = str(err.value)
    assert "evaluate.max_regression is now evaluate.max_drop_vs_champion" in message
    assert "evaluate.max_drop_vs_champion: Field required" in message  # and the new one lacks
