"""The input schema is part of the champion: a challenger whose inputs differ is packaged and
recorded, never promoted on its own, and ``make promote`` takes it on purpose.

The comparison itself in memory (components/champion.py); then a table run with a column fewer
through the real gate and the promotion rule; then image runs with other classes through gate,
package (real bentos), promote, the report and a promotion by hand. Nothing is trained: the
models are tiny ONNX files (tests/gate_project.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from components import champion as champ
from components import evaluate, gate, package, promote, report
from components.dataset import ArraySet, DatasetMeta, load_arrays, save_arrays
from components.records import Verdicts
from components.stage import write_json
from components.tasks import REGRESSION
from tests.gate_project import (
    BAD_SEED,
    FEATURES,
    GOOD_SEED,
    PREPROCESS,
    REGRESSION_PARAMS,
    TARGET,
    labelled_split,
    make_regression_onnx,
    project_params,
    regression_meta,
    regression_split,
    write_challenger,
    write_regression_challenger,
    write_regression_split,
    write_test_split,
)
from tests.tiny_models import IMAGE_SHAPE, make_tiny_onnx

# -- the comparison, in memory ---------------------------------------------------------------


def _column(name: str, kind: str = "numeric", categories=None) -> dict:
    return {"name": name, "type": kind} | ({"categories": categories} if categories else {})


def _table(*columns: dict, target: str = TARGET, task: str = "regression", classes=()):
    return champ.InputSchema.of(task, "table", target, classes, (len(columns),), columns)


NUMBERS = (_column("rooms"), _column("area"), _column("age"))
CITY = _column("city", "categorical", ["Oslo", "Paris"])


@pytest.mark.parametrize(
    "after, said",
    [
        (_table(*NUMBERS[:2]), "columns age removed; input shape 3 -> 2; target 'price' unchanged"),
        (_table(*NUMBERS, CITY), "columns city added; input shape 3 -> 4; target 'price'"),
        (_table(NUMBERS[0], NUMBERS[1], _column("age", "categorical", ["old", "new"])),
         "column age numeric -> categorical; target 'price' unchanged"),
        (_table(NUMBERS[1], NUMBERS[0], NUMBERS[2]), "columns reordered;"),
        (_table(*NUMBERS, target="rent"), "target 'price' -> 'rent'"),
        (_table(*NUMBERS, target="price", task="classification", classes=("cheap", "dear")),
         "task regression -> classification; classes cheap, dear added"),
    ],
    ids=["a-column-fewer", "a-column-more", "another-type", "reordered", "target", "task"],
)  # fmt: skip
def test_every_change_a_client_would_see_is_named(after, said):
    assert said in champ.schema_phrase(_table(*NUMBERS), after)


def test_categories_and_classes_are_compared_by_value():
    before = _table(NUMBERS[0], CITY)
    after = _table(NUMBERS[0], _column("city", "categorical", ["Paris", "Rome"]))
    said = champ.schema_changes(before, after)
    assert said == ["column city categories Rome added, Oslo removed"]
    images = champ.InputSchema.of("classification", "image", "", ("a", "b", "c"), IMAGE_SHAPE)
    other = champ.InputSchema.of("classification", "image", "", ("a", "b", "d"), IMAGE_SHAPE)
    assert champ.schema_changes(images, other) == ["classes d added, c removed"]
    assert champ.schema_phrase(images, images) is None


def test_a_refit_on_other_rows_is_no_schema_change():
    """New means and deviations (another training split) change nothing a client sends."""
    refit = {
        **PREPROCESS,
        "columns": [{**c, "mean": 3.0, "std": 7.0} for c in PREPROCESS["columns"]],
    }
    ours = gate.Described.of_meta(regression_meta(10))
    theirs = gate.Described.of_meta(regression_meta(10, preprocess=refit))
    assert ours.preprocess_sha256 != theirs.preprocess_sha256  # another fit ...
    assert champ.schema_phrase(theirs.schema, ours.schema) is None  # ... the same inputs
    assert [c.name for c in ours.schema.columns] == list(FEATURES)


def _series(*names: str) -> DatasetMeta:
    columns = [{"name": n, "type": "numeric", "mean": 0.0, "std": 1.0} for n in names]
    return DatasetMeta(
        class_names=(),
        input_shape=(24, len(names)),
        source="data/external/weather.csv",
        split_sizes={"test": 10},
        kind="sequence",
        task="regression",
        target="temp",
        feature_names=names,
        preprocess={"version": 1, "columns": columns, "features": list(names)},
    )


def test_a_series_asks_its_kind_for_its_input_columns():
    both = gate.Described.of_meta(_series("temp", "humidity")).schema
    fewer = gate.Described.of_meta(_series("temp")).schema
    assert [c.name for c in both.columns] == ["temp", "humidity"]
    assert champ.schema_phrase(both, fewer) == (
        "columns humidity removed; input shape 24x2 -> 24x1; target 'temp' unchanged"
    )
    images = DatasetMeta(("a", "b"), IMAGE_SHAPE, "test", {"test": 4})
    assert gate.Described.of_meta(images).schema.columns is None  # shape and classes say it


def test_a_record_from_before_input_columns_compares_what_it_has():
    old = champ.InputSchema.of("regression", "table", TARGET, (), (3,))  # no columns recorded
    assert champ.schema_phrase(old, _table(*NUMBERS)) is None
    assert champ.schema_changes(old, _table(*NUMBERS[:2])) == ["input shape 3 -> 2"]


def test_a_record_with_the_old_name_image_shape_is_refused_saying_how_to_rename_it(tmp_path):
    from components.stage import StageError
    from tests.conftest import REPO_ROOT

    committed = champ.load_record(REPO_ROOT / "deploy" / "champion.json")  # renamed: it reads
    assert committed.current().input_shape == [1, 28, 28]
    raw = json.loads((REPO_ROOT / "deploy" / "champion.json").read_text())
    run = next(iter(raw["runs"]))
    raw["runs"][run]["image_shape"] = raw["runs"][run].pop("input_shape")
    old = tmp_path / "champion.json"
    old.write_text(json.dumps(raw))
    with pytest.raises(StageError) as refused:
        champ.load_record(old)
    message = str(refused.value)
    assert f"runs.{run}.image_shape is now called 'input_shape'" in message
    assert f"""sed -i 's/"image_shape":/"input_shape":/' {old}""" in message


# -- a table with a column fewer: gated, recorded, not promoted -------------------------------


def _two_column_challenger(params) -> None:
    """The files a run on the table without ``age`` leaves up to compress: its test split and
    meta.json, an exact fp32 and int8 export of ``2 rooms - area + 10``, compress.json and
    evaluate's records (the network answers like its fp32 export)."""
    prepared = Path(params.paths.prepared_dir)
    full = load_arrays(prepared / "test.npz")
    split = ArraySet(np.ascontiguousarray(full.x[:, :2]), full.y)
    save_arrays(split, prepared / "test.npz")
    spec = {**PREPROCESS, "columns": PREPROCESS["columns"][:2], "features": list(FEATURES[:2])}
    meta = regression_meta(
        len(split), input_shape=(2,), feature_names=FEATURES[:2], preprocess=spec
    )
    meta.save(prepared / "meta.json")
    onnx_dir = Path(params.paths.model_dir) / "onnx"
    shutil.rmtree(onnx_dir, ignore_errors=True)
    for variant in ("fp32", "int8"):
        make_regression_onnx(onnx_dir / f"{variant}.onnx", [2.0, -1.0], 10.0)
    measured = gate.measure(onnx_dir / "fp32.onnx", split, (), "regression")
    metrics_dir = Path(params.paths.metrics_dir)
    variants = {
        v: {"size_bytes": (onnx_dir / f"{v}.onnx").stat().st_size, "latency_ms_batch1": 0.02}
        for v in ("fp32", "int8")
    }
    (metrics_dir / "compress.json").write_text(
        json.dumps({"variants": variants, "served_variant": "int8"})
    )
    write_json(metrics_dir / "evaluate.json", evaluate.metrics_record(measured, meta, len(split)))
    verdicts = Verdicts.of(REGRESSION.gates(measured, params.evaluate))
    write_json(metrics_dir / "evaluate_gates.json", verdicts)


