"""Build frozen dataclass trees from plain YAML/JSON data, reporting every problem at once.

Each problem names its dotted path and the bad value (``stages[1].lr: must be > 0, got -1e-05``).
A dataclass may define ``check(self) -> list[tuple[str, str]]`` returning (field, problem) pairs
for value rules that types cannot express.
"""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from dsft.errors import UsageError, show


class ConfigError(UsageError):
    """All problems of one config; ``problems`` is the list of ``path: message`` lines."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        head = f"{source}: {len(problems)} problem(s) — " if len(problems) > 1 else f"{source}: "
        super().__init__(head + "; ".join(problems))


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """Convert ``data`` to ``cls`` (recursively); append problems instead of raising."""
    origin = get_origin(cls)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(cls) if a is not type(None)]
        if data is None:
            return None
        return build(args[0], data, path, problems) if len(args) == 1 else data
    if origin is Literal:
        if data not in get_args(cls):
            problems.append(f"{path}: must be one of {_describe(cls)}, got {show(data)}")
        return data
    if origin is tuple:
        item = get_args(cls)[0]
        if isinstance(data, (str, bytes)) or not isinstance(data, (list, tuple)):
            problems.append(f"{path}: must be a list, got {show(data)}")
            return ()
        return tuple(build(item, v, _join(path, i), problems) for i, v in enumerate(data))
    if origin is dict:
        if not isinstance(data, dict):
            problems.append(f"{path}: must be a mapping, got {show(data)}")
            return {}
        return dict(data)
    if dataclasses.is_dataclass(cls):
        return _build_dataclass(cls, data, path, problems)
    if cls is float:
        value = data
        if isinstance(data, str):
            # PyYAML reads 2e-5 (no dot) as a string (YAML 1.1); accept what float() accepts.
            try:
                value = float(data)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: must be a number, got {show(data)}")
            return 0.0
        try:
            value = float(value)
        except OverflowError:  # an int past 1e308
            value = math.inf
        if not math.isfinite(value):  # .inf or .nan would train on NaN losses
            problems.append(f"{path}: must be a finite number, got {show(data)}")
            return 0.0
        return value
    if cls is int:
        if isinstance(data, bool) or not isinstance(data, int):
            problems.append(f"{path}: must be an integer, got {show(data)}")
            return 0
        return data
    if cls is bool:
        if not isinstance(data, bool):
            problems.append(f"{path}: must be true or false, got {show(data)}")
            return False
        return data
    if cls is str:
        if not isinstance(data, str):
            problems.append(f"{path}: must be a string, got {show(data)}")
            return ""
        return data
    return data


def _build_dataclass(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{path or '<root>'}: must be a mapping, got {show(data)}")
        return None
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            problems.append(f"{_join(path, key)}: unknown key (known: {', '.join(fields)})")
    kwargs, failed = {}, set()
    for name, f in fields.items():
        if name in data:
            n, where = len(problems), _join(path, name)
            kwargs[name] = build(hints[name], data[name], where, problems)
            if any(p.startswith(f"{where}: ") for p in problems[n:]):  # the field itself, not something inside it
                failed.add(name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{_join(path, name)}: required")
            failed.add(name)
    try:
        obj = cls(**kwargs)
    except TypeError:
        return None
    if hasattr(obj, "check"):
        # Value rules run even when a sibling is bad, so every problem shows at once; a rule about a
        # field that already failed its type check would only repeat it.
        try:
            found = obj.check()
        except (AttributeError, TypeError):
            if not failed:
                raise
            found = []  # a rule tripped over a child that failed to build; that failure is already reported
        problems.extend(f"{_join(path, field) if field else path or '<root>'}: {msg}"
                        for field, msg in found if field.split(".")[0].split("[")[0] not in failed)
    return obj


def to_data(obj: Any) -> Any:
    """The inverse of :func:`build`: plain lists/dicts suitable for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_data(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_data(v) for k, v in obj.items()}
    return obj


def load_tree(cls: type, data: Any, source: str) -> Any:
    """Build ``cls`` from ``data`` or raise one :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    obj = build(cls, data, "", problems)
    if problems:
        raise ConfigError(source, problems)
    return obj


def apply_override(data: dict, dotted: str) -> None:
    """Apply ``stages.1.lr=2e-5`` to plain recipe data in place (values parsed as YAML scalars)."""
    from dsft import safe_yaml

    if "=" not in dotted:
        raise UsageError(f"override {show(dotted)}: expected key.path=value, e.g. stages.0.lr=2e-5")
    key, raw = dotted.split("=", 1)
    try:
        value = safe_yaml.loads(raw, f"override {show(dotted)}")
    except UsageError as exc:
        raise UsageError(f"{exc} (the value is read as YAML)") from None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UsageError(f"override {key}: {'.'.join(parts[:i]) or 'root'} has {len(node)} item(s); {part!r} is not an index")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node:
                    raise UsageError(f"override {key}: no key {part!r} at {'.'.join(parts[:i]) or 'root'}")
                node = node[part]
        else:
            raise UsageError(f"override {key}: {'.'.join(parts[:i])} is a value, not a mapping or list")


