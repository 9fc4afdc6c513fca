"""Which attached adapter a request names, decided once at the boundary.

A request names its adapter as ``finance``, ``finance@0.1.0`` or ``finance@production``. The server (or
the Python caller) turns that into an :class:`AdapterHandle` before the request is queued, so the batch
below never looks a ref up again (as vLLM's ``LoRARequest``). Tags are read from the runtime's open
registry through a :class:`TagCache`: a request never opens a registry, and a tag moved with ``dsft
registry tag`` is seen within ``ttl_s`` (at once after this runtime's own attach or detach).

The same rule picks a version everywhere a bare domain is given: the ``production`` tag when it exists
(for ``attach``: in the registry; for a request: among the attached versions), else the newest version.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from dsft.errors import NotFoundError, UsageError
from dsft.registry.refs import parse_ref
from dsft.registry.versions import Version
from dsft.runtime.records import AdapterInfo

DEFAULT_TAG = "production"
"""The tag a bare domain means first (``--adapter finance`` takes ``finance@production`` when it exists)."""


@dataclass(frozen=True)
class AdapterHandle:
    """An attached adapter, as a request resolved it: everything below the boundary works with this."""

    domain: str
    version: str

    @property
    def key(self) -> str:
        """The name the runtime's tables hold this adapter under (its full ref)."""
        return f"{self.domain}@{self.version}"

    ref = key


def pick_version(versions: Iterable[str], tagged: str | None) -> str:
    """The version a bare domain means among ``versions``: ``tagged`` (the default tag's) when it is one
    of them, else the newest by SemVer precedence.

    Raises:
        ValueError: ``versions`` is empty.
    """
    versions = list(versions)
    if not versions:
        raise ValueError("no versions to pick from")
    if tagged is not None and tagged in versions:
        return tagged
    return max(versions, key=Version.parse)


class TagCache:
    """``(domain, tag) -> version`` from the registry, each answer kept for ``ttl_s`` seconds.

    Args:
        lookup: ``lookup(domain, tag)`` gives the version the tag points at, or None when there is no
            such tag (it may raise for a broken registry: that is reported, never taken as "no tag").
        ttl_s: how long an answer is trusted; :meth:`invalidate` forgets them all at once.
    """

    def __init__(self, lookup: Callable[[str, str], str | None], *, ttl_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self._lookup = lookup
        self._ttl = ttl_s
        self._clock = clock
        self._answers: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def version(self, domain: str, tag: str) -> str | None:
        """The version ``domain@tag`` points at (None: no such tag)."""
        now = self._clock()
        with self._lock:
            hit = self._answers.get((domain, tag))
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        answer = self._lookup(domain, tag)
        with self._lock:
            self._answers[(domain, tag)] = (now, answer)
        return answer

    def invalidate(self) -> None:
        """Forget every answer (after an attach or detach, which may follow a tag move)."""
        with self._lock:
            self._answers.clear()


def resolve_attached(adapter: str, base: str, attached: Sequence[AdapterInfo], tags: TagCache) -> AdapterHandle:
    """The handle of the attached adapter ``adapter`` names, among ``attached`` (a snapshot).

    ``finance@0.1.0`` names that version; ``finance@TAG`` the version the tag points at; ``finance`` the one
    attached version, or among several the production-tagged one, else the newest (:func:`pick_version`).

    Raises:
        NotFoundError: nothing attached by that name (listing what is). RegistryError: a tag could not be read.
    """
    names = [a.ref for a in attached]
    try:
        ref = parse_ref(adapter)
    except UsageError:  # not a ref at all (another model's name): simply not attached here
        raise not_attached(str(adapter), base, names) from None
    versions = [a.version for a in attached if a.domain == ref.domain]
    if ref.version is not None:
        version = ref.version
    elif ref.tag is not None:
        version = tags.version(ref.domain, ref.tag)
    elif not versions:
        version = None
    else:  # only a bare domain with several versions attached asks for its tag; DOMAIN@latest never does
        tagged = tags.version(ref.domain, DEFAULT_TAG) if len(versions) > 1 and "@" not in adapter else None
        version = pick_version(versions, tagged)
    if version not in versions:
        raise not_attached(adapter, base, names)
    return AdapterHandle(ref.domain, version)


def not_attached(adapter: str, base: str, attached: Iterable[str]) -> NotFoundError:
    """The error for a request naming an adapter that is not attached (lists what is)."""
    listing = ", ".join(sorted(attached)) or "none"
    shown = adapter if len(adapter) <= 80 else adapter[:77] + "..."
    return NotFoundError(f"adapter {shown!r} is not attached to {base} (attached: {listing}); attach it first")


def tag_version(registry, domain: str, tag: str) -> str | None:
    """The version ``domain@tag`` points at in ``registry`` (None: no such tag or domain).

    Raises:
        RegistryError: the registry could not be read.
    """
    try:
        return registry.resolve(f"{domain}@{tag}").version
    except NotFoundError:
        return None


def choose(registry, ref: str):
    """The registry's adapter for ``ref`` and how it was picked: a bare domain takes its ``production``
    tag when there is one, else its newest version; ``DOMAIN@latest`` the newest.

    Returns:
        ``(AdapterRecord, via)``; ``via`` is ``"production tag"``, ``"newest version"``, ``"TAG tag"``, or None
        when the version was named.
    Raises:
        UsageError: malformed ref. NotFoundError: nothing by that ref (the message lists what exists).
    """
    parsed = parse_ref(ref)
    if parsed.version is not None:
        return registry.resolve(ref), None
    if parsed.tag is not None:
        return registry.resolve(ref), f"{parsed.tag} tag"
    if "@" not in ref:
        try:
            return registry.resolve(f"{parsed.domain}@{DEFAULT_TAG}"), f"{DEFAULT_TAG} tag"
        except NotFoundError:
            pass  # no production tag: the newest version, below
    return registry.resolve(parsed.domain), "newest version"
