"""Which adapters stay attached to a serving runtime: an LRU budget, pins for running requests, attach on demand.

    residency = Residency(runtime, max_adapters=4, max_bytes=2 << 30, load_on_demand=True)
    handle = residency.acquire("finance")        # resolve + pin (NotFoundError when not resident)
    ...                                          # the request runs; its adapter cannot be evicted meanwhile
    residency.release(handle)                    # unpinned; its last use is now

A request pins its adapter from the moment it is resolved until its answer is sent, so eviction never
takes an adapter a queued or running request needs. Attaching beyond the budget (``max_adapters``
resident, ``max_bytes`` of factors and term rows) detaches the least recently used unpinned adapters;
when every other one is pinned, the new one is detached again and :class:`BudgetFull` says to retry.
With ``load_on_demand``, a request naming a registry adapter that is not resident attaches it first, with
the same checks as any attach (registry compatibility with this base, every file's sha256); one that
fails them is refused for that request only, naming the adapter and the reason.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

from dsft.errors import DsftError, NotFoundError, UsageError
from dsft.runtime.base import RuntimeBase
from dsft.runtime.records import AdapterInfo
from dsft.runtime.refs import AdapterHandle

log = logging.getLogger("dsft.serve")


class BudgetFull(DsftError):
    """No room for another resident adapter: every one that could be evicted is in use; retry shortly."""

    exit_code = 9


@dataclass(frozen=True)
class Budget:
    """How many adapters, and how many bytes of them, stay resident (None: no limit)."""

    max_adapters: int | None = None
    max_bytes: int | None = None

    def over(self, count: int, nbytes: int) -> bool:
        return ((self.max_adapters is not None and count > self.max_adapters)
                or (self.max_bytes is not None and nbytes > self.max_bytes))

    def describe(self) -> str:
        parts = []
        if self.max_adapters is not None:
            parts.append(f"{self.max_adapters} adapter{'s' if self.max_adapters != 1 else ''}")
        if self.max_bytes is not None:
            parts.append(f"{self.max_bytes / 2**30:.3g} GiB")
        return " and ".join(parts) or "no limit"


class Residency:
    """The adapters resident on ``runtime`` under a :class:`Budget`, with pins and last-use times.

    Args:
        runtime: the serving runtime (adapters are attached and detached on it).
        budget: the most adapters / bytes resident; beyond it the least recently used are evicted.
        load_on_demand: requests may name registry adapters that are not resident (attached on first use).
        on_evict: called with the ref of each evicted adapter (metrics).
    """

    def __init__(self, runtime: RuntimeBase, budget: Budget = Budget(), *, load_on_demand: bool = False,
                 on_evict=None):
        self.runtime = runtime
        self.budget = budget
        self.load_on_demand = load_on_demand
        self.on_evict = on_evict
        self._lock = threading.Lock()  # quick: pins, use times, what is being evicted (taken on the event loop)
        self._attaching = threading.Lock()  # one attach + eviction at a time (reads files: slow)
        self._pins: Counter[str] = Counter()
        self._tick = 0  # orders uses exactly (wall-clock times may repeat)
        self._used: dict[str, tuple[int, float]] = {}  # ref -> (tick, unix time) of its last use
        self._evicting: set[str] = set()
        self.evictions = 0

    # --- requests ---------------------------------------------------------------------------------------

    def _touch(self, key: str) -> None:
        self._tick += 1
        self._used[key] = (self._tick, time.time())

    def acquire(self, model: str | None) -> AdapterHandle | None:
        """The resident adapter ``model`` names, pinned (None: the plain base, nothing pinned).

        Raises:
            NotFoundError: nothing resident by that name (or it is being evicted).
        """
        with self._lock:
            handle = self.runtime.resolve(model)
            if handle is None:
                return None
            if handle.key in self._evicting:
                raise NotFoundError(f"adapter {handle.key} is being evicted (over the budget of {self.budget.describe()}); "
                                    "retry to attach it again" + ("" if self.load_on_demand else " with POST /v1/adapters"))
            self._pins[handle.key] += 1  # its last use is when it is released (while pinned it cannot go)
        return handle

    def release(self, handle: AdapterHandle | None) -> None:
        """Unpin what :meth:`acquire` (or ``attach(pin=True)``) pinned; its last use is now."""
        if handle is None:
            return
        with self._lock:
            self._pins[handle.key] -= 1
            if self._pins[handle.key] <= 0:
                del self._pins[handle.key]
            if handle.key in self._used:
                self._touch(handle.key)

    def can_load(self, model: str) -> bool:
        """Whether a request naming ``model`` may attach it on demand (on, and ``model`` is a ref at all)."""
        from dsft.registry.refs import parse_ref

        if not self.load_on_demand or not model or model == self.runtime.name:
            return False
        try:
            parse_ref(model)
        except UsageError:
            return False
        return True

    # --- attach / evict ---------------------------------------------------------------------------------

    def attach(self, ref: str, *, pin: bool = False) -> tuple[AdapterInfo, AdapterHandle | None]:
        """Attach ``ref`` (as :meth:`RuntimeBase.attach`: registry check and sha256 first), then evict the least
        recently used unpinned adapters until the budget holds. With ``pin`` the new adapter comes back pinned
        (release it with :meth:`release`).

        Raises:
            BudgetFull: every other resident adapter is in use (the new one is detached again).
            UsageError: the adapter alone is over the memory budget.
            What :meth:`RuntimeBase.attach` raises (NotFoundError, IntegrityError, IncompatibleError, ...).
        """
        with self._attaching:
            before = set(self.runtime.adapters)
            info = self.runtime.attach(ref)
            key = info.ref
            handle = AdapterHandle(info.domain, info.version)
            if self.budget.max_bytes is not None and info.nbytes > self.budget.max_bytes:  # evicting would not help
                if key not in before:
                    self._forget(key)
                raise UsageError(f"adapter {key} needs {info.nbytes / 2**20:.1f} MiB, over the adapter memory budget "
                                 f"of {self.budget.describe()}")
            with self._lock:
                self._evicting.discard(key)
                if pin:
                    self._pins[key] += 1
                self._touch(key)
            fits = self._evict(keep=key)
            if not fits:
                if pin:
                    self.release(handle)
                if key not in before:
                    self._forget(key)
                in_use = sorted(self._pinned())
                raise BudgetFull(f"no room to make {key} resident: the budget is {self.budget.describe()} and the "
                                 f"adapters that could make room are in use ({', '.join(in_use) or 'none'}); retry shortly")
            return info, handle if pin else None

    def _pinned(self) -> set[str]:
        with self._lock:
            return {k for k, n in self._pins.items() if n > 0}

    def _evict(self, keep: str | None = None) -> bool:
        """Detach least recently used unpinned adapters (never ``keep``) until the budget holds; whether it does."""
        victims = []
        with self._lock:
            resident = {k: n for k, n in self.runtime.memory().items() if k not in self._evicting}
            candidates = sorted((k for k in resident if k != keep and self._pins.get(k, 0) <= 0),
                                key=lambda k: self._used.get(k, (0, 0.0))[0])
            while self.budget.over(len(resident), sum(resident.values())) and candidates:
                victim = candidates.pop(0)
                victims.append(victim)
                self._evicting.add(victim)
                del resident[victim]
            fits = not self.budget.over(len(resident), sum(resident.values()))
        for victim in victims:
            log.info("evicting adapter %s (least recently used; budget %s)", victim, self.budget.describe())
            self._forget(victim)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(victim)
        return fits

    def _forget(self, key: str) -> None:
        try:
            self.runtime.detach(key)
        except NotFoundError:
            pass  # detached meanwhile (DELETE /v1/adapters)
        with self._lock:
            self._evicting.discard(key)
            self._used.pop(key, None)

    def detach(self, ref: str) -> AdapterInfo:
        """Detach (as :meth:`RuntimeBase.detach`) and forget its last use."""
        info = self.runtime.detach(ref)
        with self._lock:
            self._used.pop(info.ref, None)
        return info

    # --- what is resident -------------------------------------------------------------------------------

    def resident(self) -> list[dict]:
        """Each resident adapter's :meth:`AdapterInfo.to_json` with ``last_used`` (unix seconds) and ``in_use``
        (requests pinning it now), least recently used first."""
        infos = self.runtime.adapters
        with self._lock:
            used = dict(self._used)
            pins = dict(self._pins)
        order = sorted(infos, key=lambda k: used.get(k, (0, 0.0))[0])
        return [{**infos[k].to_json(), "last_used": round(used[k][1], 3) if k in used else None,
                 "in_use": pins.get(k, 0)} for k in order]

    def to_json(self) -> dict:
        return {"max_adapters": self.budget.max_adapters, "max_bytes": self.budget.max_bytes,
                "load_on_demand": self.load_on_demand, "evictions": self.evictions}