def _bento(gate_json: dict, version: str) -> dict:
    """What package would write for the gated model (no bento built: the rule needs none)."""
    sha = gate_json["variants"][gate_json["served_variant"]]["model_sha256"]
    return {
        "tag": f"tiny-regressor:{version}",
        "archive": f"artefacts/tiny-regressor-{version}.bento",
        "served_variant": gate_json["served_variant"],
        "model": f"tiny-regressor:int8-{sha[:12]}",
        "model_version": version,
    }


def test_a_table_with_a_column_fewer_is_recorded_but_not_promoted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = project_params(tmp_path, **{**REGRESSION_PARAMS, "compress.max_accuracy_drop": 0.5})
    write_regression_split(params, regression_split())
    write_regression_challenger(params)
    gate.run(params)
    metrics_dir = Path(params.paths.metrics_dir)
    first = gate.read_gate_json(metrics_dir / "gate.json")
    assert [c["name"] for c in first["input_columns"]] == list(FEATURES)
    path = Path(params.paths.champion_file)
    record = champ.load_record(path)
    champion = promote.run_record(first, _bento(first, "r00000000000a"), tmp_path)
    assert promote.decide(record, champion, first, auto=True).promoted
    champ.save_record(path, record)
    kept = json.loads(path.read_text())["runs"]["r00000000000a"]["input_columns"]
    assert [c["name"] for c in kept] == list(FEATURES)  # the record keeps what clients send

    _two_column_challenger(params)
    result = gate.run(params)  # it passes: its own gates, and no champion to compare with
    expected = "columns age removed; input shape 3 -> 2; target 'price' unchanged"
    assert result.passed and result.baseline.source == "not comparable"
    assert result.baseline.inputs_differ == expected
    assert "not promoted automatically" in result.baseline.note
    written = gate.read_gate_json(metrics_dir / "gate.json")
    assert written["champion"]["inputs_differ"] == expected

    candidate = promote.run_record(written, _bento(written, "r00000000000b"), tmp_path)
    outcome = promote.decide(record, candidate, written, auto=True)
    assert not outcome.promoted and outcome.outcome == "recorded"
    assert outcome.inputs_differ == expected
    assert outcome.reason == (
        f"its inputs differ from champion r00000000000a's ({expected}): packaged and recorded, "
        "not promoted automatically; `make promote RUN=r00000000000b` takes it on purpose"
    )
    assert record.champion == "r00000000000a" and "r00000000000b" in record.runs
    assert record.events[-1].action == "record" and record.events[-1].reason == outcome.reason


