"""Continuous batching: requests join and leave the running batch at token boundaries, whatever adapter each uses.

A request's adapter is resolved once, when it is submitted (:meth:`RuntimeBase.resolve` gives a handle),
so the worker never looks a ref up. One worker thread owns the model and a running batch
(:class:`dsft.runtime.batching.RunningBatch`) with its KV cache. At every token boundary it takes waiting
requests into the free slots (up to ``max_batch_size`` running rows), prepares each (tokenisation,
limits: a bad request fails alone), prefills them and joins them to the running rows, then decodes one
token for all rows (:meth:`RuntimeBase.step`). A row that finishes, is cancelled (:meth:`Ticket.cancel`)
or fails on its own leaves the batch at once, so its slot is free at the next token: a short request
does not wait for a long one. When nothing runs, the first request waits up to ``max_wait_s`` for
company, and no longer than ``quiet_s`` after the latest arrival: a burst of clients is prefilled together,
a lone request starts at once (one that comes later joins at the next token anyway).

The runtime's lock is held for one step, not for a whole generation: attach and detach happen between
steps (never under one), and a row whose adapter is detached while it generates fails alone, with an
error that says so.

Callers get events through a callback, called on the worker thread:
``("started", {"prompt_tokens", "adapter"})``, ``("text", piece)`` while generating (requests with
``stream``), then
``("done", Generation)`` or ``("error", exception)``. The HTTP server turns them into responses.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from dsft.errors import DsftError
from dsft.runtime.base import RuntimeBase
from dsft.runtime.generation import FINISH_CANCELLED, Row
from dsft.runtime.records import ContextLengthError, Generation
from dsft.runtime.refs import AdapterHandle

log = logging.getLogger("dsft.runtime")
Event = Callable[[str, Any], None]


class EngineBusy(DsftError):
    """The request queue is full; try again shortly."""

    exit_code = 9


@dataclass
class Request:
    """One completion to generate: a prompt (an instruction unless ``raw``), chat messages, or token ids,
    for one adapter (a ref, or the handle :meth:`RuntimeBase.resolve` gave; None: the plain base)."""

    adapter: str | AdapterHandle | None = None
    prompt: str | None = None
    raw: bool = False
    """Continue ``prompt`` as plain text instead of answering it as an instruction (as ``dsft generate --raw``)."""
    messages: Sequence[dict] | None = None
    prompt_ids: Sequence[int] | None = None
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    stream: bool = False
    """Send ``text`` events as the text is generated (otherwise the text is decoded once, at the end)."""
    on_token: Callable[[], None] | None = None
    """Called on the worker thread as each token is sampled (the server's latency metrics); must be quick."""


@dataclass
class Ticket:
    """A submitted request; ``cancel()`` stops it at its next token (e.g. the client went away)."""

    request: Request
    on_event: Event
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    prepared: Row | None = None
    """Its row, once prepared: kept while it waits for KV memory (tokenised once, not at every token)."""

    def cancel(self) -> None:
        self.cancelled = True


_STOP = object()

QUIET_S = 0.002
"""An idle engine stops waiting for company once no request arrived for this long: clients that start together
(threads, an asyncio gather) arrive microseconds apart, and a lone request should not sit out ``max_wait_s``."""


class Engine:
    """Continuously batches requests for one :class:`RuntimeBase` on a worker thread.

    Args:
        runtime: the loaded base with its adapters.
        max_batch_size: the most rows running at once.
        max_wait_s: how long a request that finds nothing running waits for company, at most.
        quiet_s: ...and it stops waiting once no request arrived for this long (None: always ``max_wait_s``).
        max_queue: requests waiting beyond this are refused with :class:`EngineBusy`.
        prefill_chunk: prompts longer than this are prefilled this many tokens per step, so that running rows
            keep decoding while a long prompt is read (None: a whole prompt in one step).
        kv_memory_gib: the most GiB the running rows' KV cache may take; a request that would take it past
            waits (at the head of the queue) until rows leave, and one that alone would is refused. Default:
            on a GPU, half the memory free when its first batch starts (all loaded by then); on a CPU, no bound.
    """

    def __init__(self, runtime: RuntimeBase, *, max_batch_size: int = 32, max_wait_s: float = 0.01, max_queue: int = 1024,
                 prefill_chunk: int | None = 512, kv_memory_gib: float | None = None, quiet_s: float | None = QUIET_S):
        self.runtime = runtime
        self.kv_budget = None if kv_memory_gib is None else int(kv_memory_gib * 2**30)
        """Bytes the KV cache may take (None: no bound). Set when the first batch starts on a GPU, by default."""
        self._kv_auto = kv_memory_gib is None
        self._held: deque[Ticket] = deque()  # taken from the queue, waiting for KV memory: first in line
        self.kv_bytes = 0
        """Bytes the running rows' KV cache holds (after the latest step)."""
        self.prefill_chunk = prefill_chunk
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.quiet_s = quiet_s
        self.max_queue = max_queue
        self.batches: deque[tuple[int, int]] = deque(maxlen=1024)
        """(running rows, distinct adapters among them incl. the plain base) right after each of the latest admissions."""
        self.counts = {"batches": 0, "rows": 0, "largest": 0, "mixed": 0, "cancelled": 0, "failed": 0, "steps": 0,
                       "held": 0}
        """Admissions (requests that joined the running batch together), rows run, the most rows running at once,
        admissions after which the running rows mixed adapters, rows cancelled (their client left), rows failed
        (alone, or with their step), decode steps, and token boundaries at which requests waited for KV memory."""
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="dsft-engine", daemon=True)
        self._closed = False
        self._thread.start()

    # --- API -------------------------------------------------------------------------------------------

    def submit(self, request: Request, on_event: Event) -> Ticket:
        """Queue a request, its adapter resolved now (once).

        Raises:
            EngineBusy: the queue is full. NotFoundError: its adapter is not attached.
        """
        if self._closed:
            raise EngineBusy("the engine is shutting down")
        if self._queue.qsize() + len(self._held) >= self.max_queue:  # held for KV memory: waiting too
            raise EngineBusy(f"{self.max_queue} requests are already waiting; retry shortly")
        if not isinstance(request.adapter, AdapterHandle):
            from dataclasses import replace

            request = replace(request, adapter=self.runtime.resolve(request.adapter))
        ticket = Ticket(request, on_event)
        self._queue.put(ticket)
        return ticket

    def generate(self, request: Request) -> Generation:
        """Submit and wait (for tests and scripts; the server streams events instead)."""
        done: Future = Future()

        def on_event(kind: str, payload: Any) -> None:
            if kind == "done":
                done.set_result(payload)
            elif kind == "error":
                done.set_exception(payload)
        self.submit(request, on_event)
        return done.result()

    def reset_counts(self) -> None:
        """Zero :attr:`counts` and forget :attr:`batches` (e.g. after a server's warm-up requests)."""
        self.counts = dict.fromkeys(self.counts, 0)
        self.batches.clear()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the running rows (admitting no more), fail what is still queued, stop the worker."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # --- the worker --------------------------------------------------------------------------------------

    def _loop(self) -> None:
        batch = None
        running: dict[int, tuple[Ticket, Row]] = {}  # id(row) -> its ticket and row, for every running row
        stopping = False
        while True:
            if not running:
                if stopping:
                    break
                if self._held:  # held for KV memory, and nothing runs now: they go first
                    waiting, stopping = self._gather([], self.max_batch_size, None)
                else:
                    first = self._queue.get()  # idle: sleep until a request comes
                    if first is _STOP:
                        break
                    waiting, stopping = self._gather([first], self.max_batch_size, time.monotonic() + self.max_wait_s)
            elif not stopping and batch is not None and batch.can_admit:
                waiting, stopping = self._gather([], self.max_batch_size - len(running), None)
            else:
                waiting = []
            if batch is None and waiting:
                try:
                    batch = self.runtime.batch(prefill_chunk=self.prefill_chunk)
                    if self._kv_auto and batch.device.type == "cuda":  # measured once all is loaded
                        self.kv_budget, self._kv_auto = torch.cuda.mem_get_info(batch.device)[0] // 2, False
                except Exception as exc:
                    log.error("could not start a batch: %s: %s", type(exc).__name__, exc)
                    self.counts["failed"] += len(waiting)
                    for t in waiting:
                        _safe(t.on_event, "error", exc)
                    continue
            new = self._admit(waiting, running, batch)
            if not running:  # every waiting request failed to prepare or was cancelled
                continue
            assert batch is not None
            self.counts["steps"] += 1
            try:
                finished = self.runtime.step(batch, new)
                self.kv_bytes = batch.slots.cache.nbytes() if batch.slots is not None else 0
            except Exception as exc:  # e.g. out of memory: fail the running rows, keep serving
                batch.abandon()
                batch = None
                self._fail_all(running, exc)
                continue
            for row in finished:
                ticket, _ = running.pop(id(row), (None, None))
                if ticket is None:  # not one of ours: never expected, but the worker must not die of it
                    continue
                self.counts["cancelled"] += row.finish_reason == FINISH_CANCELLED
                if row.error is not None:  # this row alone failed; the rest of the batch goes on
                    self.counts["failed"] += 1
                    _safe(ticket.on_event, "error", row.error)
                else:
                    _safe(ticket.on_event, "done", self.runtime.result(row))
        while self._held:  # shutting down: nothing queued is left hanging
            _safe(self._held.popleft().on_event, "error", EngineBusy("the server is shutting down"))
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Ticket):
                _safe(item.on_event, "error", EngineBusy("the server is shutting down"))

    def _gather(self, got: list, limit: int, deadline: float | None) -> tuple[list[Ticket], bool]:
        """Up to ``limit`` waiting tickets, those held for KV memory first (waiting until ``deadline`` for more,
        or not at all when None), and whether the engine is closing (then nothing more is taken)."""
        while self._held and len(got) < limit:
            got.append(self._held.popleft())
        while len(got) < limit:
            timeout = 0.0 if deadline is None else deadline - time.monotonic()
            if self.quiet_s is not None:
                timeout = min(timeout, self.quiet_s)
            try:
                nxt = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                return got, True
            got.append(nxt)
        return got, False

    def _admit(self, waiting: list[Ticket], running: dict[int, tuple[Ticket, Row]], batch) -> list[Row]:
        """Prepare waiting requests as rows (a bad one fails alone) and count the admission. A request the KV
        budget cannot take now is held, in order, for the next token boundary (the rest behind it wait too)."""
        rows: list[Row] = []
        for i, t in enumerate(waiting):
            if t.cancelled:
                continue
            try:
                row = t.prepared or self._prepare(t)
                if not self._kv_fits(batch, [r for _, r in running.values()] + rows + [row]):
                    if running or rows:
                        t.prepared = row
                        self._held.extend(waiting[i:])
                        self.counts["held"] += 1
                        break
                    raise self._kv_refusal(batch, row)
            except Exception as exc:  # this request alone fails: adapter detached, too long, ...
                _safe(t.on_event, "error", exc)
                continue
            _safe(t.on_event, "started", {"prompt_tokens": len(row.prompt), "adapter": row.key})
            rows.append(row)
            running[id(row)] = (t, row)
        if rows:
            kinds = len({r.key for _, r in running.values()})
            self.batches.append((len(running), kinds))
            self.counts["batches"] += 1
            self.counts["rows"] += len(rows)
            self.counts["largest"] = max(self.counts["largest"], len(running))
            self.counts["mixed"] += kinds > 1
        return rows

    def _kv_fits(self, batch, rows: list[Row]) -> bool:
        if self.kv_budget is None or batch is None:
            return True
        need = self.runtime.kv_bytes(batch, [len(r.prompt) + r.max_new_tokens for r in rows])
        return need is None or need <= self.kv_budget

    def _kv_refusal(self, batch, row: Row) -> ContextLengthError:
        need = self.runtime.kv_bytes(batch, [len(row.prompt) + row.max_new_tokens]) or 0
        return ContextLengthError(
            f"this request ({len(row.prompt)} prompt + {row.max_new_tokens} new tokens) needs {need / 2**30:.2f} GiB of "
            f"KV cache, more than the server's {self.kv_budget / 2**30:.2f} GiB (--kv-memory); ask for fewer tokens")  # type: ignore[operator]

    def _fail_all(self, running: dict[int, tuple[Ticket, Row]], exc: BaseException) -> None:
        log.error("a step of %d rows failed: %s: %s", len(running), type(exc).__name__, exc)
        self.counts["failed"] += len(running)
        for ticket, _ in running.values():
            _safe(ticket.on_event, "error", exc)
        running.clear()

    def _prepare(self, ticket: Ticket) -> Row:
        req, rt = ticket.request, self.runtime
        if req.prompt_ids is not None:
            ids = list(req.prompt_ids)
        elif req.messages is not None:
            ids = rt.encode_messages(req.messages, req.adapter)
        else:
            ids = rt.encode(req.prompt or "", req.adapter, raw=req.raw)

        def on_text(piece: str) -> None:
            _safe(ticket.on_event, "text", piece)

        return rt.make_row(ids, req.adapter, max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                           top_p=req.top_p, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos,
                           on_text=on_text if req.stream else None, cancelled=_asked_per_token(ticket))


def _asked_per_token(ticket: Ticket) -> Callable[[], bool]:
    """The row's ``cancelled`` check (asked as each token is sampled), telling ``on_token`` first when there is one."""
    hook = ticket.request.on_token
    if hook is None:
        return lambda: ticket.cancelled

    def cancelled() -> bool:
        try:
            hook()
        except Exception:  # metrics must not end a row
            log.exception("on_token hook failed")
        return ticket.cancelled
    return cancelled


def _safe(fn: Event, kind: str, payload: Any) -> None:
    try:
        fn(kind, payload)
    except Exception:  # a broken listener must not take the worker down
        log.exception("event listener failed")
