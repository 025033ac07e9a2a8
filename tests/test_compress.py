"""Compression on tiny data: every method, a composition, the ONNX checks, the selection
policy and every kind of bad input, with real torch-pruning, Lightning and ONNX Runtime."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components import compress, distill, ingest, prune, train
from components import model as model_module
from components.config import ParamsError, parse_params
from components.dataset import load_arrays, split_path
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


def _quick_compress_params(tmp: Path, **compress_updates):
    """Tiny params with a sparse variant, 2 pruning fine-tune epochs and 4 of distillation."""
    raw = _with(tiny_params_dict(tmp, "unused"), **compress_updates)
    raw["compress"]["variants"]["sparse"] = ["prune_unstructured"]
    raw["compress"]["pruning"].update(finetune_epochs=2)
    raw["compress"]["distillation"].update(max_epochs=4)
    return parse_params(raw)


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
    test = load_arrays(split_path(params.paths.prepared_dir, "test"))
    expected = model(torch.from_numpy(test.x).float()).detach().numpy()
    got = compress.run_onnx(Path(params.paths.model_dir) / "onnx" / "fp32.onnx", test.x)
    np.testing.assert_allclose(got, expected, atol=params.compress.onnx_tolerance)


# ---------------------------------------------------------------- the ONNX checks refuse


def test_an_export_that_differs_from_pytorch_is_refused(trained, tmp_path, monkeypatch):
    model, _ = load_model(trained.paths.model_dir)
    real = model_module.predict_logits  # onnx_files imports it when it checks
    monkeypatch.setattr(model_module, "predict_logits", lambda m, x: real(m, x) + 0.01)
    with pytest.raises(StageError, match=r"differs from PyTorch by 1\.00e-02"):
        compress.export_onnx(model, (1, 8, 8), tmp_path / "m.onnx", 1e-4)


def test_a_quantized_model_that_disagrees_with_its_source_is_refused(compressed):
    params, _ = compressed
    model, _ = load_model(params.paths.model_dir)
    test = load_arrays(split_path(params.paths.prepared_dir, "test"))
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
    real = compress.task_metrics
    calls = []

    def worse_after_the_first(task, y, logits, names):  # fp32 is measured first
        calls.append(1)
        return real(task, y, logits if len(calls) == 1 else np.roll(logits, 1, axis=1), names)

    monkeypatch.setattr(compress, "task_metrics", worse_after_the_first)
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


def test_a_student_larger_than_its_teacher_is_refused_before_any_work(trained):
    raw = _with(trained.model_dump(by_alias=True, mode="json"),
                distillation__channels=[8, 16], distillation__hidden_units=[32])  # fmt: skip
    params = parse_params(raw)
    before = sorted((Path(params.paths.model_dir)).iterdir())
    with pytest.raises(StageError, match=r"student .* not fewer than its teacher's"):
        compress.run(params)
    assert sorted((Path(params.paths.model_dir)).iterdir()) == before


# ---------------------------------------------------------------- tables and sequences
#
# A teacher trained for a few seconds with train's own loop (components/finetune.py), then the
# real compress(): every default variant of params.yaml (plus sparse) exported, checked,
# measured and selected, for an MLP regression on a table, a GRU classifier on sequences and
# an LSTM forecaster on windows of a series.


def _standardised(x: np.ndarray, n_train: int) -> np.ndarray:
    mean = x[:n_train].mean(axis=tuple(range(x.ndim - 1)))
    std = x[:n_train].std(axis=tuple(range(x.ndim - 1))) + 1e-6
    return ((x - mean) / std).astype(np.float32)


def make_table_regression(n: int = 120, seed: int = 0):
    """Five encoded features; a target in its own units (mean ~100, spread ~10)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5))
    y = 100 + 10 * (x[:, 0] - 0.5 * x[:, 1] + 0.3 * x[:, 2] * x[:, 3]) + rng.normal(0, 1, n)
    return x.astype(np.float32), y.astype(np.float32)


