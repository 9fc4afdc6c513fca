"""Every error the server answers is OpenAI-shaped JSON: ``{"error": {"message", "type", "param", "code"}}``.

dsft's own errors map to statuses here (unknown adapter 404, bad input 400, prompt too long 413,
incompatible or tampered adapter 409, queue full 429 with ``Retry-After``, no room to make an adapter
resident 503 with ``Retry-After``); the guard middleware (:mod:`dsft.serve.guard`)
answers 401, 403, 413 and 415 before a request body is even parsed.
"""
from __future__ import annotations

import json

from fastapi.responses import JSONResponse

from dsft.errors import IncompatibleError, IntegrityError, NotFoundError, UsageError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "overloaded_error"}

RETRY_AFTER_S = 1
"""What ``Retry-After`` says when the queue is full or no adapter can be evicted: the engine drains in about that."""


class ApiError(Exception):
    """An error answered as ``status`` with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers


def body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    # a message quoting a client's text must still encode: a lone surrogate is written as its escape
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


def response(status: int, message: str, code: str | None = None, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(body(status, message, code, param), status_code=status, headers=headers)


def from_exception(exc: BaseException) -> ApiError:
    """The API error for an exception raised by the runtime."""
    from dsft.runtime.engine import EngineBusy
    from dsft.runtime.records import ContextLengthError
    from dsft.serve.residency import BudgetFull

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NotFoundError):
        return ApiError(404, str(exc), code="model_not_found")
    if isinstance(exc, ContextLengthError):
        return ApiError(413, str(exc), code="context_length_exceeded")
    if isinstance(exc, (IncompatibleError, IntegrityError)):
        return ApiError(409, str(exc), code="adapter_refused")
    if isinstance(exc, UsageError):
        return ApiError(400, str(exc))
    if isinstance(exc, EngineBusy):
        return ApiError(429, str(exc), code="busy", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, BudgetFull):
        return ApiError(503, str(exc), code="adapter_budget_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    return ApiError(500, f"internal error ({type(exc).__name__}); the server keeps running, see its log")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line for pydantic's errors: the first problem with its field."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{field or 'body'}: {e.get('msg', 'invalid')}{more}", field


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
