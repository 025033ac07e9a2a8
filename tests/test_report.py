"""The HTML report: self-contained, complete, and rendered by a real headless Chromium.

The inputs are what a run leaves: the gate stage runs on tiny ONNX models (see
tests/gate_project.py); the other stages' small files are written here.

The browser test uses Debian's ``chromium`` (``make test`` installs it when missing and root)
through Python Playwright, or Chromium's own ``--screenshot`` when Playwright is missing. It
skips only when no Chromium can be found, and says so. Screenshots go to
``$REPORT_SCREENSHOT_DIR`` when set (the test's temp folder otherwise).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from components import gate, report
from components.config import Params
from components.report import REPORT_FILE, write_report
from tests.gate_project import (
    FEATURES,
    REGRESSION_PARAMS,
    TARGET,
    WEIGHT,
    finished_run,
    other_stage_files,
    project_params,
    regression_split,
    write_regression_challenger,
    write_regression_split,
)

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_the_report_is_one_self_contained_page_with_every_section(project):
    path = write_report(finished_run(project))
    assert path == Path(project.paths.reports_dir) / REPORT_FILE
    page = path.read_text()
    # Nothing to fetch: every src is an inline image, every link a local page next to it.
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert ref.startswith("data:image/png;base64,") or ref.startswith("validation/"), ref
    assert "<script" not in page and "http://" not in page and "https://" not in page
    from PIL import Image

    images = _images(page)
    assert len(images) == 4  # per-class, confusion, training curves, compression
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 100
    for heading in ("Gates", "Test metrics", "Training", "Compression", "Data validation"):
        assert f"<h2>{heading}</h2>" in page
    assert "Promoted: run r0123456789ab is the champion (the first champion)" in page
    assert "Data: images of 8x8 pixels, 1 channel(s); classification into 3 classes;" in page
    assert "vs_champion" in page and "no champion yet" in page
    assert 'href="validation/summary.html"' in page and 'href="validation/index.html"' in page
    assert "int8 ONNX (served)" in page and "fp32 ONNX (not served)" in page
    # The served variant's gates lead; the others are folded below them.
    gates = page[page.index("<h2>Gates</h2>") : page.index("<h2>Test metrics</h2>")]
    assert gates.index("int8 ONNX (served)") < gates.index("<details>")
    assert gates.index("<details>") < gates.index("fp32 ONNX (not served)")
    assert "network (PyTorch)" not in gates[gates.index("<details>") :]


def test_a_refused_run_shows_why_and_what_it_did_not_reach(project):
    params = finished_run(project)
    path = write_report(params, stopped_at="gate", stop_reason="accuracy 0.5 is 0.4 below champion")
    page = path.read_text()
    assert "Refused at gate: accuracy 0.5 is 0.4 below champion" in page
    assert "Not reached: the run stopped at <b>gate</b>" in page  # the champion section
    assert "This run was not packaged" in page
    assert "r0123456789ab" not in page  # promote.json is an older run's: not shown
    early = write_report(params, stopped_at="evaluate", stop_reason="accuracy 0.4 < min 0.9")
    page = early.read_text()
    assert (
        page.count("Not reached: the run stopped at <b>evaluate</b>") == 2
    )  # compression, champion
    assert "int8 ONNX" not in page  # gate.json is from an older run: not shown


def test_missing_files_leave_a_note_not_a_crash(project):
    page = write_report(project).read_text()
    assert page.count("No result:") >= 4
    with pytest.raises(ValueError, match="unknown stage"):
        write_report(project, stopped_at="nowhere")


def test_a_regression_report_shows_r2_and_predicted_vs_actual(tmp_path, monkeypatch):
    """A table regression run (real evaluate and gate stages): R^2/RMSE/MAE instead of the
    classification figures, the predicted-vs-actual plot, the data's target and features."""
    monkeypatch.chdir(tmp_path)
    params = project_params(tmp_path, **REGRESSION_PARAMS)
    write_regression_split(params, regression_split())
    write_regression_challenger(params, int8_weight=WEIGHT * 0.98)  # runs evaluate
    gate.run(params)
    metrics = Path(params.paths.metrics_dir)
    (metrics / "train.json").write_text(json.dumps({"best_epoch": 2, "epochs_run": 3}))
    (metrics / "train_history.csv").write_text(
        "epoch,train_loss,val_loss,val_rmse\n1,null,0.9,2.5\n2,0.8,0.5,1.2\n3,0.4,0.6,1.3\n"
    )
    page = write_report(other_stage_files(params)).read_text()
    evaluated = json.loads((metrics / "evaluate.json").read_text())

    assert "Promoted: run r0123456789ab is the champion" in page
    assert "Data: a table; regression of <code>price</code>; examples: test 40." in page
    assert f"{len(FEATURES)} features (encoded from the columns rooms, area, age)" in page
    assert "<th>model</th><th>R^2</th><th>RMSE</th><th>MAE</th>" in page
    assert f"<td class=num>{evaluated['r2']:.4f}</td>" in page  # the network's R^2
    assert f"MAE and RMSE in the units of <code>{TARGET}</code>" in page
    assert "R^2 drop vs the network" in page and "(evaluate.min_r2)" in page
    assert "int8 R^2 drop vs fp32" in page
    assert "<th>latency batch 1 (ms)</th><th>R^2</th><th>RMSE</th><th>MAE</th>" in page
    assert "accuracy" not in page.replace("max_accuracy_drop", "")  # no classification figure
    assert "Per-class" not in page and "confusion" not in page
    alts = re.findall(r'<img class="plot" alt="([^"]+)"', page)
    assert alts == [
        "predicted vs actual values of the test split, and the residuals",
        "training and validation loss and rmse per epoch",
        "compression trade-off: size, R^2 and latency",
    ]
    from PIL import Image

    for data in _images(page):
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 100


