"""The structure keeps the stage contract: honest DVC code deps, no import cycles, no module
reaching into another's private names."""

from __future__ import annotations

from tools.code_deps import differences, import_graph


def test_every_stage_lists_exactly_the_modules_it_imports():
    found = differences()
    assert not found, (
        "dvc.yaml's code deps differ from the stages' imports (run `make deps`): "
        + "; ".join(f"{s}: missing {m}, not imported {x}" for s, (m, x) in found.items())
    )


def test_no_import_cycles():
    assert import_graph().cycles() == []


def test_no_module_imports_another_modules_private_names():
    assert import_graph().private == []


def test_the_check_sees_a_missing_dep(tmp_path):
    """The check can fail: a stage that imports a module dvc.yaml does not list is named."""
    (tmp_path / "components").mkdir()
    (tmp_path / "deploy").mkdir()
    (tmp_path / "flows").mkdir()
    (tmp_path / "components" / "a.py").write_text("from components import b\n")
    (tmp_path / "components" / "b.py").write_text(
        "def _hidden(): ...\nKINDS = {'x': 'components.d:Kind'}\n"
    )
    (tmp_path / "components" / "c.py").write_text("from components.b import _hidden\n")
    (tmp_path / "components" / "d.py").write_text("from components import b\nclass Kind: ...\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  a:\n    cmd: python -m components.a\n    deps: [components/a.py]\n"
    )
    # b names d as "module:Name", imported by name when first used (as the registry names the
    # built-in kinds): d is in a's closure too, and d importing b is not an import cycle.
    assert differences(tmp_path) == {"a": (["components/b.py", "components/d.py"], [])}
    assert import_graph(tmp_path).cycles() == []
    assert import_graph(tmp_path).private == ["components.c imports components.b._hidden"]


def test_test_modules_share_helpers_not_each_other():
    """What several test files need lives in tests/conftest.py or a helper module (helpers,
    gate_project, tiny_models, log_lines, ...), never in another test_*.py file."""
    import ast
    from pathlib import Path

    found = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""] if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names] if isinstance(node, ast.Import)
                else []
            )  # fmt: skip
            found += [f"{path.name} imports {n}" for n in names if n.startswith("tests.test_")]
    assert found == []


def test_every_server_command_we_print_or_document_binds_loopback():
    """A `bentoml serve <target>` or `prefect server start ...` line in the README, the docs,
    the Makefile, or the code's messages and docstrings names `--host 127.0.0.1`: the bare
    commands bind every interface. (A mention such as "a bare `bentoml serve` binds 0.0.0.0"
    is prose, not a command, and is not matched.)"""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", root / "Makefile", *sorted((root / "docs").glob("*.md"))]
    for folder in ("flows", "deploy", "components", "bench", "tools"):
        files += sorted((root / folder).rglob("*.py"))
    command = re.compile(r"(bentoml serve|prefect server start)(?= [^`\s])")
    unbound = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if command.search(line) and "127.0.0.1" not in line
    ]
    assert len(files) > 40 and unbound == []
