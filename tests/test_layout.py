"""The package layout: imports go one way, folders say what they hold, modules stay readable.

Every import of ``envs`` and ``pipeline`` is read from the source (``ast``), function-local
ones included, so a circle held together by a lazy import fails here as well as one at
import time.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("envs", "pipeline")
MAX_LINES = 400
"""Longer modules state why in their opening docstring, with the words "400 lines"."""


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the two packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its file."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            # ``from pipeline.x import y`` imports the module pipeline.x.y when there is one.
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def folder(module: str) -> str:
    """The floor a module lives on: ``envs``, a folder ``pipeline.<sub>``, or a module of its
    own at the top of ``pipeline`` (``pipeline.torch_utils``, ``pipeline.__main__``)."""
    parts = module.split(".")
    return parts[0] if parts[0] == "envs" else ".".join(parts[:2])


def test_no_module_imports_in_a_circle():
    circles = cycles(graph())
    assert not circles, f"import circles: {circles}"


def test_no_folder_imports_in_a_circle():
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph().items():
        for target in targets:
            if folder(module) != folder(target):
                edges[folder(module)].add(folder(target))
    circles = cycles(dict(edges))
    assert not circles, f"folders that import each other: {circles}"


def test_envs_never_imports_pipeline():
    offenders = {
        m: sorted(t for t in targets if t.startswith("pipeline"))
        for m, targets in graph().items()
        if m.startswith("envs")
    }
    assert not {m: t for m, t in offenders.items() if t}


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", sorted(modules()))
def test_long_modules_say_why(module):
    path = modules()[module]
    lines = len(path.read_text().splitlines())
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "400 lines" in doc, (
        f"{path.relative_to(ROOT)} has {lines} lines; split it or say in its docstring why "
        "it is longer than 400 lines"
    )


def test_every_folder_says_what_it_holds():
    for init in sorted((ROOT / "pipeline").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split(".")) <= 4, f"{init.relative_to(ROOT)}: one or two sentences"