def _champion_then_a_better_run(tmp_path: Path):
    """Champion r00000000000a promoted on a table regression, then a better run gated against
    it: the record, the second gate's result and its gate.json."""
    params = project_params(tmp_path, **{**REGRESSION_PARAMS, "compress.max_accuracy_drop": 0.5})
    write_regression_split(params, regression_split())
    write_regression_challenger(params, int8_weight=np.array([2.0, -1.0, 0.5]) * 0.9)
    gate.run(params)
    first = gate.read_gate_json(Path(params.paths.metrics_dir) / "gate.json")
    record = champ.ChampionRecord()
    promote.decide(record, promote.run_record(first, _bento(first, "r00000000000a")), first, True)
    champ.save_record(params.paths.champion_file, record)
    write_regression_challenger(params)  # exact: better
    result = gate.run(params)
    return record, result, gate.read_gate_json(Path(params.paths.metrics_dir) / "gate.json")


def test_a_champion_with_the_same_columns_still_promotes(tmp_path, monkeypatch):
    """The rule refuses only what clients would notice: a better run on the same table wins."""
    monkeypatch.chdir(tmp_path)
    record, result, again = _champion_then_a_better_run(tmp_path)
    assert result.baseline.source == "recorded" and result.baseline.inputs_differ is None
    better = promote.run_record(again, _bento(again, "r00000000000b"))
    assert promote.decide(record, better, again, auto=True).promoted


def test_a_run_packaged_again_keeps_when_and_from_which_commit_it_was_first(tmp_path, monkeypatch):
    """The same bento packaged again (a re-run after a code change elsewhere) is the same run:
    the record keeps its first packaging time, commit and flow run, so a re-run that changes
    nothing else leaves the record in git as it was."""
    monkeypatch.chdir(tmp_path)
    record, _, _ = _champion_then_a_better_run(tmp_path)
    first = record.runs["r00000000000a"].model_copy(
        update={"git_commit": "1" * 40, "prefect_flow_run": "first-run"}
    )
    record.runs["r00000000000a"] = first
    later = {"packaged_at": "2099-01-01T00:00:00Z", "git_commit": "2" * 40,
             "prefect_flow_run": "later"}  # fmt: skip
    again = first.model_copy(update=later)
    gate_json = {"passed": True, "champion": {"run": "r00000000000a"}}
    outcome = promote.decide(record, again, gate_json, auto=True)
    assert outcome.outcome == "already champion"
    assert record.runs["r00000000000a"] == first


