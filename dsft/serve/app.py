"""The FastAPI application: OpenAI's completions, chat completions and models endpoints over an
:class:`dsft.runtime.Engine`, plus adapter attach/detach and a health check.

    POST /v1/completions            {"model": "finance@0.1.0", "prompt": "...", "max_tokens": 32, "stream": false}
    POST /v1/chat/completions       {"model": "legal", "messages": [{"role": "user", "content": "..."}]}
    GET  /v1/models                 the base and every attached adapter (its ref: what "model" takes)
    GET  /v1/adapters               resident adapters: term ids, compatibility, bytes, last use; the budget
    POST /v1/adapters               {"ref": "medical@0.2.0"}: attach (beside other attached versions of medical)
    DELETE /v1/adapters/{ref}       detach
    GET  /health                    liveness, base, batching counters (no token needed; adapters with one)
    GET  /metrics                   Prometheus text format (:mod:`dsft.serve.metrics`; the API key when there is one)
    GET  /ui ...                    the registry pages (``dsft serve --ui``; see :mod:`dsft.serve.ui`)

A completion's ``prompt`` is an instruction, answered in the format the adapters were trained on, as
``dsft generate`` and ``RuntimeBase.generate`` answer it; ``"raw": true`` continues it as plain text
instead (``dsft generate --raw``). ``model`` is resolved once, when the request arrives.
A client that goes away has its generation cancelled, streaming or not. Adapters stay resident under
the budget of a :class:`dsft.serve.residency.Residency` (LRU eviction, attach on demand when allowed); a
full queue is answered 429 with ``Retry-After``. Every request is logged as one JSON line
(:mod:`dsft.serve.access`).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsft.errors import NotFoundError
from dsft.registry import Registry
from dsft.runtime.base import RuntimeBase
from dsft.runtime.engine import Engine
from dsft.runtime.engine import Request as GenRequest
from dsft.runtime.records import Generation
from dsft.runtime.refs import AdapterHandle
from dsft.serve.access import AccessLog, record
from dsft.serve.errors import ApiError, dumps, from_exception, response, validation_message
from dsft.serve.guard import Guard, authorized
from dsft.serve.metrics import CONTENT_TYPE, Progress, ServeMetrics
from dsft.serve.residency import Residency
from dsft.serve.schemas import AttachRequest, ChatRequest, CompletionRequest


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond these it is refused (400, or 413 for size)."""

    max_tokens: int = 1024
    """Most tokens one completion may generate (``max_tokens``)."""
    default_chat_tokens: int = 256
    """``max_tokens`` of a chat request that gives none."""
    max_prompt_chars: int = 64_000
    """Longest prompt text (all messages together), before tokenising; longer is 413."""
    max_body_bytes: int = 1 << 20
    """Largest request body; larger is 413."""
    max_prompts: int = 32
    """Most prompts in one completions request."""
    max_stop: int = 4


class _Listener:
    """Engine events -> an asyncio queue on the server's loop (the engine calls from its own thread), and to the
    request's :class:`Progress` (metrics) first."""

    def __init__(self, loop: asyncio.AbstractEventLoop, progress: Progress):
        self.loop = loop
        self.progress = progress
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, kind: str, payload: Any) -> None:
        self.progress.event(kind, payload)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))


def _now() -> int:
    return int(time.time())


