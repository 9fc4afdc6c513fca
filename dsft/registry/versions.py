"""Semantic versions of adapters and the rule that picks the next one.

Retraining a domain bumps the minor version; training on a base whose architecture or tokenizer
differs from the one the latest version was trained on bumps the major, because the new adapter
cannot replace the old one on the old base (and vice versa).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import total_ordering
from typing import Any, Literal

from dsft.registry.refs import VERSION_RE, validate_version

FIRST_VERSION = "0.1.0"

Bump = Literal["major", "minor"]


@total_ordering
@dataclass(frozen=True)
class Version:
    """A parsed semantic version, ordered by SemVer 2.0 precedence (``1.0.0-rc.1 < 1.0.0``)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``MAJOR.MINOR.PATCH[-pre]``.

        Raises:
            UsageError: when ``text`` is not a semantic version.
        """
        m = VERSION_RE.fullmatch(validate_version(text))
        assert m is not None
        pre = tuple(m.group(4).split(".")) if m.group(4) else ()
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre)

    def __str__(self) -> str:
        core = f"{self.major}.{self.minor}.{self.patch}"
        return f"{core}-{'.'.join(self.prerelease)}" if self.prerelease else core

    def _key(self) -> tuple:
        # A release sorts after its prereleases; numeric identifiers sort before alphanumeric ones.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, not self.prerelease, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def bump(self, kind: Bump) -> Version:
        """The next release after this one: ``1.2.3`` -> ``2.0.0`` (major) or ``1.3.0`` (minor)."""
        if kind == "major":
            return Version(self.major + 1, 0, 0)
        return Version(self.major, self.minor + 1, 0)


def latest(versions: Iterable[str]) -> str | None:
    """The highest of ``versions`` by SemVer precedence, or None when there are none."""
    parsed = [Version.parse(v) for v in versions]
    return str(max(parsed)) if parsed else None


def sort_versions(versions: Iterable[str]) -> list[str]:
    """``versions`` from oldest to newest."""
    return [str(v) for v in sorted(Version.parse(v) for v in versions)]


def bump_kind(previous_base: Mapping[str, Any] | None, new_base: Mapping[str, Any] | None) -> Bump:
    """Which part of the version a retrain on ``new_base`` bumps.

    Args:
        previous_base: fingerprint of the base the domain's latest version was trained on (None: unknown,
            e.g. an imported adapter).
        new_base: fingerprint of the base the new version is trained on (None: unknown).
    Returns:
        ``"major"`` when architecture or tokenizer hash differ, ``"minor"`` otherwise (or when unknown).
    """
    if not previous_base or not new_base:
        return "minor"
    for key in ("architecture", "tokenizer_hash"):
        if previous_base.get(key) and new_base.get(key) and previous_base[key] != new_base[key]:
            return "major"
    return "minor"


def next_version(existing: Iterable[str], previous_base: Mapping[str, Any] | None,
                 new_base: Mapping[str, Any] | None, taken: Iterable[str] = ()) -> str:
    """The version a new adapter of a domain gets.

    Args:
        existing: versions already registered for the domain.
        previous_base: fingerprint of the base the latest of ``existing`` was trained on.
        new_base: fingerprint of the base the new adapter is trained on.
        taken: further versions that must be skipped (e.g. directories left by an interrupted run).
    Returns:
        ``"0.1.0"`` for the first; otherwise the latest bumped per :func:`bump_kind`, bumped again
        while the result is in ``existing`` or ``taken``.
    """
    existing = set(existing)
    blocked = existing | set(taken)
    top = latest(existing)
    if top is None:
        candidate = Version.parse(FIRST_VERSION)
        kind: Bump = "minor"
    else:
        kind = bump_kind(previous_base, new_base)
        candidate = Version.parse(top).bump(kind)
    while str(candidate) in blocked:
        candidate = candidate.bump(kind)
    return str(candidate)
