"""The outermost middleware: a request id, one JSON access-log line per request, and the request metrics.

Each request gets an id (the client's ``X-Request-Id`` when it is a plain token of up to 64 characters,
else a new one), sent back as ``X-Request-Id``. When the response has been sent, one line goes to the
``dsft.serve.access`` logger::

    {"ts": "2026-12-01T03:40:00.123Z", "request_id": "...", "method": "POST", "path": "/v1/completions",
     "status": 200, "duration_ms": 84.2, "adapter": "finance@0.1.0", "prompt_tokens": 12, "completion_tokens": 10}

(``adapter`` and the token counts are null where a request generated nothing). Routes fill them in through
:func:`record` and register what must happen once the request is over (unpinning its adapter).
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from dsft.serve.metrics import ServeMetrics

ACCESS_LOGGER = "dsft.serve.access"
log = logging.getLogger(ACCESS_LOGGER)
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters", "/health", "/metrics"})


@dataclass
class Record:
    """What the access-log line of one request says beyond method, path and status."""

    request_id: str
    adapter: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    """Run once the response is sent (or the request failed), in order."""

    def usage(self, prompt: int, completion: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt, completion


def record(scope) -> Record:
    """The request's :class:`Record` (a detached one when the middleware is not installed)."""
    state = scope.setdefault("state", {})
    rec = state.get("dsft")
    if rec is None:
        rec = state["dsft"] = Record(uuid.uuid4().hex)
    return rec


def endpoint(path: str) -> str:
    """The metrics label of ``path``: the route, not the adapter a DELETE names (bounded cardinality)."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{ref}"
    if path == "/ui" or path.startswith("/ui/"):
        return "/ui"
    return "other"


class AccessLog:
    """ASGI middleware: request id, access-log line, ``dsft_requests_total`` and the request-duration histogram."""

    def __init__(self, app, *, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rec = Record(given if _ID.fullmatch(given) else uuid.uuid4().hex)
        scope.setdefault("state", {})["dsft"] = rec
        status = 500  # what a request that raised before answering was answered with (ServerErrorMiddleware)

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rec.request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            for cleanup in rec.cleanups:
                try:
                    cleanup()
                except Exception:
                    logging.getLogger("dsft.serve").exception("request cleanup failed")
            seconds = time.perf_counter() - start
            name = endpoint(scope["path"])
            self.metrics.requests.labels(name, str(status)).inc()
            self.metrics.duration.labels(name).observe(seconds)
            if log.isEnabledFor(logging.INFO):
                log.info(json.dumps({
                    "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "request_id": rec.request_id, "method": scope["method"], "path": scope["path"], "status": status,
                    "duration_ms": round(seconds * 1000, 1), "adapter": rec.adapter,
                    "prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens,
                }, ensure_ascii=False))


def configure(target: str | None) -> logging.Handler | None:
    """Send access-log lines to ``target``: ``-`` for stderr, a file path (appended), or None / ``off`` for nowhere.

    Returns the handler added (to remove at shutdown), or None.
    """
    import sys

    logger = logging.getLogger(ACCESS_LOGGER)
    logger.propagate = False
    if target is None or target.lower() in ("off", "none", ""):
        logger.setLevel(logging.WARNING)
        return None
    handler = logging.StreamHandler(sys.stderr) if target == "-" else logging.FileHandler(target, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler
