"""Where domain packs live: find one by name or path, list them, and make a user domain from a term list.

Lookup order for a name: ``$DSFT_HOME/domains/<name>.yaml`` (user domains), then the built-in packs.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from dsft.adapter_format import DOMAIN_RE, LORA_GROUPS
from dsft.atomic import write_text_atomic
from dsft.domains.pack import BUILTIN_DOMAINS, GENERAL, PACKS_DIR, DomainPack, load_pack, parse_pack
from dsft.errors import DataError, NotFoundError, UsageError, show
from dsft.home import dsft_home

# "term: definition" needs a space after the colon, so a term like "ratio 3:1" stays whole.
_TERM_LINE = re.compile(r"(?P<term>.+?)\s*:\s+(?P<definition>.+)")


def user_domains_dir() -> Path:
    return dsft_home() / "domains"


def validate_domain_name(name: str) -> str:
    """Return ``name`` if it is a valid domain name (``[a-z][a-z0-9_-]{0,63}``).

    Raises:
        UsageError: empty, a path, or other characters; the message says how to fix it.
    """
    if not name:
        raise UsageError("domain name is empty; give a name like 'finance' (see `dsft domains list`)")
    if "/" in name or "\\" in name or ".." in name:
        raise UsageError(
            f"domain name {show(name)} contains a path separator or '..'; a name is lower-case letters, digits, '-' and '_' "
            "(e.g. 'finance'); to use a pack file give its path ending in .yaml, e.g. --domain path/to/domain.yaml"
        )
    if not DOMAIN_RE.fullmatch(name):
        suggestion = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_") or "my-domain"
        if not suggestion[0].isalpha():
            suggestion = "d-" + suggestion
        raise UsageError(
            f"domain name {show(name)} is not valid: use 1-64 characters, a lower-case letter first, then lower-case "
            f"letters, digits, '-' or '_' (e.g. {suggestion[:64]!r})"
        )
    return name


def builtin_pack(name: str) -> DomainPack:
    """The shipped pack ``name`` (finance, legal, medical or general), ignoring user domains."""
    return load_pack(PACKS_DIR / f"{name}.yaml", builtin=True)


def general_pack() -> DomainPack:
    """The general-knowledge pack: tokenizer text, replay data and the forgetting measure; not a domain."""
    return builtin_pack(GENERAL)


def _user_pack(path: Path) -> DomainPack:
    pack = load_pack(path)
    if pack.name != path.stem:
        raise UsageError(f"{path}: name: the pack is named {pack.name!r} but its file is {path.name}; make them agree")
    return pack


def list_domains() -> list[DomainPack]:
    """The built-in domains (finance, legal, medical) and the user domains, by name.

    A user domain with a built-in's name replaces it, as :func:`resolve_domain` does.
    """
    packs = {name: builtin_pack(name) for name in BUILTIN_DOMAINS}
    user_dir = user_domains_dir()
    if user_dir.is_dir():
        for path in sorted(user_dir.glob("*.yaml")):
            if DOMAIN_RE.fullmatch(path.stem) and path.stem != GENERAL:
                packs[path.stem] = _user_pack(path)
    return [packs[name] for name in sorted(packs)]


def _available() -> str:
    return ", ".join(p.name for p in list_domains())


def resolve_domain(name_or_path: str) -> DomainPack:
    """The pack a ``--domain`` argument means: a pack file by path, else a user or built-in domain by name.

    Raises:
        UsageError: an invalid name, or a pack file with problems.
        NotFoundError: no such file or domain; the message lists the available domains.
    """
    if name_or_path.endswith((".yaml", ".yml")):  # only a .yaml path is read as a pack: never echo another file's lines
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return load_pack(path)
        raise NotFoundError(f"domain file {path} does not exist; check the path, or give a domain name ({_available()})")
    validate_domain_name(name_or_path)
    user_path = user_domains_dir() / f"{name_or_path}.yaml"
    if user_path.is_file():
        return _user_pack(user_path)
    if name_or_path in BUILTIN_DOMAINS:
        return builtin_pack(name_or_path)
    raise NotFoundError(
        f"unknown domain {show(name_or_path)}; available domains: {_available()}. "
        "Run `dsft domains list`, give a pack file with --domain path/to/domain.yaml, "
        "or make one with `dsft domains new`"
    )


MAX_TERM_CHARS = 200
"""A domain term is a word or a short phrase; longer lines are refused (they would become one token each)."""


def _read_terms(name: str, terms_file: Path) -> dict[str, str]:
    from dsft.safe_yaml import read_text

    # The config reader's guarantees: a regular file (no FIFO, device or link to /dev/zero), bounded, UTF-8.
    try:
        lines = read_text(terms_file, "terms file").splitlines()
    except UsageError as exc:
        raise DataError(str(exc)) from None
    terms: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" in line:
            term, _, definition = (part.strip() for part in line.partition("\t"))
        elif match := _TERM_LINE.fullmatch(line):
            term, definition = match["term"], match["definition"].strip()
        else:
            term, definition = line, ""
        if not term:
            raise DataError(f"{terms_file}:{lineno}: the line has a definition but no term")
        if len(term) > MAX_TERM_CHARS:
            raise DataError(f"{terms_file}:{lineno}: a term of {len(term):,} characters; a term is at most {MAX_TERM_CHARS} "
                            "(one word or a short phrase per line)")
        if term.casefold() in first_line:
            raise DataError(f"{terms_file}:{lineno}: duplicate term {term!r} (first on line {first_line[term.casefold()]}); remove one")
        first_line[term.casefold()] = lineno
        terms[term] = definition  # none given stays none: an invented one would become a training target
    if not terms:
        raise DataError(f"{terms_file}: no terms found; write one term per line, optionally 'term<TAB>definition' or 'term: definition'")
    return terms


def _check_data(values: list[str | Path], fields: tuple[tuple[str, str], ...]) -> list[str]:
    """Read every record of the data once (streamed) so a bad line fails now; return the absolute paths."""
    from dsft.data.source import as_sources

    paths = []
    for src in as_sources(values, fields=fields):
        if not os.path.lexists(Path(src.location).expanduser()):
            raise DataError(f"data file not found: {src.location}; domains keep local data files and directories")
        for _ in src.records():
            pass
        paths.append(str(Path(src.location).expanduser().resolve()))
    return paths


def data_records(path: str | Path, fields: tuple[tuple[str, str], ...] = ()) -> int:
    """How many training records a domain data file or directory holds, read as ``dsft train --data`` reads it.

    Raises:
        DataError: a missing, empty or malformed file (naming the file and line).
    """
    from dsft.data.source import DataSource

    return sum(1 for _ in DataSource(str(path), fields=fields).records())


def new_domain(name: str, terms_file: Path, data_file: str | Path | Sequence[str | Path] | None = None,
               description: str = "", fields: tuple[tuple[str, str], ...] = ()) -> Path:
    """Make user domain ``name`` from a term list (and optionally data, as `dsft train --data` takes it); return its YAML path.

    The pack uses the generic fillers and templates; edit the written YAML to add your own.

    Args:
        name: the new domain's name (``[a-z][a-z0-9_-]{0,63}``).
        terms_file: one term per line, optionally ``term<TAB>definition`` or ``term: definition``;
            blank lines and ``#`` comments are skipped. A term without a definition keeps none.
        data_file: what ``dsft train --data`` reads: one or more data files or directories (globs
            expanded), every record checked now; stored by absolute path. It trains (as source
            ``domain.user``) whenever the domain trains, and replaces the generated template text.
        fields: the ``--field`` mapping the data is read with; stored in the pack as ``data_fields``.
        description: one line; a default naming the term count is used when empty.

    Raises:
        UsageError: invalid name, or the domain already exists (built-in or user).
        NotFoundError: the terms file does not exist.
        DataError: an unreadable or empty terms file, or a malformed data file (naming the line).
    """
    validate_domain_name(name)
    path = user_domains_dir() / f"{name}.yaml"
    if name in BUILTIN_DOMAINS or name == GENERAL:
        raise UsageError(f"domain {name!r} already exists as a built-in pack; choose another name")
    if path.exists():
        raise UsageError(f"domain {name!r} already exists at {path}; choose another name, or edit or delete that file")
    terms = _read_terms(name, Path(terms_file))
    data = {
        "name": name,
        "description": description.strip() or f"User-defined domain {name} ({len(terms)} terms).",
        "default_recipe": "lora",
        "lora_targets": list(LORA_GROUPS),
        "terms": terms,
    }
    if data_file is not None:
        data["data_files"] = _check_data([data_file] if isinstance(data_file, (str, Path)) else list(data_file), fields)
        if fields:
            data["data_fields"] = dict(fields)
    header = (
        f"# Made by `dsft domains new {name}`. Run: dsft train --domain {name}\n"
        "# Optional keys: fillers, raw_templates, instruction_templates (generic ones are used when absent).\n"
    )
    text = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)
    parse_pack(text, path)  # refuse to write a pack that would not load back
    write_text_atomic(path, text)
    return path
