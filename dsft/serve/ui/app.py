"""The routes of the registry pages, the app ``dsft ui`` serves, and the server loop.

Read-only unless an API key is configured. Browsers cannot send an ``Authorization`` header from a plain
form, so a tag change carries the key as a form field (``key``), compared in constant time; a page on another
site cannot forge it without the key. Every page (not only the POST) is also refused when its Host or Origin
is not this server's address, even with a key set: the pages show the registry's paths and metrics, which a
DNS-rebinding page must not read.
"""
from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from dsft.errors import DsftError, IncompatibleError, IntegrityError, NotFoundError, UsageError
from dsft.registry import Registry
from dsft.registry.refs import validate_domain, validate_tag, validate_version
from dsft.serve.guard import LOOPBACK, Guard, allowed_hosts, check_bind, cross_site_problem
from dsft.serve.ui import render, views

log = logging.getLogger("dsft.serve.ui")
MAX_FORM_BYTES = 16 * 1024
"""A tag form is a few hundred bytes; anything much larger is refused by the guard before it is read."""


class _Forbidden(UsageError):
    """A change asked of read-only pages (403)."""


class _Unauthorized(UsageError):
    """A change without the right API key (401)."""


def _status(exc: BaseException) -> int:
    if isinstance(exc, _Forbidden):
        return 403
    if isinstance(exc, _Unauthorized):
        return 401
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, (IncompatibleError, IntegrityError)):
        return 409
    if isinstance(exc, UsageError):
        return 400
    return 500


def ui_router(reg: Registry, *, api_key: str | None = None, hosts: frozenset[str] | None = None) -> APIRouter:
    """The ``/ui`` routes over ``reg``.

    Args:
        api_key: when set, the adapter pages offer tag forms and a POST carrying this key may change tags;
            when None, the pages are read-only and every POST is refused (403).
        hosts: the ``Host`` values accepted (:func:`dsft.serve.guard.allowed_hosts`; None: any Host, still
            refusing another Origin).
    """
    router = APIRouter()
    read_only = not api_key

    def html(text: str, status: int = 200) -> HTMLResponse:
        # the pages hold no scripts; this header keeps it so if a value ever escaped its escaping
        return HTMLResponse(text, status_code=status, headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                       "form-action 'self'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    def error(exc: BaseException) -> HTMLResponse:
        status = _status(exc)
        if status == 500:
            log.exception("registry page failed", exc_info=exc)
        message = str(exc) if isinstance(exc, DsftError) else f"internal error ({type(exc).__name__}); see the server log"
        return html(render.error_page(status, message, read_only=read_only), status)

    def refused(request: Request) -> HTMLResponse | None:
        """403 when the request came through another site's page (see the module docstring)."""
        problem = cross_site_problem("GET", request.headers.raw, hosts)  # GET: forms are not JSON
        if problem is None:
            return None
        return html(render.error_page(problem[0], problem[1], read_only=read_only), problem[0])

    def show(request: Request, build: Callable[[], str]) -> HTMLResponse:
        bad = refused(request)
        if bad is not None:
            return bad
        try:
            return html(build())
        except Exception as exc:  # one page failing must not take the server down; it says why
            return error(exc)

    @router.get("/ui", response_class=HTMLResponse)
    def adapters(request: Request) -> HTMLResponse:
        return show(request, lambda: render.index_page(views.version_rows(reg), n_bases=len(reg.list_bases()),
                                                       read_only=read_only))

    @router.get("/ui/compat", response_class=HTMLResponse)
    def compat(request: Request) -> HTMLResponse:
        return show(request, lambda: render.compat_page(views.matrix(reg), read_only=read_only))

    @router.get("/ui/adapters/{domain}/{version}", response_class=HTMLResponse)
    def adapter(request: Request, domain: str, version: str) -> HTMLResponse:
        return show(request, lambda: render.detail_page(views.detail(reg, domain, version), read_only=read_only))

    @router.post("/ui/adapters/{domain}/tags")
    async def set_tag(request: Request, domain: str) -> Response:
        bad = refused(request)
        if bad is not None:
            return bad
        if read_only:
            return error(_Forbidden("the registry pages are read-only: start `dsft ui` with DSFT_API_KEY set "
                                    "to change tags here (or use `dsft registry tag`)"))
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
        if not secrets.compare_digest(form.get("key", "").encode(), api_key.encode()):
            return error(_Unauthorized("missing or wrong API key"))
        try:
            version, tag = validate_version(form.get("version", "")), validate_tag(form.get("tag", "").strip())
            validate_domain(domain)
            if form.get("op") == "remove":
                await run_in_threadpool(reg.untag, domain, tag)
            elif form.get("op") == "set":
                await run_in_threadpool(reg.tag, f"{domain}@{version}", tag)
            else:
                raise UsageError("op must be 'set' or 'remove'")
        except Exception as exc:
            return error(exc)
        # Post/Redirect/Get: reloading the page does not repeat the change
        return RedirectResponse(f"/ui/adapters/{quote(domain, safe='')}/{quote(version, safe='')}", status_code=303)

    return router


def create_ui_app(reg: Registry, *, api_key: str | None = None, hosts: frozenset[str] | None = None) -> FastAPI:
    """An app holding only the registry pages (``/`` redirects to ``/ui``), behind the serving guard."""
    app = FastAPI(title="dsft registry", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=MAX_FORM_BYTES, hosts=hosts)
    app.include_router(ui_router(reg, api_key=api_key, hosts=hosts))

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui", status_code=307)

    return app


def serve_ui(*, host: str = "127.0.0.1", port: int = 8765, api_key: str | None = None, registry: str | None = None,
             on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the registry pages until interrupted (no model is loaded).

    Raises:
        UsageError: a bad port. RegistryError: the registry cannot be opened.
    """
    import uvicorn

    from dsft.registry import open_registry

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0-65535, got {port}")
    check_bind(host, api_key)
    reg = open_registry(registry)
    try:
        app = create_ui_app(reg, api_key=api_key, hosts=allowed_hosts(host, port))
        if host not in LOOPBACK and not api_key:
            log.warning("registry pages on %s: anyone who can reach it can read them (read-only)", host)
        if on_ready is not None:
            shown = f"[{host}]" if ":" in host else host
            on_ready(f"http://{shown}:{port}/ui")
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    finally:
        reg.close()
