"""ASGI middleware in front of every route: who may call, from where, and how much they may send.

With an API key, every ``/v1`` request and ``/metrics`` must carry it (``Authorization: Bearer KEY``). Without one, the
server trusts whoever can reach its address, so it makes sure a browser cannot be used to reach it for
someone else: the ``Host`` header must name the address the server is bound to (a DNS-rebinding page
sends its own name), an ``Origin`` header must be that address too (a cross-site page sends its own), and a
POST must be ``application/json`` (the content types a cross-site form may send without asking first are
not). Bodies are capped either way.
"""
from __future__ import annotations

import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

from dsft.errors import UsageError
from dsft.serve.errors import response

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


def is_wildcard(host: str) -> bool:
    """Whether binding ``host`` listens on every interface: ``0.0.0.0`` and ``::`` in any spelling the resolver
    accepts (``0``, ``0.0.0.00``, ``::0``)."""
    import ipaddress
    import socket

    if host in WILDCARD:
        return True
    try:
        infos = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return False  # a name, resolved by the server: not a wildcard spelling
    return any(ipaddress.ip_address(info[4][0].split("%")[0]).is_unspecified for info in infos)


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen on every interface without an API key: with a wildcard bind the ``Host`` header cannot be
    checked against one address, so a page on any site could reach the server through DNS rebinding.

    Raises:
        UsageError: ``host`` is a wildcard and there is no key.
    """
    if is_wildcard(host) and not api_key:
        raise UsageError(f"--host {host or '(empty)'} listens on every interface: set DSFT_API_KEY (or --api-key) so that "
                         "only clients with the key get in, or give the one address to listen on")


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The ``Host`` values a server bound to ``host:port`` answers (None: any, for a wildcard bind).

    A loopback server answers all loopback names; each name is allowed with and without the port.
    """
    if is_wildcard(host):
        return None
    names = set(LOOPBACK) if host in LOOPBACK else {host}
    out = set()
    for name in names:
        shown = f"[{name}]" if ":" in name else name
        out |= {shown.lower(), f"{shown}:{port}".lower()}
    return frozenset(out)


def authorized(headers: Iterable[tuple[bytes, bytes]], api_key: str | None) -> bool:
    """Whether the request carries ``api_key`` as a bearer token (compared in constant time)."""
    if not api_key:
        return False
    value = dict(headers).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


def needs_key(path: str) -> bool:
    """Whether a server with an API key asks for it on ``path``: the API and the metrics (which name the adapters)."""
    return path.startswith("/v1") or path == "/metrics"


def cross_site_problem(method: str, headers: Iterable[tuple[bytes, bytes]], hosts: frozenset[str] | None) -> tuple[int, str] | None:
    """Why a request to a server without an API key looks like it came through someone else's page (status,
    message), or None."""
    h = {k.lower(): v.decode("latin-1") for k, v in headers}
    host = h.get(b"host", "").strip().lower()
    if hosts is not None and host not in hosts:
        return 403, (f"Host {host[:80]!r} is not this server's address; connect to the address it listens on "
                     "(or start it with DSFT_API_KEY set)")
    origin = h.get(b"origin")
    if origin is not None and origin != "null":
        netloc = urlsplit(origin).netloc.lower()
        if netloc not in (hosts if hosts is not None else {host}):
            return 403, (f"cross-origin request from {origin[:80]!r} refused; browsers on other sites may not use "
                         "this server (start it with DSFT_API_KEY set to allow clients that send the key)")
    if method == "POST":
        kind = h.get(b"content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return 415, f"send the body as JSON with 'Content-Type: application/json' (got {kind[:60] or 'none'!r})"
    return None


class Guard:
    """Bearer token on ``/v1/*`` and ``/metrics`` (when set), the cross-site checks (when not), and a cap on the body's size.

    The body is read here (up to the cap) and replayed to the app, so an oversize body is refused with
    413 before anything parses it, whether or not it announced its length.
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, hosts: frozenset[str] | None = None):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.hosts = hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and needs_key(scope["path"]) and not authorized(scope["headers"], self.api_key):
            return await response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if not self.api_key:
            problem = cross_site_problem(scope["method"], scope["headers"], self.hosts)
            if problem is not None:
                code = "cross_site_refused" if problem[0] == 403 else "unsupported_media_type"
                return await response(problem[0], problem[1], code=code)(scope, receive, send)
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
