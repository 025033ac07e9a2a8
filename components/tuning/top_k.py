"""The ensemble of a study's top-k trials: their models, restored from their DVC experiments,
averaged into one ONNX model, then checked, measured and gated (components/ensemble.py)."""

from __future__ import annotations

from pathlib import Path

from components.config import Params
from components.tuning.study import ranked
from components.tuning.trials import experiment_ref, experiment_rev


def ensemble_of_top_trials(root: Path, params: Params, study, out_dir: Path, package: bool) -> dict:
    """Build and measure the ensemble of the ``tune.ensemble.top_k`` best finished trials;
    returns components/ensemble.py's summary, or ``{"note": why it was skipped}``."""
    from components import ensemble as ens

    cfg = params.tune
    top = ranked(study, cfg)[: cfg.ensemble.top_k]
    if len(top) < 2:
        return {"note": f"ensemble skipped: {len(top)} finished trial(s), it needs 2"}
    work = Path(root) / "build" / "tune" / cfg.study_name
    members, model_dir = [], Path(params.paths.model_dir)
    prepared = Path(params.paths.prepared_dir)
    for t in top:
        name = t.user_attrs["experiment"]
        ref = experiment_ref(root, name)
        if ref is None:
            return {"note": f"ensemble skipped: experiment {name} of trial {t.number} is gone"}
        rev = experiment_rev(root, ref)
        files = [model_dir / "model.pt", model_dir / "model.json"]
        members.append(ens.restore_files(root, rev, files, work / "members" / name))
        if len(members) == 1:  # the test split the trials were made with: the best trial's
            ens.restore_files(
                root, rev, [prepared / "meta.json", prepared / "test.npz"], work / "data"
            )
    weights = ens.weights_from_scores([t.value for t in top], cfg.metric, cfg.ensemble.weighting)
    try:
        return ens.build_and_measure(
            members,
            weights,
            params,
            out_dir,
            names=[t.user_attrs["experiment"] for t in top],
            package=package,
            data_dir=work / "data",
        )
    except (FileNotFoundError, ValueError) as exc:
        return {"note": f"ensemble skipped: {' '.join(str(exc).split())}"}
