"""Promote: a packaged challenger that passed every gate becomes the champion.

The DVC stage (``python -m components.promote``, after package) records the packaged run in
the champion record (``paths.champion_file``, kept in git: see components/champion.py) and,
when ``promote.auto`` is true, makes it the champion. It writes ``promote.json``: what it
decided and why, for the report and ``dvc metrics``.

The same module moves the champion by hand (these never touch DVC's state):

    python -m components.promote promote RUN   # make a recorded run the champion (make promote)
    python -m components.promote rollback      # back to the previous champion (make rollback)
    python -m components.promote show          # the champion, its lineage and the known runs
    python -m components.promote tag           # the champion's bento tag, imported if needed

The record keeps each run's task, data kind and target and the task's metrics (accuracy,
macro F1 and the lowest class recall for classification; R^2, RMSE and MAE for regression);
the metric comparison itself is the gate stage's champion gate, per task.

Only runs that were packaged after passing their gates are in the record, so a hand promotion
can choose among earned runs but cannot let a refused one through. A run whose inputs differ
from the champion's (its input schema: components/champion.py ``InputSchema``, e.g. a column
fewer, other classes, another target) is recorded but never promoted automatically: the
champion's clients would get 400s; ``make promote RUN=...`` takes it on purpose and says what
changes for them. A hand's rollback sticks: a later pipeline run that reproduces the run rolled
back from records it but does not promote it again (a hand promotion brings it back). To accept
a challenger the champion gate refused, loosen ``evaluate.max_drop_vs_champion`` for that run;
params.yaml then says so in git.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from components import champion as champ
from components import records, tasks
from components.config import Params, ParamsError, load_params
from components.gates import LABELS
from components.records import write_json
from components.stage import StageError, main, repo_relative, set_quiet_env

log = logging.getLogger("pipeline.promote")

PROMOTE_FORMAT = 1


@dataclass(frozen=True)
class PromoteResult:
    run: str
    promoted: bool
    outcome: str  # "promoted" | "already champion" | "recorded"
    reason: str
    champion_before: str | None
    champion_after: str | None
    # What the champion's clients would find changed in this run's inputs (None: nothing)
    inputs_differ: str | None = None


def run_record(gate: dict, bento: dict, root: Path = Path(".")) -> champ.RunRecord:
    """What the champion record keeps about a packaged run, from gate.json and bento.json."""
    served = gate["served_variant"]
    if bento["served_variant"] != served:
        raise StageError(
            f"bento.json serves the {bento['served_variant']} model but gate.json judged the "
            f"{served} one: stale files; re-run the pipeline"
        )
    verdict = gate["variants"][served]
    if not str(bento["model"]).endswith(verdict["model_sha256"][:12]):
        raise StageError(
            f"the bento's model {bento['model']} is not the {served} model the gates judged "
            f"(sha256 {verdict['model_sha256'][:12]}): stale files; re-run the pipeline"
        )
    archive = Path(root) / bento["archive"]  # relative to the root (an absolute one stays)
    task = tasks.get(gate["task"])
    missing = [k for k in task.record_keys if not isinstance(verdict.get(k), int | float)]
    if missing:
        raise StageError(
            f"gate.json: the {served} variant lacks the {task.name} metrics {', '.join(missing)}: "
            "re-run the gate stage"
        )
    metrics = {k: float(verdict[k]) for k in task.record_keys}
    metrics.update({f"network_{k}": float(v) for k, v in gate["network"].items()})
    return champ.RunRecord(
        run=bento["model_version"],
        bento_tag=bento["tag"],
        archive=repo_relative(archive, root),
        archive_md5=champ.md5_file(archive) if archive.is_file() else None,
        model=bento["model"],
        model_sha256=verdict["model_sha256"],
        served_variant=served,
        class_names=list(gate["class_names"]),
        input_shape=list(gate["input_shape"]),
        test_split=champ.SplitInfo(**gate["test_split"]),
        metrics=metrics,
        packaged_at=champ.now(),
        edge_bento_tag=(bento.get("edge") or {}).get("tag"),
        git_commit=champ.git_commit(root),
        prefect_flow_run=os.environ.get("PREFECT__FLOW_RUN_ID"),
        task=task.name,
        kind=gate["kind"],
        target=gate["target"],
        preprocess_sha256=gate["preprocess_sha256"],
        input_columns=gate.get("input_columns"),
    )


def decide(
    record: champ.ChampionRecord, candidate: champ.RunRecord, gate: dict, auto: bool
) -> PromoteResult:
    """The promotion rule, in memory: changes ``record`` and says what it did."""
    name = candidate.run
    if not gate["passed"]:
        raise StageError(
            f"gate.json says run {name} failed its gates ({'; '.join(gate['failed'])}): "
            "not promoted"
        )
    before = record.champion
    known = record.runs.get(name)
    # The same model packaged again is the same run: keep when, from which commit and by which
    # flow run it was first packaged (else each re-run rewrote the record in git).
    first = ("packaged_at", "git_commit", "prefect_flow_run")
    record.runs[name] = (
        candidate
        if known is None
        else candidate.model_copy(
            update={k: getattr(known, k) for k in first if getattr(known, k) is not None}
        )
    )
    if before == name:
        return PromoteResult(
            name, False, "already champion", f"{name} is the champion already", before, before
        )
    compared = gate["champion"]["run"]
    if compared != before and not same_measured_model(record, compared, before):
        reason = (
            f"the champion changed to {before} after the gate compared {name} with "
            f"{compared or 'no champion'}: recorded, not promoted (make promote RUN={name})"
        )
        _event(record, "record", name, before, "pipeline", reason)
        return PromoteResult(name, False, "recorded", reason, before, before)
    demoted = rolled_back_by_hand(record, name)
    if demoted is not None:
        reason = (
            f"{name} was rolled back by hand at {demoted}: recorded, not promoted again "
            f"automatically (make promote RUN={name} to bring it back)"
        )
        _event(record, "record", name, before, "pipeline", reason)
        return PromoteResult(name, False, "recorded", reason, before, before)
    changed = inputs_differ(record.current(), candidate)
    if changed is not None:
        # The champion's clients send its inputs: a run that reads others would answer them
        # 400 (or other classes). A person decides, knowing what changes for them.
        reason = (
            f"its inputs differ from champion {before}'s ({changed}): packaged and recorded, "
            f"not promoted automatically; `make promote RUN={name}` takes it on purpose"
        )
        _event(record, "record", name, before, "pipeline", reason)
        return PromoteResult(name, False, "recorded", reason, before, before, changed)
    if not auto:
        reason = f"promote.auto is false: recorded; promote it with make promote RUN={name}"
        _event(record, "record", name, before, "pipeline", reason)
        return PromoteResult(name, False, "recorded", reason, before, before)
    gates = gate["variants"][gate["served_variant"]]["gates"]
    reason = "; ".join(g["reason"] for k, g in gates.items() if k.startswith("vs_champion"))
    reason = f"passed every gate; {reason}" if reason else "passed every gate"
    if compared != before:
        reason += f" ({before}, the champion since, serves that same model, measured the same)"
    _promote(record, name, "pipeline", reason)
    return PromoteResult(name, True, "promoted", reason, before, name)


def same_measured_model(record: champ.ChampionRecord, a: str | None, b: str | None) -> bool:
    """Runs ``a`` and ``b`` serve one model, measured alike on one test split: the same model
    packaged again (a change to the service code gives a new bento around it). A gate's
    comparison with ``a`` then holds for ``b``."""
    first, second = record.runs.get(a or ""), record.runs.get(b or "")
    if first is None or second is None:
        return False
    return (first.model_sha256, first.test_split, first.metrics) == (
        second.model_sha256, second.test_split, second.metrics,
    )  # fmt: skip


def inputs_differ(champion: champ.RunRecord | None, run: champ.RunRecord) -> str | None:
    """What a client of ``champion`` finds changed in ``run``'s inputs, in one line (None: no
    champion, or the same inputs): :func:`components.champion.schema_phrase` of their records."""
    if champion is None:
        return None
    return champ.schema_phrase(champ.InputSchema.of_run(champion), champ.InputSchema.of_run(run))


def rolled_back_by_hand(record: champ.ChampionRecord, name: str) -> str | None:
    """When a person rolled back *from* this run (and has not promoted it since): the time.

    Re-running the pipeline reproduces the same run; it must not undo the person's choice.
    """
    for event in reversed(record.events):
        if event.action == "rollback" and event.previous == name:
            return event.at
        if event.action == "promote" and event.run == name and event.by == "hand":
            return None
    return None


def _event(record, action, run, previous, by, reason) -> None:
    record.events.append(
        champ.Event(at=champ.now(), action=action, run=run, previous=previous, by=by, reason=reason)
    )


def _promote(record: champ.ChampionRecord, name: str, by: str, reason: str) -> None:
    previous = record.champion
    record.champion = name
    record.lineage.append(name)
    _event(record, "promote", name, previous, by, reason)


def run(params: Params) -> PromoteResult:
    paths = params.paths
    gate = records.read_gate(paths.metrics_dir).model_dump()
    bento = records.read_bento(paths.artefacts_dir).model_dump()
    candidate = run_record(gate, bento)
    # Load, import the bento (seconds), decide and save as one change: a hand promotion or
    # rollback at the same moment waits for it, then starts from its result.
    with champ.record_lock(paths.champion_file):
        record = champ.load_record(paths.champion_file)
        champ.ensure_bento(candidate)  # a bento restored by DVC's run-cache is imported here
        result = decide(record, candidate, gate, params.promote.auto)
        champ.save_record(paths.champion_file, record)
    write_json(
        Path(paths.metrics_dir) / "promote.json",
        {
            "format": PROMOTE_FORMAT,
            "run": result.run,
            "bento_tag": candidate.bento_tag,
            "promoted": result.promoted,
            "outcome": result.outcome,
            "reason": result.reason,
            "champion_before": result.champion_before,
            "champion_after": result.champion_after,
            "inputs_differ": result.inputs_differ,
            "lineage": list(record.lineage),
        },
    )
    log.info("%s: %s", result.outcome, result.reason)
    return result


# -- by hand ---------------------------------------------------------------------------------


def promote_by_hand(path: Path, name: str, root: Path = Path(".")) -> str:
    """Make a recorded run the champion; its bento must be servable first."""
    with champ.record_lock(path):
        return _promote_by_hand(path, name, root)


def _promote_by_hand(path: Path, name: str, root: Path) -> str:
    record = champ.load_record(path)
    target = record.find(name)
    if record.champion == target.run:
        return f"{target.run} ({target.bento_tag}) is the champion already"
    champ.ensure_bento(target, root)  # refuse before changing anything
    before = record.champion
    changed = inputs_differ(record.current(), target)
    reason = f"promoted by hand (was {before})"
    if changed is not None:
        reason += f"; its inputs differ from {before}'s ({changed})"
    _promote(record, target.run, "hand", reason)
    champ.save_record(path, record)
    said = f"champion: {target.run} ({target.bento_tag}), was {before}"
    if changed is not None:
        said += (
            f"\nclients change: {target.run} takes other inputs than {before} ({changed}); "
            "clients built for it may now get 400s or other answers (`make rollback` goes back)"
        )
    return said


def rollback(path: Path, root: Path = Path(".")) -> str:
    """Give the champion title back to the previous champion; its bento must be servable."""
    with champ.record_lock(path):
        return _rollback(path, root)


def _rollback(path: Path, root: Path) -> str:
    record = champ.load_record(path)
    if record.champion is None:
        raise StageError("no champion yet: nothing to roll back")
    if len(record.lineage) < 2:
        raise StageError(
            f"{record.champion} is the first champion: no previous one to roll back to"
        )
    previous = record.runs[record.lineage[-2]]
    champ.ensure_bento(previous, root)  # refuse before changing anything
    changed = inputs_differ(record.current(), previous)
    current = record.lineage.pop()
    record.champion = previous.run
    _event(record, "rollback", previous.run, current, "hand", f"rolled back from {current}")
    champ.save_record(path, record)
    said = f"champion: {previous.run} ({previous.bento_tag}), rolled back from {current}"
    if changed is not None:
        said += f"\nclients change: {previous.run} takes other inputs than {current} ({changed})"
    return said


def describe(path: Path) -> str:
    record = champ.load_record(path)
    if record.champion is None:
        return "no champion yet: run `make pipeline`"
    lines = []
    for name, r in reversed(record.runs.items()):
        mark = "*" if name == record.champion else " "
        lines.append(f" {mark} {name}  {r.bento_tag}  {headline(r)}  packaged {r.packaged_at}")
    return "\n".join(
        [
            f"champion: {record.champion} ({record.current().bento_tag})",
            "lineage (oldest first; make rollback goes one back): " + " -> ".join(record.lineage),
            "packaged runs (* = champion):",
            *lines,
        ]
    )


def headline(run: champ.RunRecord) -> str:
    """A run's task and headline test metrics in a few words, e.g. "accuracy 0.9712  macro F1
    0.9709" or "regression of 'price': R^2 0.8123  RMSE 1.2345"."""
    m = run.metrics
    numbers = "  ".join(
        f"{LABELS[k]} {m.get(k, float('nan')):.4f}" for k in tasks.get(run.task).headline_keys
    )
    if tasks.get(run.task).has_classes:
        return numbers if run.kind == "image" else f"{run.kind}: {numbers}"
    return f"{run.kind} regression of {run.target!r}: {numbers}"


