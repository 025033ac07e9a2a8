"""Champion and challenger: gate -> package -> promote on real bentos, then rollback and serve.

The story (one module fixture): a weak first run becomes the champion; a better challenger is
promoted; a worse one is refused at the gate, before packaging, and the champion is untouched.
Then the champion is rolled back by hand and its bento answers over HTTP again. The models are
tiny ONNX classifiers (tests/gate_project.py), so nothing is trained.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from components import champion as champ
from components import gate, package, promote
from components.config import Params
from components.stage import StageError
from tests.conftest import REPO_ROOT
from tests.gate_project import (
    BAD_SEED,
    GOOD_SEED,
    REGRESSION_PARAMS,
    TARGET,
    WEIGHT,
    labelled_split,
    project_params,
    regression_split,
    write_challenger,
    write_regression_challenger,
    write_regression_split,
    write_test_split,
)
from tests.helpers import serving
from tests.tiny_models import CLASS_NAMES, make_tiny_onnx

WORSE_SEED = 2


@dataclass(frozen=True)
class Story:
    root: Path
    params: Params
    weak: promote.PromoteResult  # the first champion
    good: promote.PromoteResult  # the better challenger, promoted
    after_weak: dict  # champion.json after each step
    after_good: dict
    refused: str  # the gate's reason for the worse challenger
    record_before_refusal: bytes
    record_after_refusal: bytes
    bento_before_refusal: bytes
    bento_after_refusal: bytes
    weak_tag: str
    good_tag: str


def _record(params: Params) -> dict:
    return json.loads(Path(params.paths.champion_file).read_text())


def _challenge(params: Params, seed: int) -> promote.PromoteResult:
    """One pipeline run from compress on: gate, package, promote (as DVC would run them)."""
    write_challenger(params, seed)
    gate.run(params)
    package.run(params)
    return promote.run(params)


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> Story:
    root = tmp_path_factory.mktemp("promote")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the project root: package stages under ./build, the CLI reads params
        params = project_params(root)
        (root / "params.yaml").write_text(
            yaml.safe_dump(params.model_dump(mode="json", by_alias=True))
        )
        good_model = make_tiny_onnx(root / "reference" / "good.onnx", GOOD_SEED)
        write_test_split(params, labelled_split(good_model))
        bento_json = Path(params.paths.artefacts_dir) / "bento.json"

        weak = _challenge(params, BAD_SEED)
        after_weak = _record(params)
        weak_tag = after_weak["runs"][weak.run]["bento_tag"]
        # What DVC's cache would hold: the archive, by its MD5 (package drops old archives).
        run = after_weak["runs"][weak.run]
        cached = root / ".dvc" / "cache" / "files" / "md5" / run["archive_md5"][:2]
        cached.mkdir(parents=True)
        shutil.copyfile(root / run["archive"], cached / run["archive_md5"][2:])

        good = _challenge(params, GOOD_SEED)
        after_good = _record(params)

        record_before = Path(params.paths.champion_file).read_bytes()
        bento_before = bento_json.read_bytes()
        write_challenger(params, WORSE_SEED)
        with pytest.raises(StageError) as refused:
            gate.run(params)  # the flow stops here: package and promote never run
        yield Story(
            root=root,
            params=params,
            weak=weak,
            good=good,
            after_weak=after_weak,
            after_good=after_good,
            refused=str(refused.value),
            record_before_refusal=record_before,
            record_after_refusal=Path(params.paths.champion_file).read_bytes(),
            bento_before_refusal=bento_before,
            bento_after_refusal=bento_json.read_bytes(),
            weak_tag=weak_tag,
            good_tag=after_good["runs"][good.run]["bento_tag"],
        )


# -- the pipeline's promotions ---------------------------------------------------------------


def test_the_first_run_becomes_the_champion(story):
    record = story.after_weak
    assert story.weak.promoted and story.weak.outcome == "promoted"
    assert "no champion yet" in story.weak.reason
    assert record["format"] == 1
    assert record["champion"] == story.weak.run and record["lineage"] == [story.weak.run]
    run = record["runs"][story.weak.run]
    assert run["bento_tag"] == story.weak_tag and ":latest" not in run["bento_tag"]
    assert run["served_variant"] == "int8" and run["class_names"] == list(CLASS_NAMES)
    assert len(run["test_split"]["sha256"]) == 64 and run["test_split"]["examples"] == 36
    assert 0 < run["metrics"]["accuracy"] < 0.9
    assert record["events"][0] | {"at": None} == {
        "at": None,
        "action": "promote",
        "run": story.weak.run,
        "previous": None,
        "by": "pipeline",
        "reason": "passed every gate; no champion yet: the first challenger passes by definition",
    }


def test_a_better_challenger_is_promoted(story):
    record = story.after_good
    assert story.good.promoted and story.good.champion_before == story.weak.run
    assert record["champion"] == story.good.run
    assert record["lineage"] == [story.weak.run, story.good.run]
    assert record["runs"][story.good.run]["metrics"]["accuracy"] == 1.0
    assert f"vs champion {story.weak.run}" in story.good.reason
    written = json.loads((Path(story.params.paths.metrics_dir) / "promote.json").read_text())
    assert written["promoted"] and written["champion_after"] == story.good.run


def test_a_worse_challenger_is_refused_and_the_champion_untouched(story):
    assert f"below champion {story.good.run} 1.0000" in story.refused
    assert story.record_after_refusal == story.record_before_refusal
    assert story.bento_after_refusal == story.bento_before_refusal  # never packaged
    gate_json = json.loads((Path(story.params.paths.metrics_dir) / "gate.json").read_text())
    assert not gate_json["passed"] and gate_json["champion"]["run"] == story.good.run


def test_packaging_the_same_model_again_is_the_same_run(story, tmp_path):
    record = champ.load_record(story.params.paths.champion_file)
    again = record.model_copy(deep=True)
    gate_json = {
        "passed": True,
        "failed": [],
        "champion": {"run": again.champion},
        "served_variant": "int8",
        "variants": {"int8": {"gates": {}}},
    }
    result = promote.decide(again, again.current(), gate_json, auto=True)
    assert result.outcome == "already champion" and not result.promoted
    assert again.runs[again.champion].packaged_at == record.current().packaged_at


def test_a_run_rolled_back_by_hand_is_not_promoted_again_by_the_pipeline(story, tmp_path):
    path = tmp_path / "champion.json"
    shutil.copyfile(story.params.paths.champion_file, path)
    promote.rollback(path, story.root)  # good -> weak
    record = champ.load_record(path)
    gate_json = {
        "passed": True,
        "champion": {"run": story.weak.run},
        "served_variant": "int8",
        "variants": {"int8": {"gates": {}}},
    }
    result = promote.decide(record, record.runs[story.good.run], gate_json, auto=True)
    assert not result.promoted and result.outcome == "recorded"
    assert "rolled back by hand" in result.reason and record.champion == story.weak.run
    champ.save_record(path, record)
    promote.promote_by_hand(path, story.good.run)  # a hand brings it back ...
    promote.promote_by_hand(path, story.weak.run)  # ... and another hand moves on
    record = champ.load_record(path)
    result = promote.decide(record, record.runs[story.good.run], gate_json, auto=True)
    assert result.promoted  # no rollback away from it since it was promoted by hand


# -- refusals: the record is never changed by a bad input ------------------------------------


def _isolated(story: Story, tmp_path: Path) -> Params:
    """The story's params with metrics and champion record copied into ``tmp_path``."""
    metrics = tmp_path / "metrics"
    shutil.copytree(story.params.paths.metrics_dir, metrics)
    record = tmp_path / "champion.json"
    shutil.copyfile(story.params.paths.champion_file, record)
    paths = story.params.paths.model_copy(update={"metrics_dir": metrics, "champion_file": record})
    return story.params.model_copy(update={"paths": paths})


