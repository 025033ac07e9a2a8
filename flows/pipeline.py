"""The pipeline as a Prefect flow: one task per DVC stage, in graph order.

DVC decides what re-runs (hashes of deps, params and outs); Prefect decides when and where
(by hand, on a schedule, on a work pool) and keeps the logs and the run history. A stage DVC
finds unchanged ends in a ``Skipped`` state without starting a process.

    python -m flows.pipeline                          # run everything that changed
    python -m flows.pipeline --set train.max_epochs=2 # override params.yaml, as `dvc exp run -S`

No ML logic lives here: each stage is ``python -m components.<stage>``, run by ``dvc repro``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from components.stage import FAILURE_PREFIX, set_quiet_env

set_quiet_env()  # before Prefect is imported: it reads PREFECT_HOME at import

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.states import Completed, Failed  # noqa: E402

from components.config import ParamsError, apply_overrides, check_overrides, load_params  # noqa: E402


def stage_order(root: Path) -> list[str]:
    """The stages of dvc.yaml in graph order (DVC's own topological sort of its stage graph)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        return [stage.addressing for stage in reversed(list(nx.topological_sort(graph)))]


def stage_is_up_to_date(root: Path, stage: str) -> bool:
    """DVC's verdict: are this stage's deps, params and outs unchanged since dvc.lock?"""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return not repo.status(targets=[stage])


@task(retries=0)
def run_stage(stage: str, root: str):
    """Run one stage through ``dvc repro --single-item``; stream its output into the logs."""
    logger = get_run_logger()
    root_path = Path(root)
    if stage_is_up_to_date(root_path, stage):
        logger.info("%s: unchanged since dvc.lock, skipped", stage)
        return Completed(name="Skipped", message=f"{stage} unchanged", data="skipped")

    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    # dvc.yaml's commands say `python`: make that this interpreter (the project's venv).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        command,
        cwd=root_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reason, restored, last = None, False, ""
    for line in process.stdout:
        line = line.rstrip()
        if not line:
            continue
        logger.info(line)
        last = line
        if line.startswith(FAILURE_PREFIX):
            reason = line.removeprefix(FAILURE_PREFIX).strip()
        elif "Unable to acquire lock" in line:
            reason = (
                f"{stage}: another DVC command is running in {root_path} (DVC's lock is held); "
                "wait for it to finish and run again"
            )
        elif "is cached - skipping run" in line:
            restored = True
    if process.wait() != 0:
        # A failed state with the stage's own reason, not a traceback: the reason is the story.
        return Failed(message=reason or f"{stage}: {last or 'dvc repro exited non-zero'}")
    if restored:
        return Completed(
            name="Skipped", message=f"{stage} restored from DVC's run-cache", data="restored"
        )
    return "ran"


def read_summary(root: Path) -> dict:
    """Collect what the stages recorded, for the closing summary."""
    params = load_params(root / "params.yaml")
    metrics_dir = root / params.paths.metrics_dir

    def read(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    return {
        "evaluate": read(metrics_dir / "evaluate.json"),
        "compress": read(metrics_dir / "compress.json"),
        "bento": read(root / params.paths.artefacts_dir / "bento.json"),
    }


def format_summary(summary: dict, outcomes: dict[str, str]) -> str:
    ev, comp, bento = summary["evaluate"], summary["compress"], summary["bento"]
    lines = [
        "",
        "Pipeline summary",
        "  stages: " + ", ".join(f"{s} {o}" for s, o in outcomes.items()),
    ]
    if ev:
        lines.append(
            "  test metrics: "
            + ", ".join(
                f"{k} {ev[k]:.4f}"
                for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1")
            )
        )
        for name, gate in ev.get("gates", {}).items():
            verdict = "PASS" if gate["passed"] else "FAIL"
            lines.append(
                f"  gate {name}: {verdict} ({gate['value']:.4f} vs min {gate['threshold']})"
            )
    if comp:
        for name, v in comp["variants"].items():
            lines.append(
                f"  model {name}: {v['size_bytes'] / 1024:.0f} KiB, accuracy {v['accuracy']:.4f}, "
                f"{v['latency_ms_batch1']:.3f} ms at batch 1"
            )
        gate = comp["gate"]
        lines.append(
            f"  gate int8 accuracy drop: {'PASS' if gate['passed'] else 'FAIL'} "
            f"({comp['int8_accuracy_drop']:+.4f} vs max {gate['max_accuracy_drop']})"
        )
    if bento:
        lines.append(f"  bento: {bento['tag']} (serves the {bento['served_variant']} model)")
        lines.append(f"  archive: {bento['archive']}")
        lines.append(f"  serve it: make serve   (or: bentoml serve {bento['tag']} --port 3000)")
    return "\n".join(lines)


@flow(name="pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None, root: str = "."):
    """Apply parameter overrides, then run every stage through DVC in graph order.

    A failing stage fails the flow with that stage's reason; later stages do not run.
    Returns each stage's outcome ("ran" or "skipped").
    """
    logger = get_run_logger()
    root_path = Path(root).resolve()
    if overrides:
        applied = apply_overrides(overrides, root_path / "params.yaml")
        logger.info("params.yaml overrides: %s", applied)
    else:
        load_params(root_path / "params.yaml")  # bad params fail here, before any stage

    outcomes: dict[str, str] = {}
    for stage in stage_order(root_path):
        state = run_stage.with_options(name=stage, task_run_name=stage)(
            stage, str(root_path), return_state=True
        )
        if not state.is_completed():
            return Failed(message=state.message or f"{stage} did not complete")
        outcomes[stage] = "skipped" if state.name == "Skipped" else "ran"
    print(format_summary(read_summary(root_path), outcomes))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the pipeline as a Prefect flow.")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value in params.yaml (repeatable), e.g. --set train.max_epochs=2",
    )
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    args = parser.parse_args(argv)
    try:
        # Bad overrides fail here, in a second, before Prefect starts and before any stage.
        check_overrides(args.overrides, Path(args.root) / "params.yaml")
    except ParamsError as exc:
        print(f"Pipeline not started: {exc}", file=sys.stderr)
        return 2
    state = pipeline(overrides=args.overrides, root=args.root, return_state=True)
    if not state.is_completed():
        print(f"\nPipeline failed: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