def champion_tag(path: Path, root: Path = Path(".")) -> str:
    """The champion's bento tag, after making sure the bento is in the store."""
    record = champ.load_record(path)
    current = record.current()
    if current is None:
        raise StageError(f"no champion in {path} yet: run `make pipeline` first")
    champ.ensure_bento(current, root)
    return current.bento_tag


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.promote",
        description="Without a command: the DVC stage. With one: move or show the champion.",
    )
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("promote", help="make a recorded run the champion")
    p.add_argument("run", help="bento version (r...), tag (name:r...) or a unique prefix")
    sub.add_parser("rollback", help="back to the previous champion")
    sub.add_parser("show", help="the champion, its lineage and the packaged runs")
    sub.add_parser("tag", help="print the champion's bento tag (imported into the store if needed)")
    args = parser.parse_args(argv)
    if args.command is None:
        main("promote", run)
        return 0

    set_quiet_env()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    logging.getLogger("pipeline.champion").setLevel(logging.INFO)
    try:
        path = load_params().paths.champion_file
        if args.command == "promote":
            print(promote_by_hand(path, args.run))
        elif args.command == "rollback":
            print(rollback(path))
        elif args.command == "show":
            print(describe(path))
        else:
            print(champion_tag(path))
    except (StageError, ParamsError, json.JSONDecodeError) as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `make champion | head`: the reader left, and that is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(cli())
