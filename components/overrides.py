"""``--set key=value`` overrides of params.yaml, applied the way ``dvc exp run -S`` does.

Every override is checked against the file and the typed schema (components/config.py) before
anything is written; the file keeps its comments and layout (ruamel.yaml round trip). A flow
run applies its overrides for that run only (:func:`overrides_for_one_run`): params.yaml goes
back byte for byte afterwards, so the next run trains what the file (and git) says.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.config import PARAMS_FILE, ParamsError, load_yaml, parse_params, read_params_file
from components.families import FAMILIES, readers_of
from components.stage import write_text


def parse_value(text: str):
    """Parse an override's value the way YAML would (``2`` -> int, ``[8, 16]`` -> list,
    ``1e-4`` -> float, as DVC's ``-S`` reads it)."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def resolve(overrides: list[str], path: Path) -> dict[str, object]:
    """Parse ``key=value`` items and check them against params.yaml; write nothing."""
    return _resolve(overrides, path)[0]


def _resolve(overrides: list[str], path: Path, raw: dict | None = None):
    """The values by dotted key, and params.yaml as they make it (typed). ``raw``: params.yaml
    already read (changed in place), for a caller that checks many overrides one by one."""
    raw = read_params_file(path) if raw is None else raw
    resolved: dict[str, object] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r} must look like section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"override {key!r}: no section {part!r} in {path}")
            node = node[part]
        if leaf not in node or isinstance(node[leaf], dict):
            raise ParamsError(f"override {key!r}: no such parameter in {path}")
        node[leaf] = resolved[key] = parse_value(text)
    return resolved, parse_params(raw)  # the whole file must still validate


def check_overrides(
    overrides: list[str], path: Path = PARAMS_FILE, raw: dict | None = None
) -> dict[str, object]:
    """Validate overrides without touching params.yaml; return the values by dotted key.
    ``raw``: a copy of params.yaml already read (it is changed), instead of reading ``path``."""
    return _resolve(overrides, Path(path), raw)[0]


def ignored_by_the_model(overrides: list[str], path: Path = PARAMS_FILE) -> dict[str, str]:
    """The overrides of train.* keys that the model they leave chosen does not read (each
    family's ``train_keys``, components/families.py), each with a message naming it: e.g.
    ``train.channels`` when train.model is mlp. Checked (and refused) before a run starts."""
    resolved, params = _resolve(overrides, Path(path))
    model, auto = params.train.model, ""
    if model == "auto":  # the family the recipe picks for the data kind ingest will read
        from components import kinds

        try:
            kind = kinds.detect(params.ingest)
            model = kinds.get(kind).auto_model
        except (ValueError, ImportError):
            return {}  # an unknown kind: the run is refused for that, by name, elsewhere
        auto = f" (train.model auto picks {model} for {kind} data)"
    ignored = {}
    for key in resolved:
        section, _, name = key.partition(".")
        readers = readers_of(name) if section == "train" else ()
        if readers and name not in FAMILIES[model].train_keys:
            ignored[key] = (
                f"{key}: model {model} does not use it (only {' and '.join(readers)} "
                f"{'does' if len(readers) == 1 else 'do'}), so this override would change "
                f"nothing; set train.model={readers[0]} too, or drop it{auto}"
            )
    return ignored


def refuse_ignored(overrides: list[str], path: Path = PARAMS_FILE) -> None:
    """Raise :class:`ParamsError` naming every override the chosen model would ignore."""
    ignored = ignored_by_the_model(overrides, path)
    if ignored:
        raise ParamsError("; ".join(ignored.values()))


def apply_overrides(overrides: list[str], path: Path = PARAMS_FILE) -> dict[str, object]:
    """Apply ``key=value`` overrides to params.yaml, as ``dvc exp run --set-param`` does.

    Every override is checked (the key must exist, the result must validate) before the file
    is touched, so a bad override leaves params.yaml exactly as it was. Comments and layout
    are kept. Returns the applied values by dotted key.
    """
    path = Path(path)
    applied, text = _render(overrides, path)
    if text is not None:
        write_text(path, text)
    return applied


def params_as_written(overrides: list[str], path: Path = PARAMS_FILE) -> dict:
    """params.yaml as :func:`apply_overrides` would write it, read back; nothing is written. A
    value the file would not keep is refused (:class:`ParamsError`), as the run would refuse it."""
    _, text = _render(overrides, Path(path))
    return read_params_file(path) if text is None else load_yaml(text)


def _float(representer, value: float):
    """A float as YAML 1.1 and 1.2 both read it: ``1.0e-07``, not ruamel's (and Python's)
    ``1e-07``, which PyYAML and other YAML 1.1 readers take for a string."""
    text = repr(value)
    if "e" in text and "." not in text:
        mantissa, exponent = text.split("e")
        return representer.represent_scalar("tag:yaml.org,2002:float", f"{mantissa}.0e{exponent}")
    return representer.represent_float(value)