def _write_model_json(params: Params, choices: list[str] | None) -> None:
    """model.json as train writes it (components.model.save_model), with ``choices`` as its
    recipe (None: a model.json from before the recipe)."""
    from components.model import NetConfig, build_model, save_model

    config = NetConfig("cnn", (1, 8, 8), 3, (4,), (8,), 0.0, False, "relu")
    extra = {
        "class_names": ["a", "b", "c"],
        "trained_epochs": 3,
        "kind": "image",
        "task": "classification",
        "target": "",
        "feature_names": [],
        "preprocess": None,
    }
    if choices is not None:
        extra["recipe"] = {"choices": choices, "train": params.train.model_dump(mode="json")}
    save_model(build_model(config), config, params.paths.model_dir, extra)


def test_the_report_shows_the_recipes_choices_with_their_reasons(project):
    from components import kinds, recipe

    params = finished_run(project)
    chosen = recipe.resolve(params.train, kinds.get("image"), 30, (1, 8, 8))
    choices = list(chosen.choices)
    assert {c.split(" ")[0] for c in choices} >= {"train.model", "train.early_stopping_patience"}
    _write_model_json(params, choices)
    page = write_report(params).read_text()
    training = page[page.index("<h2>Training</h2>") : page.index("<h2>Compression</h2>")]
    assert "<h3>Recipe</h3>" in training
    assert training.count("<tr><td class=nowrap><code>train.") == len(choices)
    for line in choices:  # "train.key value: why": the key, the value and the reason apart
        setting, why = line.split(": ", 1)
        key, value = setting.split(" ", 1)
        assert (
            f"<tr><td class=nowrap><code>{key}</code></td><td class=nowrap>{value}</td>"
            f"<td>{html.escape(why)}</td></tr>"
        ) in training, line

    # Every value set: the recipe chose nothing, and the page says so.
    _write_model_json(params, [])
    page = write_report(params).read_text()
    assert "The recipe chose nothing" in page and "<th>chosen</th>" not in page
    # A model.json from before the recipe, or none: no recipe section, no crash.
    _write_model_json(params, None)
    assert "<h3>Recipe</h3>" not in write_report(params).read_text()
    (Path(params.paths.model_dir) / "model.json").unlink()
    assert "<h3>Recipe</h3>" not in write_report(params).read_text()


def test_a_run_stopped_at_train_does_not_show_the_last_good_runs_recipe(project):
    params = finished_run(project)
    _write_model_json(params, ["train.model cnn: the family built for image data"])
    page = report.write_stopped(params, "train", "train: val_loss is NaN").read_text()
    assert "<h3>Recipe</h3>" not in page


def test_history_with_missing_values_still_plots():
    rows = [{"epoch": 1.0, "train_loss": float("nan"), "val_loss": 0.5, "val_accuracy": 0.8}]
    assert report.plot_history(rows).startswith('<img class="plot"')


def _clashing_texts(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts of ``fig`` (titles, labels, tick labels, legends, annotations)
    whose boxes overlap by more than a pixel each way: what a reader cannot read. Tick labels
    outside their axis' view are not drawn, so not counted."""
    import itertools

    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    undrawn = set()
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = sorted((lo, hi))
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                    undrawn.update({id(tick.label1), id(tick.label2)})
    boxes = [
        (t.get_text(), t.get_window_extent(renderer))
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip() and id(t) not in undrawn
    ]
    return [
        (a, b)
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2)
        if min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0) > 1
        and min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0) > 1
    ]