def test_a_champion_changed_since_the_gate_is_compared_again_only_for_the_same_model(
    tmp_path, monkeypatch
):
    """The gate compared a run with champion A; A's model packaged again (new service code: a
    new bento, the same model and measurements) became the champion since. The comparison
    holds for it: the run is promoted. A champion that serves another model refuses it."""
    monkeypatch.chdir(tmp_path)
    record, _, compared = _champion_then_a_better_run(tmp_path)
    assert compared["champion"]["run"] == "r00000000000a"
    champion_a = record.runs["r00000000000a"]

    def with_champion(run: champ.RunRecord) -> champ.ChampionRecord:
        changed = record.model_copy(deep=True)
        changed.runs[run.run] = run
        changed.champion = run.run
        return changed

    repackaged = champion_a.model_copy(
        update={"run": "r00000000000c", "bento_tag": "tiny-regressor:r00000000000c"}
    )
    candidate = promote.run_record(compared, _bento(compared, "r00000000000b"))
    outcome = promote.decide(with_champion(repackaged), candidate, compared, auto=True)
    assert outcome.promoted and outcome.champion_before == "r00000000000c"
    assert outcome.reason.endswith(
        "(r00000000000c, the champion since, serves that same model, measured the same)"
    )
    other = repackaged.model_copy(update={"model_sha256": "0" * 64})
    refused = promote.decide(with_champion(other), candidate, compared, auto=True)
    assert not refused.promoted and refused.outcome == "recorded"
    assert refused.reason == (
        "the champion changed to r00000000000c after the gate compared r00000000000b with "
        "r00000000000a: recorded, not promoted (make promote RUN=r00000000000b)"
    )


# -- images with other classes: real bentos, promote.json, the report, make promote ----------


def test_other_classes_are_packaged_not_promoted_and_make_promote_takes_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the project root: package builds under ./build
    params = project_params(tmp_path)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(params.model_dump(mode="json", by_alias=True))
    )
    good_model = make_tiny_onnx(tmp_path / "reference" / "good.onnx", GOOD_SEED)
    split = labelled_split(good_model)
    write_test_split(params, split)
    write_challenger(params, GOOD_SEED)
    gate.run(params)
    package.run(params)
    champion = promote.run(params)
    assert champion.promoted

    # The same images, other class names: the champion's clients would get other labels.
    renamed = ("cat", "dog", "emu")
    meta = DatasetMeta(renamed, IMAGE_SHAPE, "test", {"test": len(split)})
    meta.save(Path(params.paths.prepared_dir) / "meta.json")
    write_challenger(params, BAD_SEED)
    result = gate.run(params)
    assert result.passed and "classifies other data" in result.baseline.note
    package.run(params)
    outcome = promote.run(params)
    changed = "classes cat, dog, emu added, a, b, c removed"
    assert not outcome.promoted and outcome.inputs_differ == changed
    written = json.loads((Path(params.paths.metrics_dir) / "promote.json").read_text())
    assert written["inputs_differ"] == changed and written["champion_after"] == champion.run
    assert f"`make promote RUN={outcome.run}` takes it on purpose" in written["reason"]
    record = champ.load_record(params.paths.champion_file)
    assert record.champion == champion.run and outcome.run in record.runs

    page = report.write_report(params).read_text()
    assert (
        f"Not promoted: its inputs differ from champion {champion.run}&#x27;s ({changed})" in page
    )

    said = promote.promote_by_hand(params.paths.champion_file, outcome.run)
    assert said.startswith(f"champion: {outcome.run}")
    assert f"clients change: {outcome.run} takes other inputs than {champion.run} ({changed})" in (
        said
    )
    record = champ.load_record(params.paths.champion_file)
    assert record.champion == outcome.run and record.events[-1].by == "hand"
    assert changed in record.events[-1].reason
