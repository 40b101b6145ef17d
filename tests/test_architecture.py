"""The house's shape: declared floors kept (`lint-imports`), no import cycles, no private names shared.

The cycle and private-name checks read the package's own source with `ast`, independently of
import-linter: every `import` counts, the ones inside functions too (they are edges all the
same, only run later); imports under `if TYPE_CHECKING:` do not (they never run). Each check is
also run on a small package written here with the very fault it looks for, so it can fail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = "lora_tools"


def _modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name → file, for every module of the package under `root`."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skipped |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    return skipped


def _imports(module: str, path: Path, modules: dict[str, Path]):
    """(imported module, imported name or None, line) for every import of `module` that runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_blocks(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                yield base, alias.name, node.lineno


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module → the package's modules it imports (a `from pkg import sub` names the submodule)."""
    modules = _modules(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        for base, name, _ in _imports(module, path, modules):
            target = f"{base}.{name}" if name and f"{base}.{name}" in modules else base
            while target and target not in modules:  # `import a.b.c` of an attribute path: its module
                target = target.rpartition(".")[0]
            if target.startswith(package) and target != module:
                graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def private_imports(root: Path, package: str) -> list[str]:
    """Every place a module takes a `_private` name from another of the package's modules."""
    modules = _modules(root, package)
    found = []
    for module, path in modules.items():
        aliases = {}
        for base, name, line in _imports(module, path, modules):
            if not base.startswith(package):
                continue
            if name and name.startswith("_") and not name.startswith("__") and f"{base}.{name}" not in modules:
                found.append(f"{path.relative_to(root)}:{line}: {base}.{name}")
            if name and f"{base}.{name}" in modules:
                aliases[name] = f"{base}.{name}"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return found


def _write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


@pytest.fixture
def faulty_package(tmp_path):
    """`low` imports `high` inside a function (a cycle); `high` takes `_secret`; one import is TYPE_CHECKING only."""
    _write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/high.py": """
                from .low import _secret, visible

                def use():
                    return visible()
            """,
            "pkg/low.py": """
                from typing import TYPE_CHECKING

                if TYPE_CHECKING:
                    from .typed import Hint

                _secret = 1

                def visible():
                    from . import high
                    return high
            """,
            "pkg/typed.py": """
                from .low import visible

                class Hint:
                    pass
            """,
            "pkg/other.py": """
                from . import low

                def peek():
                    return low._secret
            """,
        },
    )
    return tmp_path


def test_the_checks_find_what_they_look_for(faulty_package):
    graph = import_graph(faulty_package, "pkg")
    assert graph["pkg.low"] == {"pkg.high"}, "a function-level import is an edge; a TYPE_CHECKING one is not"
    assert cycles(graph) == [["pkg.high", "pkg.low"]]
    assert private_imports(faulty_package, "pkg") == [
        "pkg/high.py:2: pkg.low._secret",
        "pkg/other.py:5: pkg.low._secret",
    ]


def test_no_import_cycles_counting_imports_inside_functions():
    graph = import_graph(REPO, PACKAGE)
    assert len(graph) > 100 and sum(map(len, graph.values())) > 300, "the walk must see the whole package"
    assert cycles(graph) == []


def test_no_private_name_is_imported_across_modules():
    assert private_imports(REPO, PACKAGE) == []


def test_lint_imports_keeps_every_declared_contract():
    """`lint-imports` reads the contracts in pyproject.toml: the floors, the adapter registry, the CLI, the
    commands' independence and acyclic siblings. Function-level imports count there too (grimp reads them)."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--no-logo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 kept, 0 broken" in done.stdout, done.stdout


def test_lint_imports_breaks_on_an_import_up_the_floors(tmp_path):
    """The same contracts over a copy of the package with one function-level import from `io` up to `commands`."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(REPO / PACKAGE, copy / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    card = copy / PACKAGE / "io" / "card.py"
    card.write_text(card.read_text() + "\n\ndef _upward():\n    from ..commands import merge\n\n    return merge\n")
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--no-logo", "--contract", "floors"],
        cwd=copy,
        env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "lora_tools.io.card -> lora_tools.commands.merge" in done.stdout, done.stdout