def _render(overrides: list[str], path: Path) -> tuple[dict[str, object], str | None]:
    """The checked values, and params.yaml's text with them applied (None: no override)."""
    from ruamel.yaml import YAML

    applied = resolve(overrides, path)
    if not applied:
        return applied, None
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout
    # `null` stays `null` (ruamel would write an empty value, which reads the same but differs).
    yaml_rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    yaml_rt.representer.add_representer(float, _float)
    doc = yaml_rt.load(path.read_text())
    for key, value in applied.items():
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node[part]
        old = node.get(leaf)
        if isinstance(value, list) and isinstance(old, list) and old.fa.flow_style() is False:
            # A block list keeps its node (and the comments ruamel hangs on it): new items in
            # place, the comments of items that are gone dropped with them.
            for index in [i for i in old.ca.items if i >= len(value)]:
                del old.ca.items[index]
            old[:] = [flow_style(v) for v in value]
        else:
            node[leaf] = flow_style(value)
    out = io.StringIO()
    yaml_rt.dump(doc, out)
    text = out.getvalue()
    # Never write a file that does not read back as the values just applied.
    written = load_yaml(text)
    for key, value in applied.items():
        node = written
        for part in key.split("."):
            node = node[part]
        if node != value:
            raise ParamsError(f"override {key!r}: params.yaml would not keep {value!r}; unchanged")
    parse_params(written)
    return applied, text


def flow_style(value):
    """Lists and mappings written inline (``[64, 32]``), as params.yaml writes them: a block
    sequence in place of an inline one misplaces the comment after it (ruamel keeps it on the
    old token), and an empty one then swallows the next line's line break."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, list):
        seq = CommentedSeq(flow_style(v) for v in value)
        seq.fa.set_flow_style()
        return seq
    if isinstance(value, dict):
        mapping = CommentedMap((k, flow_style(v)) for k, v in value.items())
        mapping.fa.set_flow_style()
        return mapping
    return value


# ---------------------------------------------------------------------------------------------
# Overrides for one run


@dataclass
class OneRun:
    """What :func:`overrides_for_one_run` applied, and whether params.yaml keeps it: a run that
    turns out to have failed sets ``keep`` to False (its params are never kept)."""

    applied: dict[str, object]
    keep: bool
    edited: bool = False  # params.yaml changed during the run: left as it was found, not put back


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def overrides_for_one_run(
    overrides: list[str],
    path: Path = PARAMS_FILE,
    *,
    keep: bool = False,
    backup: Path | None = None,
    run: str = "",
) -> Iterator[OneRun]:
    """params.yaml with ``overrides`` applied inside the block, and back byte for byte as it
    was after it: when the block ends, fails, or is interrupted (Ctrl-C; SIGTERM where it
    raises, as in a Prefect flow run). ``keep`` leaves the overrides in the file when the block
    finishes.

    A params.yaml edited while the block ran is left as it is (``edited``): an edit is never
    lost. ``backup`` holds the bytes before while the block runs, so that a run killed where no
    ``finally`` runs (SIGKILL, OOM, a reboot) is undone by the next one:
    :func:`put_back_after_a_killed_run`. Yields a :class:`OneRun`.
    """
    path = Path(path)
    applied, text = _render(overrides, path)
    run_params = OneRun(applied, keep)
    if text is None:
        yield run_params
        return
    before = path.read_bytes()
    if backup is not None:
        write_text(
            backup,
            json.dumps(
                {
                    "run": run,
                    "overrides": list(overrides),
                    "params": str(path),
                    "before": base64.b64encode(before).decode(),
                    "after_sha256": _sha256(text.encode()),
                }
            ),
        )
    finished = False
    try:
        write_text(path, text)
        yield run_params
        finished = True
    finally:
        if not (run_params.keep and finished):  # an interrupted run's params are never kept
            # An edit made to params.yaml during the run is never lost: the file stays.
            now = path.read_bytes() if path.is_file() else b""
            run_params.edited = now != text.encode()
            if not run_params.edited:
                write_text(path, before)
        if backup is not None:
            backup.unlink(missing_ok=True)


def put_back_after_a_killed_run(backup: Path, path: Path = PARAMS_FILE) -> str | None:
    """Undo the overrides of a run that was killed inside :func:`overrides_for_one_run`.

    params.yaml goes back as it was before that run only when it is still exactly as that run
    wrote it (an edit made since is never lost). Returns a line saying what happened, or None
    when no run was killed with overrides applied.
    """
    path = Path(path)
    if not backup.is_file():
        return None
    try:
        saved = json.loads(backup.read_text())
        before = base64.b64decode(saved["before"])
        after = saved["after_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        backup.unlink(missing_ok=True)
        return f"{backup}: unreadable, removed (params.yaml left as it is)"
    current = path.read_bytes() if path.is_file() else b""
    who = f"run {saved.get('run')!r}" if saved.get("run") else "an earlier run"
    overrides = " ".join(saved.get("overrides") or [])
    if _sha256(current) == after:
        write_text(path, before)
        said = f"params.yaml put back as it was before {who}, which was killed with overrides "
        said += f"applied ({overrides})"
    elif current == before:
        said = None
    else:
        said = (
            f"{who} was killed with overrides applied ({overrides}), but params.yaml changed "
            "since: left as it is"
        )
    backup.unlink(missing_ok=True)
    return said