def _passing_gate(story: Story, params: Params) -> Path:
    """Turn the copied gate.json (the refused run's) into a pass for the packaged good run."""
    path = Path(params.paths.metrics_dir) / "gate.json"
    data = json.loads(path.read_text())
    data["passed"], data["failed"] = True, []
    data["champion"] = {"run": story.weak.run, "source": "recorded", "note": "", "metrics": None}
    good = story.after_good["runs"][story.good.run]
    data["variants"]["int8"]["model_sha256"] = good["model_sha256"]
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: {**d, "passed": False, "failed": ["accuracy 0.1 < min 0.9"]},
            "failed its gates",
        ),
        (lambda d: {k: v for k, v in d.items() if k != "variants"}, "variants: Field required"),
        (lambda d: {**d, "format": 7}, "format 7, this code reads format 1"),
        (
            lambda d: {
                **d,
                "variants": {"int8": {**d["variants"]["int8"], "model_sha256": "0" * 64}},
            },
            "is not the int8 model the gates judged",
        ),
    ],
    ids=["failed-gate", "old-gate-json", "newer-gate-json", "stale-bento"],
)
def test_promote_refuses_bad_inputs_and_leaves_the_record(story, tmp_path, change, message):
    params = _isolated(story, tmp_path)
    path = _passing_gate(story, params)
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    before = Path(params.paths.champion_file).read_bytes()
    with pytest.raises(StageError, match=message):
        promote.run(params)
    assert Path(params.paths.champion_file).read_bytes() == before


