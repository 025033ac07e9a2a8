"""Compression on tiny data: every method, a composition, the ONNX checks, the selection
policy and every kind of bad input, with real torch-pruning, Lightning and ONNX Runtime."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components import compress, distill, ingest, prune, train
from components.config import ParamsError, parse_params
from components.dataset import load_images, split_path
from components.finetune import distillation_loss
from components.model import NetConfig, build_model, load_model
from components.stage import StageError
from tests.conftest import TINY_CLASSES, make_images, tiny_params_dict

# Every method once, and compositions: distil -> prune -> quantize, prune -> distil.
ALL_METHODS = {
    "int8": ["quantize_static"],
    "int8_dynamic": ["quantize_dynamic"],
    "pruned": ["prune_structured"],
    "sparse": ["prune_unstructured"],
    "student": ["distil"],
    "student_alone": ["student_alone"],
    "student_pruned_int8": ["distil", "prune_structured", "quantize_static"],
    "pruned_distilled": ["prune_structured", "distil"],
}


def _raw(root: Path, npz: Path) -> dict:
    raw = tiny_params_dict(root, str(npz))
    raw["paths"]["external_dir"] = str(npz.parent)
    c = raw["compress"]
    c["variants"] = copy.deepcopy(ALL_METHODS)
    c["pruning"].update(finetune_epochs=1)
    c["distillation"].update(max_epochs=2)
    return raw


@pytest.fixture(scope="module")
def raw_params(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compress")
    npz = root / "src" / "tiny.npz"
    npz.parent.mkdir()
    x, y = make_images()
    np.savez(npz, x=x, y=y, class_names=np.array(TINY_CLASSES))
    return _raw(root / "run", npz)


@pytest.fixture(scope="module")
def trained(raw_params):
    params = parse_params(raw_params)
    ingest.run(params)
    train.run(params)
    return params


@pytest.fixture(scope="module")
def compressed(trained):
    return trained, compress.run(trained)


def _with(raw: dict, **compress_updates) -> dict:
    raw = copy.deepcopy(raw)
    for key, value in compress_updates.items():
        node = raw["compress"]
        *parents, leaf = key.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return raw


def _int8_weights(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path))
    return [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]


# ---------------------------------------------------------------- every method, composed


def test_every_variant_is_written_checked_and_measured(compressed):
    params, result = compressed
    onnx_dir = Path(params.paths.model_dir) / "onnx"
    assert set(result.variants) == {"fp32", *ALL_METHODS}
    assert sorted(p.name for p in onnx_dir.iterdir()) == sorted(
        f"{n}.onnx" for n in result.variants
    )
    written = json.loads((Path(params.paths.metrics_dir) / "compress.json").read_text())
    for name, v in written["variants"].items():
        assert v["size_bytes"] == (onnx_dir / f"{name}.onnx").stat().st_size
        assert v["latency_ms_batch1"] > 0 and v["latency_ms_batch64"] > 0
        assert 0 <= v["accuracy"] <= 1 and 0 <= v["macro_f1"] <= 1
        assert v["accuracy_drop"] == pytest.approx(
            written["variants"]["fp32"]["accuracy"] - v["accuracy"], abs=1e-6
        )
        assert v["onnx_check"]["value"] is not None, name
    # The keys other stages read are still there.
    assert written["int8_accuracy_drop"] == pytest.approx(result.accuracy_drop, abs=1e-6)
    assert set(written["gate"]) >= {"max_accuracy_drop", "passed"}
    assert written["served_variant"] == written["selected"]
    assert written["selected"] in written["variants"] and written["selected_reason"]


def test_structured_pruning_and_distillation_really_shrink(compressed):
    _, result = compressed
    v = result.variants
    fp32 = v["fp32"]
    assert v["pruned"].params < fp32.params / 2 and v["pruned"].size_bytes < fp32.size_bytes
    assert v["student"].params == v["student_alone"].params < fp32.params
    composed = v["student_pruned_int8"]
    assert composed.steps == ("distil", "prune_structured", "quantize_static")
    assert composed.params < v["student"].params
    # (file sizes of networks this tiny are mostly the ONNX graph itself: ~15 KB each)


def test_quantized_variants_are_smaller_and_checked_by_agreement(compressed):
    params, result = compressed
    v = result.variants
    onnx_dir = Path(params.paths.model_dir) / "onnx"
    for name in ("int8", "int8_dynamic", "student_pruned_int8"):
        assert _int8_weights(onnx_dir / f"{name}.onnx"), name
        check = v[name].check
        assert check.kind == "top1_agreement"
        assert check.value >= params.compress.quantization.min_agreement
    assert v["pruned"].check.kind == "max_abs_logit_diff"
    assert v["pruned"].check.value <= params.compress.onnx_tolerance


def test_unstructured_pruning_is_reported_honestly(compressed):
    params, result = compressed
    sparse, fp32 = result.variants["sparse"], result.variants["fp32"]
    assert sparse.params == fp32.params  # nothing removed ...
    assert sparse.nonzero_params < 0.5 * fp32.nonzero_params  # ... only zeroed
    assert abs(sparse.size_bytes - fp32.size_bytes) < 0.02 * fp32.size_bytes  # dense file
    assert sparse.size_gzip_bytes < fp32.size_gzip_bytes  # only a compressed archive shrinks


def test_distillation_summary_compares_with_the_student_alone(compressed):
    params, result = compressed
    d = result.distillation
    assert d["student_params"] < d["teacher_params"]
    assert d["param_ratio"] == pytest.approx(d["teacher_params"] / d["student_params"], rel=1e-3)
    assert d["distilled_accuracy"] == pytest.approx(result.variants["student"].accuracy, abs=1e-6)
    assert d["alone_accuracy"] == pytest.approx(result.variants["student_alone"].accuracy, abs=1e-6)


def test_fp32_onnx_answers_like_pytorch(compressed):
    params, _ = compressed
    model, _ = load_model(params.paths.model_dir)
    test = load_images(split_path(params.paths.prepared_dir, "test"))
    expected = model(torch.from_numpy(test.x).float()).detach().numpy()
    got = compress.run_onnx(Path(params.paths.model_dir) / "onnx" / "fp32.onnx", test.x)
    np.testing.assert_allclose(got, expected, atol=params.compress.onnx_tolerance)


# ---------------------------------------------------------------- the ONNX checks refuse


def test_an_export_that_differs_from_pytorch_is_refused(trained, tmp_path, monkeypatch):
    model, _ = load_model(trained.paths.model_dir)
    real = compress.predict_logits
    monkeypatch.setattr(compress, "predict_logits", lambda m, x: real(m, x) + 0.01)
    with pytest.raises(StageError, match=r"differs from PyTorch by 1\.00e-02"):
        compress.export_onnx(model, (1, 8, 8), tmp_path / "m.onnx", 1e-4)


def test_a_quantized_model_that_disagrees_with_its_source_is_refused(compressed):
    params, _ = compressed
    model, _ = load_model(params.paths.model_dir)
    test = load_images(split_path(params.paths.prepared_dir, "test"))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier[-1].bias += torch.tensor([100.0, 0.0, 0.0])  # always says class 0
    int8 = Path(params.paths.model_dir) / "onnx" / "int8.onnx"
    with pytest.raises(StageError, match="agrees with its PyTorch source .* only"):
        compress.check_quantized(other, int8, test.x, 0.97)


# ---------------------------------------------------------------- the selection policy


def _report(name, size, latency, drop, passed=True):
    return compress.VariantReport(
        name, size, 0.9 - drop, 0.9 - drop, latency, ("x",), 10, 10, size, latency, drop, drop,
        passed,
    )  # fmt: skip


REPORTS = {
    "fp32": _report("fp32", 400, 0.03, 0.0),
    "int8": _report("int8", 120, 0.05, 0.0),
    "pruned": _report("pruned", 110, 0.02, 0.002),
    "tiny": _report("tiny", 10, 0.01, 0.05, passed=False),
}


def test_policy_smallest_passing_skips_variants_over_the_drop_limit(trained):
    cfg = trained.compress.model_copy(
        update={"select": trained.compress.select.model_copy(update={"policy": "smallest_passing"})}
    )
    name, reason = compress.select_variant(REPORTS, cfg)
    assert name == "pruned"
    assert "smallest file" in reason and "over the drop limit: tiny" in reason


def test_policy_fastest_passing_and_named(trained):
    select = trained.compress.select
    fastest = trained.compress.model_copy(
        update={"select": select.model_copy(update={"policy": "fastest_passing"})}
    )
    assert compress.select_variant(REPORTS, fastest)[0] == "pruned"
    named = trained.compress.model_copy(
        update={"select": select.model_copy(update={"policy": "named", "variant": "int8"})}
    )
    assert compress.select_variant(REPORTS, named) == (
        "int8",
        "policy named: int8, as compress.select.variant says; its drops vs fp32 (accuracy "
        "+0.0000, macro F1 +0.0000) are within compress.max_accuracy_drop "
        f"{trained.compress.max_accuracy_drop}",
    )


def test_a_named_variant_over_the_drop_limit_stops_the_stage(raw_params, trained, monkeypatch):
    raw = _with(raw_params, select__policy="named", select__variant="int8",
                variants={"int8": ["quantize_static"]})  # fmt: skip
    params = parse_params(raw)
    real = compress.classification_metrics
    calls = []

    def worse_after_the_first(y, predicted, names):  # fp32 is measured first
        calls.append(1)
        return real(y, predicted if len(calls) == 1 else (predicted + 1) % 3, names)

    monkeypatch.setattr(compress, "classification_metrics", worse_after_the_first)
    before = sorted((Path(params.paths.model_dir) / "onnx").iterdir())
    with pytest.raises(StageError, match=r"int8 \(compress.select.variant\) loses"):
        compress.run(params)
    assert sorted((Path(params.paths.model_dir) / "onnx").iterdir()) == before  # kept


# ---------------------------------------------------------------- the pieces


def test_structured_pruning_removes_channels_of_cnn_mlp_and_batch_norm():
    for family, bn in (("cnn", False), ("cnn", True), ("mlp", True)):
        net = build_model(NetConfig(family, (1, 8, 8), 3, (4, 8), (16,), 0.0, bn, "relu"))
        pruned = prune.prune_structured(net, (1, 8, 8), 0.5)
        # (the MLP keeps its inputs, the pixels: only its hidden layer halves)
        assert distill.count_parameters(pruned) < 0.55 * distill.count_parameters(net)
        widths = [m.out_features for m in pruned.modules() if isinstance(m, torch.nn.Linear)]
        assert widths == [8, 3]  # hidden layer halved, the output layer untouched
        assert pruned.eval()(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


def test_unstructured_pruning_zeroes_the_asked_share_and_bakes_it_in():
    net = build_model(NetConfig("cnn", (1, 8, 8), 3, (4, 8), (16,), 0.0, False, "relu"))
    sparse = prune.make_permanent(prune.prune_unstructured(net, 0.6))
    weights = [
        m.weight for m in sparse.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.6, abs=0.01)
    assert not any(name.endswith("_orig") for name, _ in sparse.named_parameters())


def test_distillation_loss_reduces_to_its_parts():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = torch.tensor([0, 2])
    hard = torch.nn.functional.cross_entropy(logits, labels)
    assert distillation_loss(logits, logits * 3, labels, 4.0, 0.0) == pytest.approx(float(hard))
    assert float(distillation_loss(logits, logits, labels, 4.0, 1.0)) == pytest.approx(0, abs=1e-6)
    assert float(distillation_loss(logits, -logits, labels, 4.0, 1.0)) > 0


def test_distilled_and_alone_students_start_from_the_same_weights():
    config = NetConfig("cnn", (1, 8, 8), 3, (2, 4), (8,), 0.0, False, "relu")
    a, b = distill.new_student(config, 7), distill.new_student(config, 7)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


# ---------------------------------------------------------------- bad input, refused early


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"variants__int8": ["quantize_sideways"]}, r"compress.variants.int8.0: Input should be"),
        ({"pruning__structured_amount": 0.0}, r"structured_amount: Input should be greater"),
        ({"pruning__structured_amount": 1.0}, r"structured_amount: Input should be less"),
        ({"pruning__unstructured_amount": 1.5}, r"unstructured_amount: Input should be less"),
        ({"distillation__width": 1.0}, r"distillation.width: Input should be less"),
        ({"variants__x": ["distil", "student_alone"]}, r"student_alone can only be the first"),
        ({"variants__x": ["quantize_static", "prune_structured"]}, r"can only be the last step"),
        ({"variants__x": []}, r"variant 'x' has no steps"),
        ({"variants__fp32": ["quantize_static"]}, r"'fp32' is the uncompressed network"),
        ({"variants__Bad Name": ["distil"]}, r"variant name 'Bad Name'"),
        ({"variants": {"pruned": ["prune_structured"]}}, r"variant 'int8' must be declared"),
        ({"select__variant": "nope"}, r"select.variant 'nope' is not a variant"),
        ({"select__policy": "biggest"}, r"compress.select.policy: Input should be"),
    ],
)
def test_bad_compress_params_are_refused_with_the_key(raw_params, updates, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(_with(raw_params, **updates))


def test_a_calibration_set_larger_than_train_is_refused_before_any_work(trained):
    params = parse_params(_with(trained.model_dump(by_alias=True, mode="json"),
                                calibration_samples=10_000))  # fmt: skip
    before = sorted((Path(params.paths.model_dir)).iterdir())
    with pytest.raises(StageError, match="calibration_samples is 10000 but the training split"):
        compress.run(params)
    assert sorted((Path(params.paths.model_dir)).iterdir()) == before


def test_a_student_larger_than_its_teacher_is_refused_before_any_work(trained):
    raw = _with(trained.model_dump(by_alias=True, mode="json"),
                distillation__channels=[8, 16], distillation__hidden_units=[32])  # fmt: skip
    params = parse_params(raw)
    before = sorted((Path(params.paths.model_dir)).iterdir())
    with pytest.raises(StageError, match=r"student .* not fewer than its teacher's"):
        compress.run(params)
    assert sorted((Path(params.paths.model_dir)).iterdir()) == before
