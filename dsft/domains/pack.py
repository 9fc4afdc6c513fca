"""A domain pack: a YAML file of terms, fillers and templates, loaded into a frozen dataclass.

Built-in packs live in ``dsft/domains/packs/``; user domains made by :func:`new_domain` live in
``$DSFT_HOME/domains/<name>.yaml`` and take precedence over a built-in of the same name.
Every problem in a file is reported at once, one ``<file>: <dotted.path>: <problem>`` line each.
"""
from __future__ import annotations

import difflib
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from dsft import safe_yaml
from dsft.adapter_format import DOMAIN_RE, LORA_GROUPS
from dsft.errors import UsageError

PACKS_DIR = Path(__file__).parent / "packs"
BUILTIN_DOMAINS = ("finance", "legal", "medical")
GENERAL = "general"
DEFAULTS_FILE = PACKS_DIR / "_defaults.yaml"
"""Generic fillers and templates for user packs that bring only terms (not itself a pack)."""
TERM_PLACEHOLDERS = ("term", "Term", "definition", "term2", "Term2", "definition2")
"""Placeholders every template may use besides the pack's fillers (``{org}``, or ``{Org}`` capitalised)."""
REQUIRED_KEYS = ("name", "description", "default_recipe", "lora_targets", "terms")
OPTIONAL_KEYS = ("fillers", "raw_templates", "instruction_templates", "data_files", "data_fields")
FILLER_RE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class InstructionTemplate:
    prompt: str
    response: str


@dataclass(frozen=True)
class DomainPack:
    """A loaded, validated domain pack. Tuples keep it hashable, so corpora can be cached per pack."""

    name: str
    description: str
    default_recipe: str
    """The recipe ``dsft train --domain <name>`` uses when none is given."""
    lora_targets: tuple[str, ...]
    """LoRA target groups: attention, shared_experts, routed_experts."""
    terms: tuple[tuple[str, str], ...]
    """(term, definition) pairs in file order; definitions end with a full stop, or are "" when the user gave none."""
    fillers: tuple[tuple[str, tuple[str, ...]], ...]
    """(name, values) pairs, the generic defaults included; ``{name}`` in a template becomes one of the values."""
    raw_templates: tuple[str, ...]
    instruction_templates: tuple[InstructionTemplate, ...]
    source: Path
    builtin: bool
    data_files: tuple[Path, ...] = ()
    """Absolute paths of the data files and directories the user attached with ``dsft domains new --data``:
    they train as source ``domain.user`` whenever the domain trains."""
    data_fields: tuple[tuple[str, str], ...] = ()
    """The ``--field`` mapping those files are read with ((dsft field, user column), ...)."""

    def data_sources(self) -> list:
        """The attached data as :class:`dsft.data.source.DataSource` objects (read with :attr:`data_fields`)."""
        from dsft.data.source import DataSource

        return [DataSource(str(p), fields=self.data_fields) for p in self.data_files]

    def filler(self, name: str) -> tuple[str, ...]:
        """The values of filler ``name``; KeyError if the pack has none by that name."""
        return dict(self.fillers)[name]

    def definition(self, term: str) -> str:
        return dict(self.terms)[term]


def capitalise(text: str) -> str:
    """Upper-case the first letter, except in words like ``pH`` or ``eGFR`` where that changes the meaning."""
    if not text or (len(text) > 1 and text[0].islower() and text[1].isupper()):
        return text
    return text[0].upper() + text[1:]


# ---------------------------------------------------------------- loading and validation