def test_an_unreadable_champion_record_stops_promotion(story, tmp_path):
    params = _isolated(story, tmp_path)
    _passing_gate(story, params)
    Path(params.paths.champion_file).write_text(json.dumps({"champion": "r1"}))
    with pytest.raises(StageError, match="champion record format None"):
        promote.run(params)


def test_without_auto_promotion_a_passing_run_is_only_recorded(story, tmp_path):
    params = _isolated(story, tmp_path)
    _passing_gate(story, params)
    record = champ.load_record(params.paths.champion_file)
    record.champion, record.lineage = story.weak.run, [story.weak.run]
    champ.save_record(params.paths.champion_file, record)
    manual = params.model_copy(
        update={"promote": params.promote.model_copy(update={"auto": False})}
    )
    result = promote.run(manual)
    assert not result.promoted and result.outcome == "recorded"
    assert f"make promote RUN={story.good.run}" in result.reason
    assert champ.load_record(params.paths.champion_file).champion == story.weak.run


# -- by hand ---------------------------------------------------------------------------------


def test_hand_promotion_finds_runs_by_version_tag_or_prefix(story, tmp_path):
    path = tmp_path / "champion.json"
    shutil.copyfile(story.params.paths.champion_file, path)
    assert "is the champion already" in promote.promote_by_hand(path, story.good_tag)
    message = promote.promote_by_hand(path, story.weak.run[:8])
    assert message.startswith(f"champion: {story.weak.run}")
    record = champ.load_record(path)
    assert record.lineage == [story.weak.run, story.good.run, story.weak.run]
    assert record.events[-1].by == "hand" and record.events[-1].action == "promote"
    with pytest.raises(StageError, match=r"no packaged run 'rnope'.*known runs: r"):
        promote.promote_by_hand(path, "rnope")
    with pytest.raises(StageError, match="ambiguous"):
        promote.promote_by_hand(path, "r")


def test_rollback_of_the_first_champion_is_refused(story, tmp_path):
    path = tmp_path / "champion.json"
    record = champ.load_record(story.params.paths.champion_file)
    record.lineage = [record.champion]
    champ.save_record(path, record)
    with pytest.raises(StageError, match="first champion: no previous one"):
        promote.rollback(path)
    with pytest.raises(StageError, match="no champion yet"):
        promote.rollback(tmp_path / "none.json")


