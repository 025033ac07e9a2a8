"""The closing summary of a pipeline run: what the stages recorded, read through their typed
readers, as the lines a person reads first (the served model, its gates, the bento and how to
serve it) and as the Markdown the run leaves in Prefect. No Prefect here: the no-op answer
(flows/noop.py) prints the same summary before Prefect is imported."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from components.config import load_params
from components.report import REPORT_FILE

# The key of the Markdown artifact each run leaves in Prefect (the UI's Artifacts page keeps one
# per run).
SUMMARY_ARTIFACT = "pipeline-summary"


def read_summary(root: Path) -> dict:
    """Collect what the stages recorded, for the closing summary: each record through its typed
    reader (components/records.py), as a plain dict; a record that is missing (the stage has
    not run yet) or unreadable is left out, and an unreadable one is named in ``problems``."""
    from components import records
    from components.stage import StageError

    params = load_params(root / "params.yaml")
    metrics_dir = root / params.paths.metrics_dir
    artefacts_dir = root / params.paths.artefacts_dir
    problems: list[str] = []

    def read(reader, folder: Path, name: str) -> dict:
        if not (folder / name).is_file():
            return {}
        try:
            return reader(folder).model_dump(exclude_none=True)
        except StageError as exc:
            problems.append(str(exc))
            return {}

    def read_json(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    return {
        "evaluate": read(records.read_evaluate, metrics_dir, records.EVALUATE_FILE),
        "evaluate_gates": read(
            records.read_evaluate_gates, metrics_dir, records.EVALUATE_GATES_FILE
        ),
        "baselines": read(records.read_baselines, metrics_dir, records.BASELINES_FILE),
        "compress": read(records.read_compress, metrics_dir, records.COMPRESS_FILE),
        "gate": read(records.read_gate, metrics_dir, records.GATE_FILE),
        "bento": read(records.read_bento, artefacts_dir, records.BENTO_FILE),
        "promote": read_json(metrics_dir / "promote.json"),
        # The champion as the record has it now: `make promote` or `make rollback` since the
        # promote stage ran change it, not promote.json.
        "champion_now": _champion_now(root / params.paths.champion_file),
        "report": root / params.paths.reports_dir / "report.html",
        # Where the package stage built the bentos (its BENTOML_HOME, as this process has it).
        "bento_store": os.environ.get("BENTOML_HOME") or str(root / ".bentoml"),
        "root": root,
        "problems": problems,
    }


def _champion_now(path: Path) -> str | None:
    """The champion the record names (None without a readable one: the summary then keeps to
    promote.json; the stages that need the record say what is wrong with it)."""
    try:
        champion = json.loads(path.read_text()).get("champion")
    except (OSError, ValueError, AttributeError):
        return None
    return champion if isinstance(champion, str) else None


def serve_command(tag: str, store: str, root: Path, port: int = 3000) -> str:
    """A shell line that serves bento ``tag`` from ``store`` on 127.0.0.1:``port``, run as
    printed from the repository root: the store and the project's bentoml named outright, since
    a plain shell has neither the Makefile's BENTOML_HOME nor the .venv on its PATH."""
    import shlex

    def shown(path: Path) -> str:
        # Not resolved: .venv/bin/bentoml is a link into the interpreter's own folder.
        path = Path(os.path.abspath(path))
        for base in (Path(os.path.abspath(root)), Path(root).resolve()):
            if path.is_relative_to(base):
                return str(path.relative_to(base))
        return str(path)

    bentoml = Path(sys.executable).parent / "bentoml"
    program = shown(bentoml) if bentoml.is_file() else "bentoml"
    return (
        f"BENTOML_HOME={shlex.quote(shown(store))} {shlex.quote(program)} serve "
        f"{shlex.quote(tag)} --host 127.0.0.1 --port {port}"
    )


def _numbers(metrics: dict, keys) -> str:
    shown = [k for k in keys if isinstance(metrics.get(k), float | int)]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in shown)