def create_app(runtime: RuntimeBase, engine: Engine, *, api_key: str | None = None, limits: Limits = Limits(),
               hosts: frozenset[str] | None = None, ui_registry: Registry | None = None,
               residency: Residency | None = None) -> FastAPI:
    """The application for one runtime.

    Args:
        api_key: when set, required on every ``/v1`` route.
        hosts: without an API key, the ``Host`` values accepted (:func:`dsft.serve.guard.allowed_hosts` of
            the bound address; None accepts any Host, still refusing cross-origin requests).
        ui_registry: when given, the registry pages (:mod:`dsft.serve.ui`) are served under ``/ui`` from it.
        residency: which adapters stay attached (budget, attach on demand); default: no budget, no on-demand.
    """
    residency = residency if residency is not None else Residency(runtime)
    metrics = ServeMetrics(lambda: runtime.name, lambda: runtime.memory(),
                           lambda: dict(engine.counts, kv_bytes=engine.kv_bytes, kv_budget=engine.kv_budget))
    residency.on_evict = lambda _ref: metrics.evictions.inc()
    app = FastAPI(title="dsft", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics, app.state.residency = metrics, residency
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes, hosts=hosts)
    app.add_middleware(AccessLog, metrics=metrics)  # outermost: sees (and logs) what the guard refuses too
    if ui_registry is not None:
        from dsft.serve.ui.app import ui_router

        app.include_router(ui_router(ui_registry, api_key=api_key, hosts=hosts))

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return response(exc.status, exc.message, exc.code, exc.param, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return response(400, message, "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return response(exc.status_code, str(exc.detail), None)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception):
        err = from_exception(exc)
        return response(err.status, err.message, err.code, headers=err.headers)

    # --- helpers ---------------------------------------------------------------------------------------

    def model_id(adapter_ref: str | None) -> str:
        return adapter_ref or runtime.name

    async def parse(request: Request, schema):
        """The JSON body as ``schema``, whatever its content type says (curl -d sends form-encoded)."""
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        except RecursionError:  # nesting deeper than the parser's stack: the client's mistake, not a 500
            raise ApiError(400, "the request body is JSON nested too deeply to read; flatten it", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_request")
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            message, param = validation_message(exc.errors())
            raise ApiError(400, message, code="invalid_request", param=param) from None

    async def lease(request: Request, model: str) -> AdapterHandle | None:
        """The resident adapter ``model`` names, pinned until the response is sent (attached first when it is
        not resident and on-demand loading is on); None for the plain base."""
        try:
            handle = residency.acquire(model)
        except NotFoundError as exc:
            if not residency.can_load(model):
                raise from_exception(exc) from None
            try:
                _, handle = await run_in_threadpool(residency.attach, model, pin=True)
            except Exception as failure:
                err = from_exception(failure)
                if err.status != 404:  # refused (tampered, incompatible, no room): this request only
                    err.message = f"adapter {model!r} could not be attached: {err.message}"
                raise err from None
        except Exception as exc:
            raise from_exception(exc) from None
        if handle is not None:
            record(request.scope).cleanups.append(lambda: residency.release(handle))
        return handle

    async def check_common(request: Request, req, max_tokens: int | None, prompt_chars: int):
        """The checks every completion gets; returns its adapter, resolved (the only time it is) and pinned."""
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if max_tokens is None or not 1 <= max_tokens <= limits.max_tokens:
            raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}", param="max_tokens")
        if len(req.stops()) > limits.max_stop:
            raise ApiError(400, f"at most {limits.max_stop} stop sequences", param="stop")
        if prompt_chars > limits.max_prompt_chars:
            raise ApiError(413, f"prompt of {prompt_chars} characters is over the limit of {limits.max_prompt_chars}",
                           code="context_length_exceeded")
        return await lease(request, req.model)

    def gen_request(req, adapter, max_tokens: int, **what) -> GenRequest:
        return GenRequest(adapter=adapter, max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          seed=req.seed, stop=tuple(req.stops()), ignore_eos=req.ignore_eos, **what)

    def submit(request: GenRequest) -> tuple[_Listener, Any]:
        progress = Progress(metrics)
        listener = _Listener(asyncio.get_running_loop(), progress)
        try:
            ticket = engine.submit(replace(request, on_token=progress.token), listener)
        except Exception as exc:
            progress.abandon()
            raise from_exception(exc) from None
        return listener, ticket

    def drop(listener: _Listener, ticket) -> None:
        """Nobody reads this request's answer any more: stop it (a no-op once finished)."""
        ticket.cancel()
        listener.progress.abandon()

    async def started(listener: _Listener) -> dict:
        kind, payload = await listener.queue.get()
        if kind == "error":
            raise from_exception(payload)
        return payload

    async def finished(listener: _Listener) -> Generation:
        while True:
            kind, payload = await listener.queue.get()
            if kind == "done":
                return payload
            if kind == "error":
                raise from_exception(payload)

    async def gone(request: Request) -> None:
        """Returns when the client disconnects (the body was read already, so nothing else arrives)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def run_all(request: Request, requests: list[GenRequest]) -> list[tuple[dict, Generation]]:
        pending: list[tuple[_Listener, Any]] = []
        try:
            for r in requests:
                pending.append(submit(r))
        except ApiError:  # the queue filled up part way: the ones already queued are not wanted
            for listener, ticket in pending:
                drop(listener, ticket)
            raise

        async def collect():
            out = []
            for listener, _ in pending:
                info = await started(listener)
                out.append((info, await finished(listener)))
            return out

        work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(gone(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client went away: nobody will read the answer
                work.cancel()
                raise ApiError(499, "client closed the request", code="client_closed")
            return work.result()
        finally:
            watch.cancel()
            for listener, ticket in pending:
                drop(listener, ticket)  # no-op for finished ones; stops the rest if one failed or the client left

    def usage(results: list[tuple[dict, Generation]]) -> dict:
        prompt = sum(g.prompt_tokens for _, g in results)
        completion = sum(g.completion_tokens for _, g in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj: Any) -> str:
        return f"data: {dumps(obj)}\n\n"

    async def stream(request: Request, listener: _Listener, ticket, chunk, info: dict,
                     include_usage: bool) -> AsyncIterator[str]:
        """SSE events: ``chunk(text, finish_reason)`` per piece, a final chunk, optional usage, [DONE]."""
        first = chunk(None, None)
        try:
            if first is not None:
                yield sse(first)
            while True:
                kind, payload = await listener.queue.get()
                if kind == "text":
                    yield sse(chunk(payload, None))
                elif kind == "done":
                    u = usage([(info, payload)])
                    record(request.scope).usage(u["prompt_tokens"], u["completion_tokens"])
                    yield sse(chunk("", payload.finish_reason))
                    if include_usage:
                        yield sse({**chunk("", None), "choices": [], "usage": u})
                    break
                elif kind == "error":
                    err = from_exception(payload)
                    yield sse({"error": {"message": err.message, "type": "server_error", "code": err.code}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            drop(listener, ticket)

    def finish(request: Request, results: list[tuple[dict, Generation]]) -> dict:
        """The usage of a non-streamed answer, also noted for its access-log line."""
        u = usage(results)
        record(request.scope).usage(u["prompt_tokens"], u["completion_tokens"])
        return u

    def started_with(request: Request, info: dict) -> str:
        model = model_id(info["adapter"])
        record(request.scope).adapter = model
        return model

    # --- routes ----------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(request: Request):
        out = {"status": "ok", "base": runtime.name, "engine": dict(engine.counts)}
        if authorized(request.headers.raw, api_key):  # what is attached is for clients that hold the key
            out["adapters"] = [a.ref for a in runtime.adapters.values()]
        return out

    @app.get("/v1/models")
    async def models():
        data = [{"id": runtime.name, "object": "model", "created": 0, "owned_by": "dsft", "root": runtime.name,
                 "parent": None}]
        for a in runtime.adapters.values():
            data.append({"id": a.ref, "object": "model", "created": 0, "owned_by": "dsft", "root": a.ref,
                         "parent": runtime.name, "domain": a.domain, "status": a.status})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not 1 <= len(prompts) <= limits.max_prompts:
            raise ApiError(400, f"prompt must be a string or a list of 1 to {limits.max_prompts} strings", param="prompt")
        if req.echo or req.logprobs or req.suffix:
            raise ApiError(400, "echo, logprobs and suffix are not supported")
        adapter = await check_common(request, req, req.max_tokens, max(len(p) for p in prompts))
        max_tokens = req.max_tokens
        cid, created = f"cmpl-{uuid.uuid4().hex}", _now()
        if req.stream:
            if len(prompts) != 1:
                raise ApiError(400, "stream with several prompts is not supported; send one request per prompt", param="prompt")
            listener, ticket = submit(gen_request(req, adapter, max_tokens, prompt=prompts[0], raw=req.raw, stream=True))
            info = await started(listener)
            model = started_with(request, info)

            def chunk(text, finish):
                if text is None:
                    return None
                return {"id": cid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            include = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(request, listener, ticket, chunk, info, include),
                                     media_type="text/event-stream")
        results = await run_all(request, [gen_request(req, adapter, max_tokens, prompt=p, raw=req.raw) for p in prompts])
        return {"id": cid, "object": "text_completion", "created": created, "model": started_with(request, results[0][0]),
                "choices": [{"index": i, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}
                            for i, (_, g) in enumerate(results)],
                "usage": finish(request, results)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens or min(limits.default_chat_tokens, limits.max_tokens)
        messages = [m.model_dump() for m in req.messages]
        chars = sum(len(m["content"]) if isinstance(m["content"], str) else len(dumps(m["content"] or "")) for m in messages)
        adapter = await check_common(request, req, max_tokens, chars)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", _now()
        gen = gen_request(req, adapter, max_tokens, messages=messages, stream=req.stream)
        if req.stream:
            listener, ticket = submit(gen)
            info = await started(listener)
            model = started_with(request, info)

            def chunk(text, finish):
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            include = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(request, listener, ticket, chunk, info, include),
                                     media_type="text/event-stream")
        results = await run_all(request, [gen])
        info, g = results[0]
        return {"id": cid, "object": "chat.completion", "created": created, "model": started_with(request, info),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                             "finish_reason": g.finish_reason}],
                "usage": finish(request, results)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": residency.resident(), "budget": residency.to_json()}

    @app.post("/v1/adapters")
    async def attach(request: Request):
        req = await parse(request, AttachRequest)
        try:
            info, _ = await run_in_threadpool(residency.attach, req.ref)
        except Exception as exc:
            raise from_exception(exc) from None
        return JSONResponse(info.to_json(), status_code=201)

    @app.delete("/v1/adapters/{ref}")
    async def detach(ref: str):
        try:
            info = await run_in_threadpool(residency.detach, ref)
        except Exception as exc:
            raise from_exception(exc) from None
        return {"detached": info.ref}

    return app
