"""Each DVC stage's code dependencies are the project modules its command imports.

A stage's ``deps`` in dvc.yaml must list every module of ours that ``python -m
components.<stage>`` can import, directly or through other modules, lazily inside functions
too: otherwise a change there re-runs nothing. This module computes those import closures from
the source (``ast``, nothing is imported) and checks or rewrites dvc.yaml:

    python -m tools.code_deps          # list what differs (exit 1 if anything does)
    python -m tools.code_deps --write  # make dvc.yaml's code deps the closures (make deps)

It also finds import cycles and imports of another module's private (``_name``) names, which
tests/test_structure.py forbids.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("components", "deploy", "flows")
REFERENCE = re.compile(r"^((?:components|deploy|flows)(?:\.\w+)+):\w+$")
ROOT = Path(__file__).resolve().parents[1]
# Modules a stage ships rather than imports: the package stage copies the services into the
# bentos, so a change to them must re-build the bentos.
SHIPPED = {"package": ("deploy.service", "deploy.edge_service")}


@dataclass(frozen=True)
class ImportGraph:
    files: dict[str, Path]  # module name -> file
    edges: dict[str, set[str]]  # module -> project modules it imports
    private: list[str]  # "a imports b._name"
    # module -> project modules it names as "package.module:Name", imported by name when first
    # used (the built-in data kinds in components/kinds/registry.py, a leaf module so that it
    # can name them): in the closure, since a stage runs them, but not an import cycle.
    references: dict[str, set[str]] = field(default_factory=dict)

    def closure(self, module: str) -> set[str]:
        seen, todo = set(), [module]
        while todo:
            name = todo.pop()
            if name in seen or name not in self.files:
                continue
            seen.add(name)
            todo.extend(self.edges.get(name, ()))
            todo.extend(self.references.get(name, ()))
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
            parts = name.split(".")
            todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        return seen

    def cycles(self) -> list[list[str]]:
        """Strongly connected groups of more than one module (Tarjan)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on: set[str] = set()
        found: list[list[str]] = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on.add(v)
            for w in sorted(self.edges.get(v, ())):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    found.append(sorted(group))

        for v in sorted(self.files):
            if v not in index:
                visit(v)
        return found


def module_name(path: Path, root: Path) -> str:
    name = ".".join(path.relative_to(root).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph(root: Path = ROOT) -> ImportGraph:
    files = {
        module_name(f, root): f
        for package in PACKAGES
        for f in sorted((root / package).rglob("*.py"))
    }
    edges: dict[str, set[str]] = {}
    references: dict[str, set[str]] = {}
    private: list[str] = []
    for name, path in files.items():
        out: set[str] = set()
        named: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:  # relative: from the package this module is in
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, target] if target else base)
                if target.split(".")[0] not in PACKAGES:
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    if full in files:
                        out.add(full)
                        continue
                    out.add(target)
                    if alias.name.startswith("_") and target != name:
                        private.append(f"{name} imports {target}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in files:
                        out.add(alias.name)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                reference = REFERENCE.match(node.value)
                if reference and reference[1] in files and reference[1] != name:
                    named.add(reference[1])
        edges[name] = {t for t in out if t in files and t != name}
        references[name] = named
    return ImportGraph(files, edges, private, references)


def stage_module(cmd) -> str | None:
    words = (cmd if isinstance(cmd, str) else " ".join(cmd)).split()
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words):
            return words[i + 1]
    return None


def is_code(dep: str) -> bool:
    return dep.endswith(".py") and dep.split("/")[0] in PACKAGES


def expected_code_deps(graph: ImportGraph, stage: str, cmd, root: Path = ROOT) -> list[str]:
    """The .py files a stage's deps must list: its command's import closure (and what it ships),
    empty ``__init__.py`` files left out."""
    module = stage_module(cmd)
    if module is None or module not in graph.files:
        return []
    names = graph.closure(module)
    for shipped in SHIPPED.get(stage, ()):
        names |= graph.closure(shipped)
    paths = {graph.files[n].relative_to(root).as_posix() for n in names}
    return sorted(p for p in paths if (root / p).stat().st_size or not p.endswith("__init__.py"))


def differences(root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """Per stage: (missing from dvc.yaml, listed but not imported)."""
    import yaml

    graph = import_graph(root)
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for stage, spec in stages.items():
        declared = {d for d in spec.get("deps", []) if isinstance(d, str) and is_code(d)}
        expected = set(expected_code_deps(graph, stage, spec.get("cmd", ""), root))
        if declared != expected:
            out[stage] = (sorted(expected - declared), sorted(declared - expected))
    return out


def write(root: Path = ROOT) -> list[str]:
    """Make every stage's code deps in dvc.yaml its import closure; comments are kept.
    Returns the stages changed."""
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.indent(mapping=2, sequence=4, offset=2)  # dvc.yaml's own layout
    yaml_rt.width = 4096
    path = root / "dvc.yaml"
    doc = yaml_rt.load(path.read_text())
    graph = import_graph(root)
    changed = []
    for stage, spec in doc["stages"].items():
        deps = spec.get("deps")
        if deps is None:
            continue
        expected = expected_code_deps(graph, stage, spec.get("cmd", ""), root)
        current = [d for d in deps if isinstance(d, str) and is_code(d)]
        if current == expected:
            continue
        others = [d for d in deps if not (isinstance(d, str) and is_code(d))]
        deps[:] = [*expected, *others]  # the list node (and its comments) stays
        changed.append(stage)
    if changed:
        with path.open("w") as fh:
            yaml_rt.dump(doc, fh)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    args = parser.parse_args(argv)
    if args.write:
        changed = write()
        print("dvc.yaml code deps updated: " + (", ".join(changed) if changed else "none"))
        return 0
    found = differences()
    for stage, (missing, extra) in found.items():
        print(f"{stage}: missing {missing or '-'}; not imported {extra or '-'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