def format_summary(summary: dict, outcomes: dict[str, str], notes: list[str] = ()) -> str:
    """The closing summary: the served model's test metrics and gates first (what clients get),
    then the PyTorch network it came from, the other variants, the bento and how to serve it."""
    ev, comp, bento = summary["evaluate"], summary["compress"], summary["bento"]
    gate = summary.get("gate") or {}
    lines = [
        "",
        "Pipeline summary",
        "  stages: " + ", ".join(f"{s} {o}" for s, o in outcomes.items()),
        *(f"  {note}" for note in notes),
        *(f"  could not read: {problem}" for problem in summary.get("problems", ())),
    ]
    from components import tasks

    task = tasks.of_metrics(gate or ev or {})
    headline = task.selection_key
    # The served variant as the gate stage judged it on the test split (what the bento serves),
    # else as compress measured it, else nothing: the network's figures are not the served ones.
    served_name = bento.get("served_variant") or gate.get("served_variant")
    served_name = served_name or comp.get("served_variant")
    served, served_gates = {}, {}
    if served_name and served_name in gate.get("variants", {}):
        served = gate["variants"][served_name]
        served_gates = served.get("gates", {})
    elif served_name and served_name in comp.get("variants", {}):
        served = comp["variants"][served_name]
    if served_name and _numbers(served, task.summary_keys):
        lines.append(
            f"  served model ({served_name}), test metrics: {_numbers(served, task.summary_keys)}"
        )
    for name, g in served_gates.items():
        lines.append(f"  gate {name}: {'PASS' if g['passed'] else 'FAIL'} ({g['reason']})")
    if ev:
        before = "the PyTorch network before compression" if served_name else "test metrics"
        lines.append(f"  {before}: {_numbers(ev, task.summary_keys)}")
        network_gates = (summary.get("evaluate_gates") or {}).get("gates", {})
        for name, g in network_gates.items() if not served_gates else ():
            verdict = "PASS" if g["passed"] else "FAIL"
            lines.append(f"  gate {name}: {verdict} ({g['value']:.4f} vs min {g['threshold']})")
        failed = [g["reason"] for g in network_gates.values() if not g["passed"]]
        if served_gates and failed:
            lines.append(f"  the network's gates: FAIL: {'; '.join(failed)}")
    base = summary.get("baselines") or {}
    if base.get("best"):
        key = task.selection_key
        others = ", ".join(f"{n} {b['metrics'][key]:.4f}" for n, b in base["baselines"].items())
        lines.append(
            f"  classical baselines ({key}, same splits): {others}; the network's "
            f"lift over the best: {base['lift']:+.4f}"
        )
    if comp:
        for name, v in comp["variants"].items():
            latency = v.get("latency_ms_batch1")
            lines.append(
                f"  model {name}: {v['size_bytes'] / 1024:.0f} KiB, {headline} "
                f"{v.get(headline, float('nan')):.4f}"
                + (f", {latency:.3f} ms at batch 1" if latency is not None else "")
                + ("   (served)" if name == served_name else "")
            )
        check = comp.get("gate") or {}
        drop = comp.get(f"int8_{headline}_drop", comp.get("int8_accuracy_drop"))
        if drop is not None and check:
            lines.append(
                f"  gate int8 {headline} drop: {'PASS' if check.get('passed') else 'FAIL'} "
                f"({drop:+.4f} vs max {check.get('max_accuracy_drop')})"
            )
        if comp.get("served_variant"):
            lines.append(f"  selected {comp['served_variant']}: {comp.get('selected_reason', '')}")
    if gate:
        champion = gate.get("champion") or {}
        verdict = "PASS" if gate.get("passed") else "FAIL: " + "; ".join(gate.get("failed", []))
        lines.append(f"  gate before packaging: {verdict}")
        if champion.get("note"):
            lines.append(f"  champion comparison: {champion['note']}")
    if bento:
        lines.append(f"  bento: {bento['tag']} (serves the {bento['served_variant']} model)")
        lines.append(f"  archive: {bento['archive']}")
        edge = bento.get("edge") or {}
        if edge.get("tag"):
            lines.append(f"  edge bento: {edge['tag']} (int8, ONNX Runtime + numpy only)")
    promote = summary.get("promote") or {}
    if promote:
        said = f"{promote.get('outcome')}: {promote.get('reason')}"
        now = summary.get("champion_now")
        if now and now != promote.get("champion_after"):
            said = f"the champion record's since this run's promote stage, which said: {said}"
        lines.append(f"  champion: {now or promote.get('champion_after')} ({said})")
    report = summary.get("report")
    if report and Path(report).is_file():
        lines.append(f"  report: {report}")
    if bento:
        root = summary.get("root") or Path.cwd()
        store = summary.get("bento_store") or str(Path(root) / ".bentoml")
        lines.append("  serve the champion: make serve   (another port: make serve PORT=8080)")
        lines.append(f"  serve this run's bento: {serve_command(bento['tag'], store, root)}")
    return "\n".join(lines)


def summary_markdown(root: Path, run_name: str, summary: str) -> str:
    """The summary as the Markdown of a run's ``pipeline-summary`` artifact, with a link to the
    report page when there is one."""
    reports = load_params(root / "params.yaml").paths.reports_dir
    report = (root / reports / REPORT_FILE).resolve()
    link = f"[{report.name}]({report.as_uri()}) (`{report}`)" if report.is_file() else "none"
    return f"# Pipeline run {run_name}\n\nReport: {link}\n\n```text\n{summary.strip()}\n```\n"
