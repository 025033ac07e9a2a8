"""``--set key=value`` overrides of params.yaml, applied the way ``dvc exp run -S`` does.

Every override is checked against the file and the typed schema (components/config.py) before
anything is written; the file keeps its comments and layout (ruamel.yaml round trip).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from components.config import PARAMS_FILE, ParamsError, parse_params, read_params_file


def parse_value(text: str):
    """Parse an override's value the way YAML would (``2`` -> int, ``[8, 16]`` -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def resolve(overrides: list[str], path: Path) -> dict[str, object]:
    """Parse ``key=value`` items and check them against params.yaml; write nothing."""
    raw = read_params_file(path)
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
    parse_params(raw)  # the whole file must still validate
    return resolved


def check_overrides(overrides: list[str], path: Path = PARAMS_FILE) -> dict[str, object]:
    """Validate overrides without touching params.yaml; return the values by dotted key."""
    return resolve(overrides, Path(path))


def apply_overrides(overrides: list[str], path: Path = PARAMS_FILE) -> dict[str, object]:
    """Apply ``key=value`` overrides to params.yaml, as ``dvc exp run --set-param`` does.

    Every override is checked (the key must exist, the result must validate) before the file
    is touched, so a bad override leaves params.yaml exactly as it was. Comments and layout
    are kept. Returns the applied values by dotted key.
    """
    from ruamel.yaml import YAML

    path = Path(path)
    applied = resolve(overrides, path)
    if not applied:
        return applied
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout
    # `null` stays `null` (ruamel would write an empty value, which reads the same but differs).
    yaml_rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
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
    tmp = path.with_suffix(".yaml.tmp")
    with tmp.open("w") as fh:
        yaml_rt.dump(doc, fh)
    # Never leave a file that does not read back as the values just applied.
    written = yaml.safe_load(tmp.read_text())
    for key, value in applied.items():
        node = written
        for part in key.split("."):
            node = node[part]
        if node != value:
            tmp.unlink()
            raise ParamsError(f"override {key!r}: params.yaml would not keep {value!r}; unchanged")
    parse_params(written)
    tmp.replace(path)
    return applied


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
