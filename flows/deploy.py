"""Deployments of the pipeline flow: a nightly schedule and a by-hand entry point.

    make prefect-server   # prefect server start: SQLite under .prefect/, UI on http://127.0.0.1:4200
    make schedule         # this module: register both deployments and serve their runs

Two deployments of the one ``pipeline`` flow:

- ``pipeline/nightly``: on ``orchestrate.schedule_cron`` (in ``orchestrate.schedule_timezone``),
  with ``only_if_data_changed``: when DVC finds the data source unchanged, every stage is
  skipped and the run says so;
- ``pipeline/by-hand``: no schedule; trigger it with parameters, applied to params.yaml for
  that run only, as ``dvc exp run -S`` would (``keep_params=true`` keeps them)::

      prefect deployment run pipeline/by-hand --param overrides='["train.max_epochs=8"]'

By default this process serves them (Prefect's ``serve``: it polls the server and runs each
flow run in a subprocess here, one at a time). With ``orchestrate.work_pool`` (or ``--pool``)
set, they are registered on that Prefect work pool instead, and the pool's workers run them,
e.g. a process worker on a GPU machine with its own clone of this repository.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from components.stage import set_quiet_env

set_quiet_env()

from components.config import Params, ParamsError, load_params  # noqa: E402
from flows.deployed import REPOSITORY, pipeline_here  # noqa: E402

NIGHTLY = "nightly"
BY_HAND = "by-hand"
# `make prefect-server`. Without a server address Prefect would start a throw-away one, and the
# schedule would die with it: PREFECT_API_URL (environment or profile) wins over this default.
DEFAULT_API_URL = "http://127.0.0.1:4200/api"


def deployment_specs(params: Params) -> list[dict]:
    """What each deployment is: its name, schedule and default parameters."""
    from prefect.schedules import Cron

    orc = params.orchestrate
    return [
        {
            "name": NIGHTLY,
            "schedule": Cron(orc.schedule_cron, timezone=orc.schedule_timezone),
            "parameters": {"only_if_data_changed": True},
            "description": (
                "The scheduled run: skips every stage when DVC finds the data source unchanged, "
                "otherwise runs what changed and saves the run as a DVC experiment."
            ),
            "tags": ["pipeline", "scheduled"],
        },
        {
            "name": BY_HAND,
            "parameters": {"only_if_data_changed": False},
            "description": (
                "Run what changed, with optional overrides of params.yaml for this run only "
                "(--param overrides='[\"train.max_epochs=8\"]'; keep_params=true keeps them), "
                "and save it as a DVC experiment."
            ),
            "tags": ["pipeline", "by-hand"],
        },
    ]


def check_server(api_url: str) -> None:
    import httpx

    try:
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise SystemExit(
            f"No Prefect server answers at {api_url} ({exc.__class__.__name__}). Start one with "
            "`make prefect-server` (or `prefect server start --host 127.0.0.1`) or set "
            "PREFECT_API_URL."
        ) from None


def serve_here(root: Path, params: Params) -> None:
    """Register the deployments and run their flow runs in this process, until stopped."""
    from prefect import serve

    # Under `python -m flows.deploy` this module is `__main__`, so the flow's module path would
    # be `__main__.pipeline_here`, which the runner's flow-run processes cannot import (they
    # failed with MissingFlowError): take the flow from the module under its import name.
    from flows.deploy import pipeline_here as flow_here

    deployments = [
        flow_here.to_deployment(**spec, entrypoint_type=_module_entrypoint())
        for spec in deployment_specs(params)
    ]
    # limit=1: Prefect starts one run at a time here; others wait as Scheduled/Late.
    serve(*deployments, limit=1)


def register_on_pool(root: Path, params: Params, pool: str) -> list[str]:
    """Register the deployments on a work pool; its workers run them from ``root``.

    The flow's source is this folder (a pull step ``cd``s into it), so a worker must see the
    repository at the same path: start the worker on the machine where you run this.
    """
    source = pipeline_here.from_source(
        source=str(root), entrypoint="flows/deployed.py:pipeline_here"
    )
    names = []
    for spec in deployment_specs(params):
        deployment = source.to_deployment(**spec)
        # RunnerDeployment.apply, not prefect.deploy(): with Prefect 3.8.8 and FastAPI 0.154 the
        # latter's worker lookup is answered 422 (it sends limit=null).
        deployment.apply(work_pool_name=pool)
        names.append(f"pipeline/{deployment.name}")
    return names


def _module_entrypoint():
    from prefect.deployments.runner import EntrypointType

    return EntrypointType.MODULE_PATH


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Register the nightly and by-hand deployments of the pipeline and serve "
        "them (or register them on a work pool)."
    )
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    parser.add_argument(
        "--pool",
        default=None,
        help="register on this Prefect work pool for its workers instead of serving here "
        "(default: orchestrate.work_pool)",
    )
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    pool = args.pool
    try:
        params = load_params(root / "params.yaml")
        pool = params.orchestrate.work_pool if pool is None else pool
        if not pool and root != REPOSITORY:
            # Served here, the runs use this copy of the code, in this repository.
            raise ParamsError(f"--root {root}: serve from that repository: cd there first")
    except ParamsError as exc:
        print(f"Deployments not registered: {exc}", file=sys.stderr)
        return 2
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url = PREFECT_API_URL.value() or DEFAULT_API_URL
    check_server(api_url)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):  # also for the runs' processes
        if pool:
            names = register_on_pool(root, params, pool)
            print(
                f"Registered {', '.join(names)} on work pool {pool!r} at {api_url}. Start a "
                f"worker where the runs should go: prefect worker start --pool {pool}"
            )
            return 0
        orc = params.orchestrate
        print(
            f"Serving pipeline/{NIGHTLY} ({orc.schedule_cron}, {orc.schedule_timezone}) and "
            f"pipeline/{BY_HAND} from {root} against {api_url}; Ctrl-C stops (and pauses the "
            "schedule)."
        )
        serve_here(root, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
