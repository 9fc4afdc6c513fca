"""YAML for config files (recipes, domain packs), bounded: an alias bomb is refused before it is built.

PyYAML's safe loader shares an aliased node between its uses, so ``*x`` nested ten deep with nine
aliases each parses into a small object that expands to 9^10 leaves the moment anything walks it
(validation, ``repr`` in an error message, ``json.dumps``). The node tree is therefore measured as if
every alias were expanded, before construction, and refused past :data:`MAX_NODES` or :data:`MAX_DEPTH`.

A key given twice in one mapping is refused at construction (PyYAML keeps the last one silently, so
``lr: 2.0e-3`` then ``lr: 5.0`` would train at 5.0), with the key's dotted path and both lines.
Every error is one line: PyYAML's own messages span several, they are joined with the position.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dsft.errors import UsageError

MAX_BYTES = 16 << 20
"""Largest config file read (the largest shipped domain pack is ~40 kB)."""
MAX_NODES = 200_000
"""Most YAML nodes (scalars, lists, mappings) a document may expand to, aliases counted at every use."""
MAX_DEPTH = 64
"""Deepest nesting of lists and mappings."""

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE = "tag:yaml.org,2002:merge"


def _yaml_error(source: str, exc: yaml.YAMLError) -> UsageError:
    """One line for a PyYAML error: what is wrong and where (PyYAML's ``str`` spans several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown position"
        what = "; ".join(part for part in (exc.context, exc.problem) if part) or "unreadable"
    else:
        where, what = "an unknown position", str(exc)
    what = " ".join(what.split())[:200]
    return UsageError(f"{source}: malformed YAML at {where}: {what}")


def _path_of(root: yaml.Node, target: yaml.Node) -> list[str]:
    """The keys and indexes leading from ``root`` to ``target`` (the first way there, aliases followed once)."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, list[str]]] = [(root, [])]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, [*path, str(i)]) for i, child in reversed(list(enumerate(node.value))))
        elif isinstance(node, yaml.MappingNode):
            stack.extend((value, [*path, str(key.value) if isinstance(key, yaml.ScalarNode) else "?"])
                         for key, value in reversed(node.value))
    return []


class _Constructor(_Loader):
    """The safe loader's constructor, refusing a key given twice in one mapping."""

    def __init__(self, root: yaml.Node, source: str, refuse_duplicates: bool = True):
        super().__init__("")
        self.root, self.source, self.refuse_duplicates = root, source, refuse_duplicates

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False):
        if not self.refuse_duplicates:
            return super().construct_mapping(node, deep=deep)
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:  # before merging: a key may override one that ``<<`` brings
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base constructor refuses it, with its position
                continue
            if earlier is not key_node:
                dotted = ".".join([*_path_of(self.root, node), str(key)])
                raise UsageError(f"{self.source}: duplicate key '{dotted}' at line {key_node.start_mark.line + 1} "
                                 f"(first at line {earlier.start_mark.line + 1}); keep only one of them")
        return super().construct_mapping(node, deep=deep)


def expanded_size(node: yaml.Node | None, source: str) -> int:
    """How many nodes ``node`` becomes once every alias is expanded.

    Raises:
        UsageError: more than :data:`MAX_NODES`, nesting deeper than :data:`MAX_DEPTH`, or an alias
            that contains itself.
    """
    sizes: dict[int, int] = {}  # an aliased node is one object: measure it once, count it at every use

    def size(n: yaml.Node, depth: int, open_: set[int]) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if depth > MAX_DEPTH:
            raise UsageError(f"{source}: nested deeper than {MAX_DEPTH} levels; flatten it")
        if id(n) in open_:
            raise UsageError(f"{source}: an alias refers to the node that contains it; remove the recursive alias")
        total = 1
        if isinstance(n, (yaml.SequenceNode, yaml.MappingNode)):
            open_.add(id(n))
            children = n.value if isinstance(n, yaml.SequenceNode) else [c for kv in n.value for c in kv]
            for child in children:
                total += size(child, depth + 1, open_)
                if total > MAX_NODES:
                    raise UsageError(f"{source}: expands to more than {MAX_NODES:,} values (aliases counted at each use); "
                                     "a config this large is an alias bomb or a mistake")
            open_.discard(id(n))
        sizes[id(n)] = total
        return total

    return 0 if node is None else size(node, 0, set())


def compose(text: str, source: str) -> yaml.Node | None:
    """The node tree of one YAML document, measured by :func:`expanded_size` (nothing constructed yet).

    Raises:
        UsageError: malformed YAML (with line and column) or a document past the bounds.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from None
    finally:
        loader.dispose()
    expanded_size(node, source)
    return node


def construct(node: yaml.Node | None, source: str, *, refuse_duplicates: bool = True) -> Any:
    """Plain Python data of a node tree from :func:`compose`.

    ``refuse_duplicates=False`` keeps the last of two equal keys, for a caller that reports duplicates
    itself among its other problems (domain packs: :func:`dsft.domains.pack.load_pack`).

    Raises:
        UsageError: a key given twice in one mapping (its dotted path and lines), or a tag the safe
            loader does not construct (``!!python/...``), with its position.
    """
    if node is None:
        return None
    loader = _Constructor(node, source, refuse_duplicates)
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from None
    finally:
        loader.dispose()


def loads(text: str, source: str) -> Any:
    """Parse one YAML document of a config, bounded (see the module docstring)."""
    return construct(compose(text, source), source)


def read_text(path: Path, what: str = "config") -> str:
    """The text of a config file: a regular file, at most :data:`MAX_BYTES`, UTF-8.

    Raises:
        NotFoundError: no such file. UsageError: a directory, a device or FIFO, too large, or not UTF-8.
    """
    from dsft.errors import NotFoundError

    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{what} file {path} does not exist; check the path")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory; give a YAML file")
    if not path.is_file():
        raise UsageError(f"{what} {path} is not a regular file (a device, FIFO or socket); give a YAML file")
    if path.stat().st_size > MAX_BYTES:
        raise UsageError(f"{what} {path} is {path.stat().st_size:,} bytes; a config file is at most {MAX_BYTES:,}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_file(path: Path, what: str = "config") -> Any:
    """:func:`read_text` then :func:`loads`."""
    return loads(read_text(path, what), str(path))