def make_sequence_classes(per_class: int = 30, steps: int = 6, seed: int = 0):
    """Two-feature sequences: rising, falling or alternating; class indices 0, 1, 2."""
    rng = np.random.default_rng(seed)
    t = np.linspace(-1, 1, steps)
    shapes = (t, -t, np.where(np.arange(steps) % 2, 1.0, -1.0))
    xs, ys = [], []
    for label, shape in enumerate(shapes):
        for _ in range(per_class):
            first = shape + rng.normal(0, 0.3, steps)
            xs.append(np.stack([first, rng.normal(0, 1, steps)], axis=1))
            ys.append(label)
    order = rng.permutation(len(ys))
    return np.stack(xs)[order].astype(np.float32), np.array(ys, dtype=np.int64)[order]


def make_forecast_windows(n: int = 100, window: int = 8, seed: int = 0):
    """Windows of a noisy sine; the target is the next value, in units around 20."""
    rng = np.random.default_rng(seed)
    series = np.sin(0.4 * np.arange(n + window)) + rng.normal(0, 0.05, n + window)
    x = np.stack([series[i : i + window] for i in range(n)])[:, :, None]
    y = 20 + 5 * series[window : window + n]
    return x.astype(np.float32), y.astype(np.float32)


TABLE_FAMILIES = {
    # name: (make data, kind, task, family, class names, teacher epochs)
    "table_mlp_regression": (make_table_regression, "table", "regression", "mlp", (), 25),
    "sequence_gru_classification": (
        make_sequence_classes,
        "sequence",
        "classification",
        "gru",
        ("up", "down", "zigzag"),
        25,
    ),
    "sequence_lstm_regression": (make_forecast_windows, "sequence", "regression", "lstm", (), 25),
}


def _tiny_setup(tmp: Path, name: str, **compress_updates):
    """Splits, meta, a trained teacher and the compress params for one of TABLE_FAMILIES."""
    from components.dataset import ArraySet, DatasetMeta
    from components.finetune import fit_network

    make, kind, task, family, class_names, epochs = TABLE_FAMILIES[name]
    x, y = make()
    n_train, n_val = len(y) // 2, len(y) // 4
    x = _standardised(x, n_train)
    cut = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val),
           "test": slice(n_train + n_val, None)}  # fmt: skip
    splits = {s: ArraySet(x[c], y[c]) for s, c in cut.items()}
    meta = DatasetMeta(
        class_names=class_names, input_shape=tuple(x.shape[1:]), source=name,
        split_sizes={s: len(v) for s, v in splits.items()}, kind=kind, task=task,
    )  # fmt: skip
    regression = task == "regression"
    config = NetConfig(
        family, tuple(x.shape[1:]), meta.num_outputs, (), (16,), 0.0, False, "relu", task=task,
        input_scale=1.0, rnn_hidden_size=12,
        target_mean=float(splits["train"].y.mean()) if regression else 0.0,
        target_std=float(splits["train"].y.std()) if regression else 1.0,
    )  # fmt: skip
    # Calibrate on every training row: tiny standardised data has few rows near its extremes.
    params = _quick_compress_params(tmp, calibration_samples=n_train, **compress_updates)
    torch.manual_seed(0)
    teacher = build_model(config)
    fit_network(teacher, splits["train"], splits["val"], params.train, epochs, 0.01)
    return teacher, config, meta, splits, params