def _show(value: Any, limit: int = 60) -> str:
    """A short repr for messages: a wrong-typed ``terms`` must not print all 200 terms."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if FILLER_RE.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _parse_yaml(text: str, source: str) -> tuple[Any, list[tuple[str, str]]]:
    """Parse YAML into plain data plus (path, problem) pairs for duplicate mapping keys.

    PyYAML keeps the last of two equal keys without a word, which would silently drop a term,
    so duplicates are found on the node tree before construction.
    """
    node = safe_yaml.compose(text, source)  # bounded: an alias bomb is refused before anything walks it
    data = safe_yaml.construct(node, source, refuse_duplicates=False)  # found below, listed with every other problem
    problems: list[tuple[str, str]] = []
    _duplicate_keys(node, "", problems, set())
    return data, problems


def _duplicate_keys(node: Any, path: str, problems: list[tuple[str, str]], seen: set[int]) -> None:
    if id(node) in seen:  # an alias revisits a node; a recursive alias would never end
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in first_line:
                problems.append((_join(path, key), f"duplicate key (first on line {first_line[key]}, again on line {key_node.start_mark.line + 1})"))
            first_line.setdefault(key, key_node.start_mark.line + 1)
            _duplicate_keys(value_node, _join(path, key), problems, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, _join(path, i), problems, seen)


def _text(value: Any, path: str, problems: list[tuple[str, str]]) -> str | None:
    if not isinstance(value, str):
        problems.append((path, f"must be a string, got {_show(value)}"))
        return None
    if not value.strip():
        problems.append((path, "must not be empty"))
        return None
    return value.strip()


def _items(value: Any, path: str, kind: type, problems: list[tuple[str, str]]) -> Any:
    """``value`` if it is a non-empty ``kind`` (list or dict), else record why and return None."""
    if not isinstance(value, kind):
        problems.append((path, f"must be a {'list' if kind is list else 'mapping'}, got {_show(value)}"))
        return None
    if not value:
        problems.append((path, "must not be empty"))
        return None
    return value


def _placeholder_problem(template: str, known: set[str]) -> str | None:
    """Why ``template`` cannot be filled from ``known`` placeholders, or None if it can."""
    try:
        fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return f"{exc} (write a literal brace as {{{{ or }}}})"
    for name, conv, spec in fields:
        if not name or conv or spec or name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {{{close[0]}}}?" if close else f"; known: {', '.join('{' + k + '}' for k in sorted(known))}"
            return f"unknown placeholder {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}{hint}"
    return None


@lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    data, _ = _parse_yaml(DEFAULTS_FILE.read_text(), str(DEFAULTS_FILE))
    return data


def _fillers(value: Any, problems: list[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    fillers = {k: tuple(v) for k, v in _defaults()["fillers"].items()}
    if value is None or _items(value, "fillers", dict, problems) is None:
        return fillers
    for name, values in value.items():
        path = _join("fillers", str(name))
        if not isinstance(name, str) or not FILLER_RE.fullmatch(name) or name in TERM_PLACEHOLDERS:
            problems.append((path, f"filler names are lower-case identifiers other than {', '.join(TERM_PLACEHOLDERS)}, got {_show(name)}"))
            continue
        if _items(values, path, list, problems) is None:
            continue
        good = []
        for i, v in enumerate(values):
            # Years and counts read naturally unquoted in YAML; anything else must be a string.
            if isinstance(v, int) and not isinstance(v, bool):
                good.append(str(v))
            elif (v := _text(v, _join(path, i), problems)) is not None:
                good.append(v)
        fillers[name] = tuple(good)
    return fillers


def _terms(value: Any, problems: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    if _items(value, "terms", dict, problems) is None:
        return ()
    terms, seen = [], {}
    for raw_term, raw_def in value.items():
        path = _join("terms", str(raw_term))
        term = _text(raw_term, path, problems)
        # No definition (null or ""): the term is used in text, never given an invented definition (issue 20.1).
        definition = "" if raw_def is None or raw_def == "" else _text(raw_def, path, problems)
        if term is None or definition is None:
            continue
        if "\n" in term:
            problems.append((path, "a term must fit on one line"))
            continue
        if term.casefold() in seen:
            problems.append((path, f"duplicate of term {seen[term.casefold()]!r} (terms differ only in case)"))
            continue
        seen[term.casefold()] = term
        # Templates put {definition} at the end of a sentence, so it must end like one.
        terms.append((term, definition if not definition or definition[-1] in ".!?" else definition + "."))
    return tuple(terms)


def _templates(data: dict, known: set[str], problems: list[tuple[str, str]]) -> tuple[tuple[str, ...], tuple[InstructionTemplate, ...]]:
    raw_value = data.get("raw_templates", _defaults()["raw_templates"])
    raw: list[str] = []
    for i, template in enumerate(_items(raw_value, "raw_templates", list, problems) or ()):
        path = _join("raw_templates", i)
        if (template := _text(template, path, problems)) is None:
            continue
        if (why := _placeholder_problem(template, known)) is not None:
            problems.append((path, why))
        raw.append(template)
    pairs_value = data.get("instruction_templates", _defaults()["instruction_templates"])
    pairs: list[InstructionTemplate] = []
    for i, pair in enumerate(_items(pairs_value, "instruction_templates", list, problems) or ()):
        path = _join("instruction_templates", i)
        if not isinstance(pair, dict) or set(pair) != {"prompt", "response"}:
            problems.append((path, f"must be a mapping with exactly the keys prompt and response, got {_show(pair)}"))
            continue
        parts = {k: _text(pair[k], _join(path, k), problems) for k in ("prompt", "response")}
        for k, part in parts.items():
            if part is not None and (why := _placeholder_problem(part, known)) is not None:
                problems.append((_join(path, k), why))
        if None not in parts.values():
            pairs.append(InstructionTemplate(parts["prompt"], parts["response"]))
    return tuple(raw), tuple(pairs)


def _data_files(value: Any, base: Path, problems: list[tuple[str, str]]) -> tuple[Path, ...]:
    if value is None:
        return ()
    files = []
    for i, item in enumerate(_items(value, "data_files", list, problems) or ()):
        if (item := _text(item, _join("data_files", i), problems)) is None:
            continue
        path = (base / Path(item).expanduser()).resolve()  # relative paths are relative to the YAML file
        if not path.exists():
            problems.append((_join("data_files", i), f"file {path} does not exist; fix the path or remove the entry"))
        files.append(path)
    return tuple(files)


def _data_fields(value: Any, problems: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    from dsft.data.formats import parse_fields

    if value is None:
        return ()
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        problems.append(("data_fields", f"must map dsft field names to column names, e.g. {{response: answer}}, got {_show(value)}"))
        return ()
    try:
        return parse_fields([f"{k}={v}" for k, v in value.items()])
    except UsageError as e:
        problems.append(("data_fields", str(e).removeprefix("--field ")))
        return ()


def _report(source: str, problems: list[tuple[str, str]]) -> UsageError:
    lines = [f"{source}: {path or '<root>'}: {problem}" for path, problem in problems]
    if len(lines) == 1:
        return UsageError(lines[0])
    return UsageError(f"{len(lines)} problems in domain pack {source}:\n" + "\n".join(lines))


def parse_pack(text: str, source: Path, builtin: bool = False) -> DomainPack:
    """Validate pack YAML ``text`` as if read from ``source`` (which need not exist yet).

    Raises:
        UsageError: malformed YAML (with line and column), or every schema problem at once.
    """
    data, problems = _parse_yaml(text, str(source))
    if not isinstance(data, dict):
        raise _report(str(source), [("<root>", f"must be a mapping with keys {', '.join(REQUIRED_KEYS)}, got {type(data).__name__}")])
    for key in data:
        if key not in REQUIRED_KEYS + OPTIONAL_KEYS:
            close = difflib.get_close_matches(str(key), REQUIRED_KEYS + OPTIONAL_KEYS, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}"
            problems.append((_join("", str(key)), f"unknown key; {hint}"))
    problems.extend((key, "required key is missing") for key in REQUIRED_KEYS if key not in data)
    name = _text(data.get("name", "-"), "name", problems)
    if name is not None and not DOMAIN_RE.fullmatch(name):
        problems.append(("name", f"must match [a-z][a-z0-9_-]{{0,63}}, got {name!r}"))
    description = _text(data.get("description", "-"), "description", problems)
    recipe = _text(data.get("default_recipe", "-"), "default_recipe", problems)
    targets = _items(data.get("lora_targets", ["attention"]), "lora_targets", list, problems) or []
    for i, group in enumerate(targets):
        if group not in LORA_GROUPS:
            problems.append((_join("lora_targets", i), f"must be one of {', '.join(LORA_GROUPS)}, got {_show(group)}"))
        elif group in targets[:i]:
            problems.append((_join("lora_targets", i), f"{group} is listed twice"))
    terms = _terms(data.get("terms"), problems) if "terms" in data else ()
    fillers = _fillers(data.get("fillers"), problems)
    known = set(TERM_PLACEHOLDERS) | set(fillers) | {capitalise(filler) for filler in fillers}
    raw, pairs = _templates(data, known, problems)
    data_files = _data_files(data.get("data_files"), source.parent, problems)
    data_fields = _data_fields(data.get("data_fields"), problems)
    if problems:
        raise _report(str(source), problems)
    return DomainPack(
        name=name, description=description, default_recipe=recipe, lora_targets=tuple(targets),
        terms=terms, fillers=tuple(fillers.items()), raw_templates=raw, instruction_templates=pairs,
        source=source, builtin=builtin, data_files=data_files, data_fields=data_fields,
    )


def load_pack(path: str | Path, builtin: bool = False) -> DomainPack:
    """Load and validate the pack at ``path``.

    Raises:
        NotFoundError: ``path`` does not exist.
        UsageError: malformed YAML (with line and column), or every schema problem at once.
    """
    path = Path(path).expanduser()
    text = safe_yaml.read_text(path, "domain file")
    return parse_pack(text, path.absolute(), builtin)