def _legibility_cases():
    """Each plot of the report, on data of many shapes: few and many classes, short and long
    names, every compression variant, long runs, targets in large and small units."""
    import numpy as np

    rng = np.random.default_rng(0)
    for k, width in ((3, 25), (5, 14), (10, 7), (10, 1), (13, 30), (26, 6), (40, 3)):
        names = [f"{i}_{'x' * width}"[: max(width, 1)] if width > 1 else str(i) for i in range(k)]
        pairs = [(names[i % k], names[(i * 3) % k]) for i in range(k * 120)]
        yield f"confusion {k}x{width}", report.figure_confusion(pairs, names)
        scores = {n: {"precision": 0.9, "recall": 0.8, "f1": 0.85} for n in names}
        yield f"per-class {k}x{width}", report.figure_per_class(scores, 0.8)
    variants = ("fp32", "int8", "int8_dynamic", "pruned", "pruned_int8", "pruned_distilled",
                "pruned_distilled_int8", "student", "student_alone", "student_pruned_int8",
                "sparse")  # fmt: skip
    measured = {
        n: {"size_bytes": int(rng.integers(20_000, 500_000)), "r2": 0.9,
            "accuracy": 0.95 + 0.04 * rng.random(), "latency_ms_batch1": float(rng.random())}
        for n in variants
    }  # fmt: skip
    yield "compression", report.figure_compression(measured, "accuracy", "pruned_distilled_int8")
    yield "compression r2", report.figure_compression(measured, "r2", None)
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_acc": 1 - 1 / (e + 1),
                "val_rmse": float("nan")} for e in range(1, 61)]  # fmt: skip
    yield "history", report.figure_history(history)
    for centre, spread in ((1000, 300), (2e6, 5e5), (0.001, 0.0002)):
        actual = rng.normal(centre, spread, 300)
        pairs = [(float(a), float(a + rng.normal(0, spread / 5))) for a in actual]
        yield f"predictions around {centre}", report.figure_predictions(pairs)


def test_every_plot_is_legible_whatever_the_data():
    """No two texts of a plot overlap (#17: the compression plots' labels did), for class names
    long or short, few or many classes, and targets in any units."""
    import matplotlib.pyplot as plt

    clashes = {}
    for case, (fig, _alt) in _legibility_cases():
        if found := _clashing_texts(fig):
            clashes[case] = found[:3]
        plt.close(fig)
    assert clashes == {}


# -- in a real browser -----------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _shots_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("REPORT_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_report_renders_in_headless_chromium_with_its_plots(project, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (make test installs Debian's chromium as root)")
    params = finished_run(project)
    passed = write_report(params)
    refused = passed.with_name("refused.html")
    refused.write_text(
        report.render(report.gather(params, stopped_at="gate", stop_reason="a regression"))
    )
    shots = _shots_dir(tmp_path)
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        _check_with_chromium_cli(browser, passed, shots / "report.png", tmp_path)
        return
    _check_with_playwright(browser, passed, shots / "report.png", promoted=True)
    _check_with_playwright(browser, refused, shots / "report-refused.png", promoted=False)


def _check_with_playwright(browser: str, page_file: Path, shot: Path, promoted: bool) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=browser, args=CHROMIUM_FLAGS)
        try:
            page = chromium.new_page(viewport={"width": 1100, "height": 900})
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(page_file.resolve().as_uri(), wait_until="load", timeout=30_000)
            images = page.evaluate(
                "Array.from(document.images).map(i => "
                "({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight, done: i.complete}))"
            )
            verdict = page.inner_text(".verdict")
            headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            chromium.close()
    assert len(images) == 4, images
    for image in images:
        assert image["done"] and image["width"] > 200 and image["height"] > 100, image
    external = [u for u in requested if not u.startswith(("file:", "data:"))]
    assert external == [], f"the page fetched {external}"
    assert verdict.startswith("Promoted" if promoted else "Refused at gate"), verdict
    assert headings[:5] == ["Gates", "Test metrics", "Training", "Compression", "Data validation"]
    assert shot.stat().st_size > 20_000  # a page with plots, not a blank one


def _check_with_chromium_cli(browser: str, page_file: Path, shot: Path, tmp_path: Path) -> None:
    """Without Playwright: Chromium's own screenshot, and the DOM it built."""
    common = [browser, "--headless", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    url = page_file.resolve().as_uri()
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1100,4000", url],
        check=True,
        capture_output=True,
        timeout=120,
    )
    dom = subprocess.run(
        [*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    assert dom.count('src="data:image/png;base64,') == 4
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "the screenshot is blank"
