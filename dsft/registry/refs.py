"""Adapter references: ``domain``, ``domain@1.2.0`` or ``domain@TAG``.

Every name that reaches the database or the file system passes through here first. The grammars
are closed (no ``/``, ``..``, whitespace, quotes or ``;``), so a ref can be used as a directory name
and is never interpreted by SQL; queries are parameterised anyway.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from dsft.adapter_format import DOMAIN_RE, DOMAIN_RULE
from dsft.errors import UsageError

MAX_NAME = 64

TAG_PATTERN = r"[A-Za-z][A-Za-z0-9_.-]{0,63}"
KIND_PATTERN = r"[a-z][a-z0-9+_-]{0,31}"
# Semantic Versioning 2.0.0 (https://semver.org), the official regex less the build metadata part:
# ``+`` has no precedence meaning and two versions differing only by it would share a directory.
VERSION_PATTERN = (
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
)

_TAG = re.compile(TAG_PATTERN, re.ASCII)
_KIND = re.compile(KIND_PATTERN, re.ASCII)
VERSION_RE = re.compile(VERSION_PATTERN, re.ASCII)

#: ``domain@latest`` means the same as ``domain``; it cannot be assigned as a tag.
LATEST = "latest"

REF_HELP = "write refs as DOMAIN, DOMAIN@1.2.0 or DOMAIN@TAG (e.g. finance@production)"
TAG_RULE = f"1-{MAX_NAME} characters of letters, digits, '_', '.' or '-', starting with a letter (e.g. production)"
VERSION_RULE = "a semantic version MAJOR.MINOR.PATCH such as 1.2.0 (no leading zeros, no leading 'v')"


def _show(value: object) -> str:
    """A short, printable rendering of user input for error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_domain(name: str) -> str:
    """Check a domain name.

    Args:
        name: e.g. ``finance``.
    Returns:
        The name unchanged.
    Raises:
        UsageError: when it does not match ``[a-z][a-z0-9_-]{0,63}``.
    """
    if not isinstance(name, str) or not DOMAIN_RE.fullmatch(name):
        raise UsageError(f"bad domain name {_show(name)}: use {DOMAIN_RULE}")
    return name


def validate_version(version: str) -> str:
    """Check a semantic version (``MAJOR.MINOR.PATCH`` with an optional ``-prerelease``).

    Raises:
        UsageError: when it is not one, or is longer than 64 characters.
    """
    if not isinstance(version, str) or len(version) > MAX_NAME or not VERSION_RE.fullmatch(version):
        raise UsageError(f"bad version {_show(version)}: use {VERSION_RULE}")
    return version


def validate_tag(tag: str) -> str:
    """Check a tag name such as ``production``.

    Raises:
        UsageError: when it does not match ``[A-Za-z][A-Za-z0-9_.-]{0,63}`` or is the reserved ``latest``.
    """
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise UsageError(f"bad tag {_show(tag)}: use {TAG_RULE}")
    if tag == LATEST:
        raise UsageError("'latest' is reserved (DOMAIN@latest always means the newest version); pick another tag name")
    return tag


def validate_kind(kind: str) -> str:
    """Check an adapter kind such as ``lora``, ``lora+terms`` or ``esft``.

    Raises:
        UsageError: when it does not match ``[a-z][a-z0-9+_-]{0,31}``.
    """
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise UsageError(f"bad adapter kind {_show(kind)}: use e.g. lora, lora+terms or esft")
    return kind


@dataclass(frozen=True)
class Ref:
    """A parsed adapter ref. At most one of ``version`` and ``tag`` is set; neither means latest."""

    domain: str
    version: str | None = None
    tag: str | None = None

    def __str__(self) -> str:
        selector = self.version or self.tag
        return f"{self.domain}@{selector}" if selector else self.domain


def parse_ref(text: str) -> Ref:
    """Parse ``domain``, ``domain@latest``, ``domain@1.2.0`` or ``domain@TAG``.

    Args:
        text: the ref as the user typed it.
    Returns:
        A :class:`Ref`; ``domain@latest`` parses to ``Ref(domain)``.
    Raises:
        UsageError: for anything else (path separators, ``..``, empty or overlong parts, quotes...).
    """
    if not isinstance(text, str) or not text:
        raise UsageError(f"empty adapter ref: {REF_HELP}")
    if len(text) > 2 * MAX_NAME + 1:
        raise UsageError(f"adapter ref {_show(text)} is too long ({len(text)} characters): {REF_HELP}")
    domain, at, selector = text.partition("@")
    if not DOMAIN_RE.fullmatch(domain):
        raise UsageError(f"bad adapter ref {_show(text)}: the domain must be {DOMAIN_RULE}; {REF_HELP}")
    if not at or selector == LATEST:
        return Ref(domain)
    if selector[:1].isdigit():
        if len(selector) > MAX_NAME or not VERSION_RE.fullmatch(selector):
            raise UsageError(f"bad adapter ref {_show(text)}: the version must be {VERSION_RULE}")
        return Ref(domain, version=selector)
    if not _TAG.fullmatch(selector):
        raise UsageError(f"bad adapter ref {_show(text)}: after '@' give a version ({VERSION_RULE}) or a tag "
                         f"({TAG_RULE}); {REF_HELP}")
    return Ref(domain, tag=selector)
