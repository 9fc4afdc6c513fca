"""Dynamic batching: requests that arrive together run together, whatever adapter each one uses.

A request's adapter is resolved once, when it is submitted (:meth:`RuntimeBase.resolve` gives a handle),
so the worker never looks a ref up. One worker thread owns the model. It takes the first waiting
request, waits up to ``max_wait_s`` for more (up to ``max_batch_size``), prepares each (tokenisation,
limits: a bad request fails alone) and runs them as one mixed batch (:meth:`RuntimeBase.run`), in which a
row that fails on its own (its adapter detached meanwhile, its sampling) fails alone too. Attach and
detach take the runtime's lock, which :meth:`RuntimeBase.run` holds, so a batch never sees its adapters
change under it.

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

from dsft.errors import DsftError
from dsft.runtime.base import RuntimeBase
from dsft.runtime.generation import FINISH_CANCELLED
from dsft.runtime.records import Generation
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

    def cancel(self) -> None:
        self.cancelled = True


_STOP = object()


class Engine:
    """Batches requests for one :class:`RuntimeBase` on a worker thread.

    Args:
        runtime: the loaded base with its adapters.
        max_batch_size: the most rows run together.
        max_wait_s: how long the first request of a batch waits for company.
        max_queue: requests waiting beyond this are refused with :class:`EngineBusy`.
    """

    def __init__(self, runtime: RuntimeBase, *, max_batch_size: int = 32, max_wait_s: float = 0.01, max_queue: int = 1024):
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.batches: deque[tuple[int, int]] = deque(maxlen=1024)
        """(rows, distinct adapters incl. the plain base) of the latest batches."""
        self.counts = {"batches": 0, "rows": 0, "largest": 0, "mixed": 0, "cancelled": 0, "failed": 0}
        """Batches run, rows run, the largest batch, mixed batches, rows cancelled (their client left) and rows
        failed (alone, or with their batch)."""
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
        if self._queue.qsize() >= self.max_queue:
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

    def close(self, timeout: float = 30.0) -> None:
        """Finish the running batch, fail what is still queued, stop the worker."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # --- the worker --------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                timeout = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(nxt)
            self._run_batch(batch)
        while True:  # shutting down: nothing queued is left hanging
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Ticket):
                _safe(item.on_event, "error", EngineBusy("the server is shutting down"))

    def _prepare(self, ticket: Ticket):
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

    def _run_batch(self, batch: list[Ticket]) -> None:
        rows, tickets = [], []
        for t in batch:
            if t.cancelled:
                continue
            try:
                row = self._prepare(t)
            except Exception as exc:  # this request alone fails: adapter detached, too long, ...
                _safe(t.on_event, "error", exc)
                continue
            _safe(t.on_event, "started", {"prompt_tokens": len(row.prompt), "adapter": row.key})
            rows.append(row)
            tickets.append(t)
        if not rows:
            return
        kinds = len({r.key for r in rows})
        self.batches.append((len(rows), kinds))
        self.counts["batches"] += 1
        self.counts["rows"] += len(rows)
        self.counts["largest"] = max(self.counts["largest"], len(rows))
        self.counts["mixed"] += kinds > 1
        try:
            self.runtime.run(rows)
        except Exception as exc:  # e.g. out of memory: fail this batch, keep serving
            log.exception("batch of %d failed", len(rows))
            self.counts["failed"] += len(rows)
            for t in tickets:
                _safe(t.on_event, "error", exc)
            return
        for t, row in zip(tickets, rows):
            self.counts["cancelled"] += row.finish_reason == FINISH_CANCELLED
            if row.error is not None:  # this row alone failed; the rest of the batch completed
                self.counts["failed"] += 1
                _safe(t.on_event, "error", row.error)
            else:
                _safe(t.on_event, "done", self.runtime.result(row))


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
