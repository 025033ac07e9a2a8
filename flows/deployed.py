"""The flow the deployments run (flows/deploy.py): the pipeline, in the repository this code is in.

Its own module, not flows/deploy.py: Prefect finds a served flow again by its module path, and
`python -m flows.deploy` would make that ``__main__``, where a deployment's run cannot find it.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

# The repository this code is in: where a deployment's runs work. Not a run parameter, so a
# run triggered with parameters cannot point the pipeline at another folder.
REPOSITORY = Path(__file__).resolve().parents[1]


@flow(name="pipeline", log_prints=True)
def pipeline_here(
    overrides: list[str] | None = None,
    only_if_data_changed: bool = False,
    keep_params: bool = False,
):
    """The pipeline flow in the repository this deployment serves (flows/pipeline.py)."""
    from flows.pipeline import pipeline

    return pipeline.fn(
        overrides, only_if_data_changed, root=str(REPOSITORY), keep_params=keep_params
    )
