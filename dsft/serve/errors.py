"""Every error the server answers is OpenAI-shaped JSON: ``{"error": {"message", "type", "param", "code"}}``.

dsft's own errors map to statuses here (unknown adapter 404, bad input 400, prompt too long 413,
incompatible or tampered adapter 409, queue full 503); the guard middleware answers 401 and 413
before a request body is even parsed.
"""
from __future__ import annotations

import json
import secrets

from fastapi.responses import JSONResponse

from dsft.errors import IncompatibleError, IntegrityError, NotFoundError, UsageError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
          409: "conflict_error", 413: "invalid_request_error", 500: "server_error", 503: "overloaded_error"}


class ApiError(Exception):
    """An error answered as ``status`` with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


def response(status: int, message: str, code: str | None = None, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(body(status, message, code, param), status_code=status, headers=headers)


def from_exception(exc: BaseException) -> ApiError:
    """The API error for an exception raised by the runtime."""
    from dsft.runtime.engine import EngineBusy
    from dsft.runtime.records import ContextLengthError

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
        return ApiError(503, str(exc), code="busy")
    return ApiError(500, f"internal error ({type(exc).__name__}); the server keeps running, see its log")


class Guard:
    """ASGI middleware: bearer token on ``/v1/*`` (when set) and a cap on the request body's size.

    The body is read here (up to the cap) and replayed to the app, so an oversize body is refused with
    413 before anything parses it, whether or not it announced its length.
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = response(413, f"request body is over {self.max_body_bytes} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        data = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


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
