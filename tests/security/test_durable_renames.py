"""Every rename that puts something in place is followed by an fsync of its directory: without it, a power cut
can undo a rename that the registry (or a checkpoint's latest.json) already points at."""
from __future__ import annotations

import ast
from pathlib import Path

import dsft

SYNCS = {"fsync_dir", "publish_dir"}


def _called(node: ast.AST) -> tuple[list[int], set[str]]:
    """Lines of the renames in ``node`` (os.rename, os.replace, PATH.rename) and the names it calls."""
    renames, names = [], set()
    for sub in ast.walk(node):
        if not isinstance(sub, ast.Call):
            continue
        func = sub.func
        if isinstance(func, ast.Name):
            names.add(func.id)
        elif isinstance(func, ast.Attribute):
            names.add(func.attr)
            is_os = isinstance(func.value, ast.Name) and func.value.id == "os"
            if func.attr == "rename" or (is_os and func.attr == "replace"):
                renames.append(sub.lineno)
    return renames, names


def test_every_function_that_renames_into_place_syncs_the_directory():
    unsynced = []
    for path in Path(dsft.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                renames, names = _called(node)
                if renames and not names & SYNCS:
                    unsynced.append(f"{path.name}:{node.name}:{renames}")
    assert unsynced == []


def test_the_check_sees_a_rename_without_a_sync():
    renames, names = _called(ast.parse("def f(tmp, out):\n    tmp.rename(out)\n"))
    assert renames == [2] and not names & SYNCS