def _cli(story: Story, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "components.promote", *args],
        cwd=story.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_rollback_restores_the_previous_champion_and_its_bento_serves_again(story):
    import bentoml

    bentoml.bentos.delete(story.weak_tag)  # gone from the store; its archive too (see below)
    assert not (story.root / story.after_weak["runs"][story.weak.run]["archive"]).exists()

    rolled = _cli(story, "rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert rolled.stdout.strip() == (
        f"champion: {story.weak.run} ({story.weak_tag}), rolled back from {story.good.run}"
    )
    record = _record(story.params)
    assert record["champion"] == story.weak.run and record["lineage"] == [story.weak.run]
    assert record["events"][-1]["action"] == "rollback"
    assert "imported bento" in rolled.stderr  # from DVC's cache, by the archive's MD5

    tag = _cli(story, "tag")
    assert tag.returncode == 0, tag.stderr
    assert tag.stdout.strip() == story.weak_tag
    _serve_and_check(story.weak_tag, story.weak.run, story.root)

    back = _cli(story, "promote", story.good.run)
    assert back.returncode == 0 and _record(story.params)["champion"] == story.good.run
    shown = _cli(story, "show").stdout
    assert f"champion: {story.good.run}" in shown and story.weak.run in shown


def test_a_champion_whose_bento_is_gone_everywhere_is_not_rolled_back_to(story, tmp_path):
    import bentoml

    path = tmp_path / "champion.json"
    shutil.copyfile(story.params.paths.champion_file, path)
    record = champ.load_record(path)
    ghost = record.runs[story.weak.run].model_copy(
        update={"run": "rghost0000001", "bento_tag": "x:rghost0000001", "archive_md5": "0" * 32}
    )
    record.runs[ghost.run] = ghost
    record.lineage = [ghost.run, record.champion]
    champ.save_record(path, record)
    before = path.read_bytes()
    with pytest.raises(StageError, match=r"not in the BentoML store.*dvc pull artefacts"):
        promote.rollback(path, story.root)
    assert path.read_bytes() == before
    assert bentoml.bentos.get(story.good_tag)  # the champion's own bento is still there


def test_make_serve_gets_the_champion_even_when_the_store_lost_it(story):
    import bentoml

    bentoml.bentos.delete(story.good_tag)
    tag = _cli(story, "tag")  # imports the archive that package left in artefacts/
    assert tag.returncode == 0, tag.stderr
    assert tag.stdout.strip() == story.good_tag
    assert bentoml.bentos.get(story.good_tag)