@pytest.fixture(scope="module", params=list(TABLE_FAMILIES))
def tiny_compressed(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    teacher, config, meta, splits, params = _tiny_setup(tmp, request.param)
    out = tmp / "onnx"
    out.mkdir()
    result = compress.compress(teacher, config, meta, splits, params.compress, params.train, out)
    return request.param, teacher, config, meta, splits, params, out, result


REGRESSION_VARIANT_KEYS = {
    "steps", "params", "nonzero_params", "size_bytes", "size_gzip_bytes", "r2", "rmse", "mae",
    "r2_drop", "passed", "latency_ms_batch1", "latency_ms_batch64", "onnx_check",
}  # fmt: skip


def test_tables_and_sequences_get_every_variant_checked_measured_and_selected(tiny_compressed):
    name, teacher, config, meta, splits, params, out, result = tiny_compressed
    declared = {"fp32", *params.compress.variants}
    assert set(result.variants) == declared
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.onnx" for n in declared)
    payload = json.loads(json.dumps(compress.result_payload(result, params.compress)))
    assert payload["task"] == meta.task
    assert payload["selected"] in declared and payload["selected_reason"]
    assert result.variants[payload["selected"]].passed
    for variant, v in payload["variants"].items():
        assert v["size_bytes"] == (out / f"{variant}.onnx").stat().st_size
        assert v["latency_ms_batch1"] > 0 and v["latency_ms_batch64"] > 0
        check = v["onnx_check"]
        quantized = result.variants[variant].steps[-1:] in (("quantize_static",),
                                                            ("quantize_dynamic",))  # fmt: skip
        if meta.is_regression:
            assert set(v) == REGRESSION_VARIANT_KEYS, variant
            assert v["r2_drop"] == pytest.approx(
                payload["variants"]["fp32"]["r2"] - v["r2"], abs=1e-5
            )
            assert v["passed"] == (v["r2_drop"] <= params.compress.max_accuracy_drop + 1e-6)
            expected = "within_tolerance_agreement" if quantized else "max_abs_diff_in_target_std"
            if quantized:
                assert check["tolerance"] == pytest.approx(0.1 * config.target_std, rel=1e-5)
        else:
            assert {"accuracy", "macro_f1", "accuracy_drop", "macro_f1_drop"} <= set(v)
            assert not {"r2", "rmse", "mae", "r2_drop"} & set(v)
            expected = "top1_agreement" if quantized else "max_abs_logit_diff"
            assert "tolerance" not in check
        assert check["kind"] == expected, variant
        assert check["value"] >= check["threshold"] if quantized else check["value"] <= 1e-4
    if meta.is_regression:
        assert "int8_r2_drop" in payload and "int8_accuracy_drop" not in payload
        assert payload["int8_r2_drop"] == pytest.approx(payload["variants"]["int8"]["r2_drop"])
        assert payload["variants"]["fp32"]["r2"] > 0.5, "the teacher learnt something"
        d = payload["distillation"]
        assert d["gain_r2"] == pytest.approx(d["distilled_r2"] - d["alone_r2"], abs=1e-5)
        assert "R^2" in compress.format_table(result)
    else:
        assert payload["variants"]["fp32"]["accuracy"] > 0.6, "the teacher learnt something"
        assert "gain_points" in payload["distillation"]
    # The fp32 export answers like PyTorch on the test split.
    test = splits["test"]
    expected_out = teacher(torch.from_numpy(test.x)).detach().numpy()
    got = compress.run_onnx(out / "fp32.onnx", test.x)
    scale = config.target_std if meta.is_regression else 1.0
    np.testing.assert_allclose(got / scale, expected_out / scale, atol=1e-4)


def test_tables_and_sequences_really_shrink(tiny_compressed):
    name, teacher, config, meta, splits, params, out, result = tiny_compressed
    v = result.variants
    fp32 = v["fp32"]
    assert v["pruned"].params < fp32.params / 2
    assert v["student"].params == v["student_alone"].params < fp32.params
    assert v["student_pruned_int8"].params < v["student"].params
    assert v["sparse"].params == fp32.params and v["sparse"].nonzero_params < 0.5 * fp32.params
    assert _int8_weights(out / "int8.onnx") and _int8_weights(out / "int8_dynamic.onnx")
    if config.family in ("lstm", "gru"):
        assert result.distillation["student_rnn_hidden_size"] == 6  # 12 x width 0.5


def test_an_inapplicable_variant_is_refused_before_any_work(tmp_path):
    teacher, config, meta, splits, params = _tiny_setup(
        tmp_path, "table_mlp_regression", quantization__dynamic_op_types=["Conv"]
    )
    out = tmp_path / "onnx"
    out.mkdir()
    with pytest.raises(
        StageError,
        match=r"compress.variants.int8_dynamic: quantize_dynamic with compress.quantization."
        r"dynamic_op_types \['Conv'\] quantizes nothing in a mlp network",
    ):
        compress.compress(teacher, config, meta, splits, params.compress, params.train, out)
    assert list(out.iterdir()) == []


def test_a_model_for_another_task_is_refused(tmp_path):
    teacher, config, meta, splits, params = _tiny_setup(tmp_path, "table_mlp_regression")
    other = dataclasses.replace(meta, task="classification", class_names=("a", "b"))
    with pytest.raises(StageError, match="regression network but the prepared data"):
        compress.compress(teacher, config, other, splits, params.compress, params.train, tmp_path)


# ---------------------------------------------------------------- a change forecast
#
# A trending series whose test values lie above every training value: the network forecasts
# the change from each window's last value and adds that value back in its forward pass
# (train.forecast change, components/model.py). Every variant keeps doing so: the exports, the
# int8 models (the addition stays float: a clipped last value would clip the forecast), the
# pruned networks and the distilled students.


def _trend_splits(n: int = 240, window: int = 8, seed: int = 0):
    """Windows of a rising line with a wave; train, val and test in time order."""
    from components.dataset import DatasetMeta
    from components.kinds.sequence import windows

    rng = np.random.default_rng(seed)
    t = np.arange(n)
    series = 10 + 0.1 * t + np.sin(0.5 * t) + rng.normal(0, 0.1, n)
    cut = (0, n * 6 // 10, n * 8 // 10, n)
    bounds = {s: (cut[i], cut[i + 1]) for i, s in enumerate(("train", "val", "test"))}
    lo, hi = bounds["train"]
    mean, std = float(series[lo:hi].mean()), float(series[lo:hi].std())
    splits = {
        s: windows(((series[a:b] - mean) / std)[:, None], series[a:b], window, 1)
        for s, (a, b) in bounds.items()
    }
    spec = {"columns": [{"name": "level", "type": "numeric", "mean": mean, "std": std}],
            "features": ["level"], "window": window, "horizon": 1, "target": "level"}  # fmt: skip
    meta = DatasetMeta(
        class_names=(), input_shape=(window, 1), source="trend.csv",
        split_sizes={s: len(v) for s, v in splits.items()}, kind="sequence", task="regression",
        target="level", feature_names=("level",), preprocess=spec,
    )  # fmt: skip
    return splits, meta


@pytest.fixture(scope="module")
def change_compressed(tmp_path_factory):
    from components.finetune import fit_network
    from components.metrics import regression_metrics
    from components.model import change_forecast, last_target_input

    tmp = tmp_path_factory.mktemp("change")
    splits, meta = _trend_splits()
    level = NetConfig("gru", meta.input_shape, 1, (), (16,), 0.0, False, "relu",
                      task="regression", input_scale=1.0, rnn_hidden_size=12,
                      target_mean=float(splits["train"].y.mean()),
                      target_std=float(splits["train"].y.std()))  # fmt: skip
    config = change_forecast(level, meta, splits["train"].x, splits["train"].y)
    params = _quick_compress_params(tmp, calibration_samples=len(splits["train"]))
    torch.manual_seed(0)
    teacher = build_model(config)
    fit_network(teacher, splits["train"], splits["val"], params.train, 25, 0.01)
    out = tmp / "onnx"
    out.mkdir()
    result = compress.compress(teacher, config, meta, splits, params.compress, params.train, out)
    test = splits["test"]
    persistence = regression_metrics(test.y, last_target_input(meta).decode(test.x))["r2"]
    return teacher, config, splits, params, out, result, persistence


def test_a_change_forecast_is_compressed_and_every_variant_still_extrapolates(change_compressed):
    teacher, config, splits, params, out, result, persistence = change_compressed
    train, test = splits["train"], splits["test"]
    assert test.y.min() > train.y.max()  # every test value above every training value
    assert config.last_value_feature == 0
    assert config.target_std < 0.2 * float(train.y.std())  # standardised on the change
    payload = compress.result_payload(result, params.compress)
    variants = payload["variants"]
    assert set(variants) == {"fp32", *params.compress.variants}
    assert variants["fp32"]["r2"] > 0.8 and variants["fp32"]["r2"] > persistence - 0.05
    for name, v in variants.items():  # none clips at the training range
        assert v["r2"] > 0.8, (name, v["r2"])
    assert abs(variants["int8"]["r2_drop"]) <= params.compress.max_accuracy_drop
    assert _int8_weights(out / "int8.onnx")
    assert result.variants["student"].params < result.variants["fp32"].params
    assert result.variants["pruned"].params < result.variants["fp32"].params
    # The fp32 export answers like PyTorch: the last value is added inside the graph.
    expected = teacher(torch.from_numpy(np.ascontiguousarray(test.x))).detach().numpy()
    np.testing.assert_allclose(compress.run_onnx(out / "fp32.onnx", test.x), expected, rtol=1e-5)


def test_a_level_forecast_of_the_same_series_stays_within_its_training_range(change_compressed):
    """Why the change: the same network forecasting the level is held below the training
    maximum, and misses the test values by far more than the change forecast does."""
    from components.finetune import fit_network

    teacher, config, splits, params, _, _, _ = change_compressed
    level = dataclasses.replace(config, last_value_feature=None,
                                target_mean=float(splits["train"].y.mean()),
                                target_std=float(splits["train"].y.std()))  # fmt: skip
    torch.manual_seed(0)
    net = build_model(level)
    fit_network(net, splits["train"], splits["val"], params.train, 25, 0.01)
    test = splits["test"]
    x = torch.from_numpy(np.ascontiguousarray(test.x))
    level_error = float(np.abs(net(x).detach().numpy()[:, 0] - test.y).mean())
    change_error = float(np.abs(teacher(x).detach().numpy()[:, 0] - test.y).mean())
    assert change_error < 0.25 * level_error, (change_error, level_error)


def test_static_int8_keeps_a_last_value_above_every_calibration_window(tmp_path):
    """The last value is added in float: windows 12 standard deviations above the calibration
    windows get the PyTorch answer from the int8 file. (Written as an Add, the same network's
    int8 file missed by up to 54 target units here: the quantizer clips the Add's inputs to their
    calibrated range.)"""
    from components import quantize

    torch.manual_seed(0)
    config = NetConfig("gru", (8, 1), 1, (), (8,), 0.0, False, "relu", task="regression",
                       input_scale=1.0, rnn_hidden_size=6, target_mean=0.1, target_std=0.5,
                       last_value_feature=0, last_value_mean=20.0, last_value_std=5.0)  # fmt: skip
    net = build_model(config).eval()
    calibration = np.random.default_rng(0).standard_normal((128, 8, 1)).astype(np.float32)
    far = calibration + 12.0
    last = lambda windows: windows[:, -1, 0] * 5.0 + 20.0  # noqa: E731 (in target units)
    widest = calibration * quantize.CALIBRATION_HEADROOM  # the quantizer's widened range
    assert last(far).min() > last(widest).max() + 10  # above every calibration window
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    compress.export_onnx(net, (8, 1), fp32, 1e-4, calibration[:16], config.target_std)
    q = parse_params(tiny_params_dict(tmp_path, "unused")).compress.quantization
    quantize.quantize_static(fp32, int8, calibration, q)
    expected = net(torch.from_numpy(far)).detach().numpy()
    np.testing.assert_allclose(compress.run_onnx(int8, far), expected, atol=0.5)


def test_a_change_forecast_needs_the_target_among_the_windows_inputs():
    from components.model import change_forecast

    splits, meta = _trend_splits()
    config = NetConfig("gru", meta.input_shape, 1, (), (8,), 0.0, False, "relu",
                       task="regression", input_scale=1.0)  # fmt: skip
    other = dataclasses.replace(meta, target="price")
    with pytest.raises(ValueError, match="hold its target 'price' as an input"):
        change_forecast(config, other, splits["train"].x, splits["train"].y)
    classes = NetConfig("gru", meta.input_shape, 2, (), (8,), 0.0, False, "relu",
                        input_scale=1.0, last_value_feature=0)  # fmt: skip
    with pytest.raises(ValueError, match="only a regression network on windows"):
        build_model(classes)


# ---------------------------------------------------------------- regression checks, pieces


def _regressor(family="mlp", shape=(4,), std=10.0, **kw):
    torch.manual_seed(0)
    config = NetConfig(family, shape, 1, (), (8,), 0.0, False, "relu", task="regression",
                       input_scale=1.0, rnn_hidden_size=6, target_mean=50.0, target_std=std,
                       **kw)  # fmt: skip
    return build_model(config).eval(), config


def test_regression_exports_are_checked_in_target_standard_deviations(tmp_path, monkeypatch):
    net, config = _regressor(std=1000.0)
    samples = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    check = compress.export_onnx(net, (4,), tmp_path / "m.onnx", 1e-4, samples, 1000.0)
    assert check.kind == "max_abs_diff_in_target_std" and check.value <= 1e-4
    real = model_module.predict_logits  # onnx_files imports it when it checks
    monkeypatch.setattr(model_module, "predict_logits", lambda m, x: real(m, x) + 1.0)  # 1e-3 std
    with pytest.raises(StageError, match=r"by 1\.00e-03 target standard deviations"):
        compress.export_onnx(net, (4,), tmp_path / "m.onnx", 1e-4, samples, 1000.0)


def test_a_quantized_regressor_that_disagrees_with_its_source_is_refused(tmp_path):
    from components import quantize

    net, config = _regressor()
    samples = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    compress.export_onnx(net, (4,), fp32, 1e-4, samples, config.target_std)
    q = parse_params(tiny_params_dict(tmp_path, "unused")).compress.quantization
    quantize.quantize_static(fp32, int8, samples, q)
    check = compress.check_quantized(net, int8, samples, 0.97, config.target_std)
    assert check.kind == "within_tolerance_agreement" and check.value >= 0.97
    assert check.tolerance == pytest.approx(1.0)  # 0.1 of the target's std, 10
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.classifier[-1].bias += 0.2  # 0.2 std = 2 target units off everywhere
    with pytest.raises(StageError, match=r"agrees with its PyTorch source \(within 1, 0.1 target"):
        compress.check_quantized(other, int8, samples, 0.97, config.target_std)


@pytest.mark.parametrize(("family", "layers"), [("lstm", 1), ("gru", 1), ("lstm", 2), ("gru", 2)])
def test_recurrent_pruning_removes_exactly_the_units_that_do_nothing(family, layers):
    net, config = _regressor(family, (5, 3), rnn_layers=layers)
    rnn, head = net.rnn, net.classifier[2]  # Flatten, Dropout, Linear(6 -> 8), ...
    gates = rnn.weight_ih_l0.shape[0] // 6
    dead = [0, 2, 5]  # no weight in or out in every layer: the net answers as without them
    with torch.no_grad():
        for layer in range(layers):
            for name, p in rnn.named_parameters():
                if name.endswith(f"_l{layer}"):
                    p.view(gates, 6, -1)[:, dead] = 0
            rnn.get_parameter(f"weight_hh_l{layer}")[:, dead] = 0
            reader = rnn.get_parameter(f"weight_ih_l{layer + 1}") if layer + 1 < layers else None
            (reader if reader is not None else head.weight)[:, dead] = 0
        dead_head = [1, 3, 4, 6]  # and half the head's hidden units, for DepGraph to remove
        head.weight[dead_head] = 0
        head.bias[dead_head] = 0
        net.classifier[-1].weight[:, dead_head] = 0
    x = torch.randn(7, 5, 3)
    pruned = prune.prune_structured(net, (5, 3), 0.5)
    assert pruned.rnn.hidden_size == 3 and pruned.classifier[2].in_features == 3
    assert pruned.classifier[2].out_features == 4  # the head's hidden layer halved by DepGraph
    torch.testing.assert_close(pruned(x), net(x), atol=1e-5, rtol=1e-5)
    assert distill.count_parameters(pruned) < 0.5 * distill.count_parameters(net)


def test_unstructured_pruning_reaches_recurrent_weights_and_bakes_them_in():
    net, _ = _regressor("gru", (5, 3))
    sparse = prune.make_permanent(prune.prune_unstructured(net, 0.6))
    assert not any(name.endswith("_orig") for name, _ in sparse.named_parameters())
    assert float((sparse.rnn.weight_hh_l0 == 0).float().mean()) > 0.3
    assert sparse(torch.randn(2, 5, 3)).shape == (2, 1)


def test_a_recurrent_student_has_fewer_recurrent_units():
    _, teacher = _regressor("lstm", (5, 3))
    d = parse_params(tiny_params_dict(Path("/tmp"), "unused")).compress.distillation
    student = distill.student_config(teacher, d)
    assert (student.rnn_hidden_size, student.hidden_units) == (3, (4,))
    cnn = NetConfig("cnn", (1, 8, 8), 3, (4, 8), (16,), 0.0, False, "relu")
    assert distill.student_config(cnn, d).rnn_hidden_size == cnn.rnn_hidden_size  # untouched


def test_regression_distillation_loss_reduces_to_its_parts():
    from components.finetune import regression_distillation_loss

    student = torch.tensor([[1.0], [3.0]])
    teacher, y = torch.tensor([[2.0], [3.0]]), torch.tensor([1.0, 5.0])
    # soft: mean((1-2)^2, 0) / 2^2 = 0.125; hard: mean(0, (3-5)^2) / 2^2 = 0.5
    for weight, expected in ((1.0, 0.125), (0.0, 0.5), (0.5, 0.3125)):
        loss = regression_distillation_loss(student, teacher, y, 2.0, weight)
        assert float(loss) == pytest.approx(expected)
