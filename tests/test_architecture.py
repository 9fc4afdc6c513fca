"""The floors of docs/architecture.md, checked: no module imports a package above its own, no package cycle.

Imports are read from the source (``ast``), lazy ones inside functions included: a deferred import is
still a dependency. A new package or top-level module must be given a floor here (and in the document).
"""
from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).parents[1] / "dsft"

FLOORS: dict[str, int] = {
    # top: entry points
    "cli": 15, "testing": 14, "serve": 13, "lmeval": 13, "api": 12,
    # the library, top-down
    "runtime": 11, "recipes": 10, "eval": 9, "adapters": 8, "kernels": 7, "base": 6, "domains": 5, "data": 4,
    "registry": 3,
    # foundation: torch-free single modules every floor may use
    "adapter_format": 2, "extras": 1, "home": 1, "atomic": 1, "safe_yaml": 1, "errors": 0,
}
"""Package (or top-level module) of ``dsft`` -> its floor; ``api`` is ``dsft/__init__.py``. Higher may import lower."""


def package_of(path: Path, root: Path) -> str:
    """``dsft/recipes/runner.py`` -> ``recipes``; ``dsft/errors.py`` -> ``errors``; ``dsft/__init__.py`` -> ``api``."""
    parts = path.relative_to(root).with_suffix("").parts
    return "api" if parts == ("__init__",) else parts[0]


def package_imports(root: Path) -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the ``file:line`` of each import of it (other packages only)."""
    name = root.name
    out: dict[str, dict[str, list[str]]] = {}
    for path in sorted(root.rglob("*.py")):
        me = package_of(path, root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from dsft import errors` names a module; `from dsft.x import y` the package x
                targets = [f"{node.module}.{a.name}" for a in node.names] if node.module == name else [node.module]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                if parts[0] == name and len(parts) > 1 and parts[1] != me:
                    where = f"{path.relative_to(root.parent)}:{node.lineno}"
                    out.setdefault(me, {}).setdefault(parts[1], []).append(where)
    return out


def upward_imports(edges: Mapping[str, Mapping[str, list[str]]], floors: Mapping[str, int]) -> list[str]:
    """Each import of a package on a higher floor (or one with no floor), as ``where: a -> b``."""
    bad = []
    for a, targets in edges.items():
        for b, places in targets.items():
            if a not in floors or b not in floors or floors[b] >= floors[a]:
                bad += [f"{where}: {a} -> {b}" for where in places]
    return sorted(bad)


def package_cycles(edges: Mapping[str, Mapping[str, list[str]]]) -> list[list[str]]:
    """Cycles of the package graph (each once, from its first package in a depth-first walk)."""
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_package_imports_upward_and_there_is_no_cycle():
    edges = package_imports(ROOT)
    assert {p.name if p.is_dir() else p.stem for p in ROOT.iterdir()
            if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")} \
        <= set(FLOORS), "give the new package a floor in FLOORS and docs/architecture.md"
    assert upward_imports(edges, FLOORS) == []
    assert package_cycles(edges) == []


def test_registry_and_the_format_stay_below_torch():
    edges = package_imports(ROOT)
    assert not {"adapters", "kernels", "base", "eval", "recipes", "runtime"} & set(edges.get("registry", {}))
    assert set(edges.get("adapter_format", {})) <= {"atomic", "errors"}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path):
    pkg = _tree(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "import os\n\ndef f():\n    from pkg.high.b import g  # lazy, still upward\n    return g\n",
        "high/__init__.py": "",
        "high/b.py": "from pkg.low import a\nfrom pkg import errors\n\ndef g():\n    return a\n",
        "errors.py": "",
    })
    edges = package_imports(pkg)
    assert edges == {"low": {"high": ["pkg/low/a.py:4"]}, "high": {"low": ["pkg/high/b.py:1"], "errors": ["pkg/high/b.py:2"]}}
    floors = {"high": 2, "low": 1, "errors": 0}
    assert upward_imports(edges, floors) == ["pkg/low/a.py:4: low -> high"]
    assert package_cycles(edges) == [["high", "low", "high"]]
    # without the lazy import the floors hold and the graph is acyclic
    (pkg / "low/a.py").write_text("import os\n")
    edges = package_imports(pkg)
    assert upward_imports(edges, floors) == [] and package_cycles(edges) == []
    assert upward_imports(edges, {"high": 2, "errors": 0}) == ["pkg/high/b.py:1: high -> low"]  # no floor: reported