def _serve_and_check(tag: str, version: str, cwd: Path) -> None:
    """`bentoml serve TAG` on a free loopback port: /info names the version, /predict answers."""
    with serving(tag, cwd) as server:
        info = httpx.post(f"{server.url}/info", json={}, timeout=10).json()
        assert info["model_version"] == version
        image = np.zeros((8, 8)).tolist()
        answer = httpx.post(f"{server.url}/predict", json={"image": image}, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == version


def test_the_stage_graph_gates_before_packaging_and_keeps_the_record_out_of_dvc():
    """What the DVC semantics above rest on, read from dvc.yaml itself."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert "${paths.metrics_dir}/gate.json" in stages["package"]["deps"]  # no bento before
    assert "${paths.metrics_dir}/gate.json" in stages["promote"]["deps"]
    assert "${paths.metrics_dir}/promote.json" in stages["report"]["deps"]
    for name, stage in stages.items():
        declared = [*stage.get("deps", []), *stage.get("params", [])]
        for kind in ("outs", "metrics", "plots"):
            declared += [next(iter(o)) if isinstance(o, dict) else o for o in stage.get(kind, [])]
        # The record's path as a param is fine (moving it re-runs); the file itself is not.
        assert not any("champion.json" in str(d) or "champion_file}" in str(d) for d in declared), (
            name
        )
    for stage, out in (("gate", "gate.json"), ("promote", "promote.json")):
        declared = [o for o in stages[stage]["outs"] if isinstance(o, dict)]  # plain outs now
        (entry,) = [m for m in declared if str(next(iter(m))).endswith(out)]
        assert next(iter(entry.values())) == {"cache": False, "persist": True}  # no run-cache


def test_on_a_changed_test_split_the_champion_is_measured_again_from_its_bento(story, tmp_path):
    params = _isolated(story, tmp_path)
    paths = params.paths.model_copy(
        update={"prepared_dir": tmp_path / "prepared", "model_dir": tmp_path / "models"}
    )
    params = params.model_copy(update={"paths": paths})
    good_model = story.root / "reference" / "good.onnx"
    write_test_split(params, labelled_split(good_model, seed=5))  # new images, same classes
    record = champ.load_record(params.paths.champion_file)
    record.champion, record.lineage = story.good.run, [story.weak.run, story.good.run]
    champ.save_record(params.paths.champion_file, record)
    write_challenger(params, WORSE_SEED)
    with pytest.raises(StageError, match=f"below champion {story.good.run} 1.0000"):
        gate.run(params)
    written = json.loads((Path(params.paths.metrics_dir) / "gate.json").read_text())
    assert written["champion"]["source"] == "re-evaluated"
    assert "measured again on this test split" in written["champion"]["note"]
    assert written["champion"]["metrics"] == {"accuracy": 1.0, "macro_f1": 1.0}


# -- regression: the record keeps the task and R^2, and the next run is gated against it -----


def test_a_regression_run_is_recorded_with_its_task_and_the_next_is_gated_on_r2(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    tolerant = {**REGRESSION_PARAMS, "compress.max_accuracy_drop": 0.5}
    params = project_params(tmp_path, **tolerant)
    write_regression_split(params, regression_split())
    write_regression_challenger(params, int8_weight=WEIGHT * 0.98)
    gate.run(params)
    gate_json = gate.read_gate_json(Path(params.paths.metrics_dir) / "gate.json")
    sha = gate_json["variants"]["int8"]["model_sha256"]
    bento = {
        "tag": "tiny-regressor:r00000000000a",
        "archive": "artefacts/tiny-regressor-r00000000000a.bento",  # not built: no MD5
        "served_variant": "int8",
        "model": f"tiny-regressor:int8-{sha[:12]}",
        "model_version": "r00000000000a",
    }
    candidate = promote.run_record(gate_json, bento, tmp_path)
    assert (candidate.task, candidate.kind, candidate.target) == ("regression", "table", TARGET)
    assert candidate.class_names == [] and candidate.input_shape == [3]
    assert candidate.preprocess_sha256 == gate_json["preprocess_sha256"] is not None
    assert set(candidate.metrics) == {"r2", "rmse", "mae", "network_r2", "network_rmse",
                                      "network_mae"}  # fmt: skip
    assert candidate.metrics["r2"] == gate_json["variants"]["int8"]["r2"] > 0.9

    path = Path(params.paths.champion_file)
    record = champ.load_record(path)
    result = promote.decide(record, candidate, gate_json, auto=True)
    assert result.promoted and "no champion yet" in result.reason
    champ.save_record(path, record)
    assert champ.load_record(path).current().task == "regression"
    shown = promote.describe(path)
    assert f"table regression of 'price': R^2 {candidate.metrics['r2']:.4f}  RMSE" in shown

    # A worse challenger on the same split: compared on R^2 with the recorded champion.
    write_regression_challenger(params, int8_weight=WEIGHT * 0.7)
    with pytest.raises(StageError, match=r"R\^2 0\.\d{4} is 0\.\d{4} below champion r00000000000a"):
        gate.run(params)
    written = json.loads((Path(params.paths.metrics_dir) / "gate.json").read_text())
    assert written["champion"]["source"] == "recorded"
    assert written["champion"]["metrics"]["r2"] == pytest.approx(candidate.metrics["r2"])

    # A classifier of images next: the regression champion is not comparable.
    images = labelled_split(make_tiny_onnx(tmp_path / "good.onnx", GOOD_SEED))
    write_test_split(params, images)
    write_challenger(params, GOOD_SEED)
    result = gate.run(params)
    assert result.passed and result.baseline.source == "not comparable"
    assert "is a table regression of 'price'" in result.baseline.note


def test_a_record_from_before_tables_reads_as_image_classifiers(story, tmp_path):
    raw = json.loads(Path(story.params.paths.champion_file).read_text())
    for run in raw["runs"].values():
        for key in ("task", "kind", "target", "preprocess_sha256"):
            run.pop(key, None)
    path = tmp_path / "champion.json"
    path.write_text(json.dumps(raw))
    current = champ.load_record(path).current()
    assert (current.task, current.kind, current.target) == ("classification", "image", "")
    assert current.preprocess_sha256 is None
    assert "accuracy 1.0000  macro F1 1.0000" in promote.describe(path)
