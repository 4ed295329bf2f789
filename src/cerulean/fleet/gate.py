"""Who is calling, decided before the application reads a byte of the request body.

Every request passes this gate (an ASGI middleware) first. It looks only at the
path, the headers and the TLS connection:

- **open to anyone**: the health check, the CA certificate, the OpenAPI
  document, enrollment (whose body carries its own token), the login page, logging
  out and the stylesheet;
- **``/api/v1/agent/...``**: the client certificate, which the TLS handshake has
  already checked against the fleet CA, must be one this fleet issued to that
  host, and neither it nor the host may be revoked (401 without one, 403 else);
- **the rest of ``/api/v1``**: a valid API token (401);
- **the dashboard**: the signed session cookie of a user who exists and is not
  disabled; otherwise a redirect to the login page.

Before that, it bounds the request's body by route (:func:`body_limit`): a body
announced larger is answered 413 at once, and one that turns out larger as it is
read ends in a 413 as soon as it passes the limit, so no call holds more.

The gate hands what it found to the application as ``request.state.caller``. Its
database work is one read-only transaction in one worker thread. A host's
certificate, once found good, passes for :data:`HOST_CACHE_SECONDS` without
asking the database again; the endpoint's own transaction checks the host once
more before it stores anything, so a revocation stops every write at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException
from starlette.requests import cookie_parser

from cerulean.fleet import hosts as hostsvc
from cerulean.fleet.auth import Principal, token_principal
from cerulean.fleet.ca import serial_of
from cerulean.fleet.db import Setting, User
from cerulean.fleet.tls import client_der
from cerulean.fleet.web import COOKIE, csrf_token, read_cookie
from cerulean.protocol.fleet import (
    API,
    ENROLL_PATH,
    MAX_BODY,
    MAX_ENROLL_BODY,
    MAX_REPORTS_BODY,
    RENEW_PATH,
    REPORTS_PATH,
)

OPEN_PATHS = frozenset({f"{API}/health", f"{API}/ca", f"{API}/enroll", f"{API}/openapi.json",
                        "/login", "/logout", "/static/style.css"})
AGENT_PREFIX = f"{API}/agent/"
HOST_CACHE_SECONDS = 10.0
HOST_CACHE_SIZE = 100_000

T = TypeVar("T")


def body_limit(path: str) -> int:
    """The largest request body the call at *path* takes, in bytes."""
    if path == REPORTS_PATH:
        return MAX_REPORTS_BODY
    if path in (ENROLL_PATH, RENEW_PATH, "/login"):
        return MAX_ENROLL_BODY
    return MAX_BODY


def _too_large(limit: int) -> Refusal:
    return Refusal(413, f"The request body is larger than this call takes ({limit} bytes).")


class BodyTooLarge(HTTPException):
    """Raised as a request's body passes its limit; FastAPI answers it (413) like any
    HTTPException, also from inside the reading of a body it parses."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than this call takes "
                              f"({limit} bytes).")


@dataclass(frozen=True)
class Caller:
    """Who passed the gate: a person or script (*principal*), or a host (*host_id* and its
    certificate's *serial*). *csrf* is the dashboard's form token for the session."""
    principal: Principal | None = None
    host_id: str = ""
    serial: str = ""
    csrf: str = ""


class Refusal(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}

    async def send(self, send: Any) -> None:
        if self.status == 303:
            body, kind = b"", b"text/plain"
        else:
            body, kind = json.dumps({"detail": str(self)}).encode(), b"application/json"
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


TOKEN_NEEDED = Refusal(401, "An API token is needed (Authorization: Bearer cat_...).",
                       {"WWW-Authenticate": "Bearer"})
TOKEN_BAD = Refusal(401, "The API token is not valid, has expired or was revoked.",
                    {"WWW-Authenticate": "Bearer"})
CERT_NEEDED = Refusal(401, "This call needs the host's client certificate (mTLS).")
LOGIN = Refusal(303, "Log in first.", {"Location": "/login"})


# The server answers over TLS only: browsers are to keep to it for a year.
HSTS = (b"strict-transport-security", b"max-age=31536000")


class Gate:
    def __init__(self, app: Any, sessions: sessionmaker[Session]) -> None:
        self.app = app
        # Reads only: on SQLite this transaction does not take the write lock.
        self.read = sessionmaker(sessions.kw["bind"].execution_options(cerulean_read_only=True))
        self.hosts: dict[bytes, tuple[float, str, str]] = {}
        self.session_key: bytes | None = None

    async def __call__(self, scope: Any, receive: Any, send_on: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send_on)
            return

        async def send(message: Any) -> None:
            if message.get("type") == "http.response.start":  # every answer, refusals too
                message = {**message, "headers": [*message.get("headers", ()), HSTS]}
            await send_on(message)

        limit = body_limit(scope["path"])
        for k, v in scope["headers"]:
            if k.lower() == b"content-length" and (not v.strip().isdigit()
                                                   or int(v) > limit):
                await _too_large(limit).send(send)  # announced: refused before it is read
                return
        read = 0
        started = False

        async def capped_receive() -> Any:
            nonlocal read
            message = await receive()
            if message.get("type") == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    raise BodyTooLarge(limit)
            return message

        async def noted_send(message: Any) -> None:
            nonlocal started
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            if scope["path"] not in OPEN_PATHS:
                try:
                    caller = await self.check(scope)
                except Refusal as r:
                    await r.send(send)
                    return
                scope.setdefault("state", {})["caller"] = caller
            await self.app(scope, capped_receive, noted_send)
        except BodyTooLarge:
            if not started:  # else the answer is under way: the connection just ends
                await _too_large(limit).send(send)

    async def check(self, scope: Any) -> Caller:
        path: str = scope["path"]
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path.startswith(AGENT_PREFIX):
            return await self.host(scope)
        if path == API or path.startswith(API + "/"):
            return await self.token(headers.get(b"authorization", ""))
        return await self.session(headers.get(b"cookie", ""))

    async def _db(self, work: Callable[[Session], T]) -> T:
        def run() -> T:
            with self.read() as s:
                return work(s)
        try:
            return await anyio.to_thread.run_sync(run)
        except (OperationalError, InterfaceError) as e:
            raise Refusal(503, "The database cannot be reached; try again shortly.",
                          {"Retry-After": "5"}) from e

    async def host(self, scope: Any) -> Caller:
        der = client_der(scope)
        if der is None:
            raise CERT_NEEDED
        now = time.monotonic()
        hit = self.hosts.get(der)
        if hit is not None and hit[0] > now:
            return Caller(host_id=hit[2], serial=hit[1])
        serial, cn = serial_of(der)

        def check(s: Session) -> str | None:
            try:
                hostsvc.authenticate_host(s, serial, cn)
            except hostsvc.Refused as e:
                return str(e)
            return None

        problem = await self._db(check)
        if problem is not None:
            self.hosts.pop(der, None)
            raise Refusal(403, problem)
        if len(self.hosts) >= HOST_CACHE_SIZE:
            self.hosts.clear()
        self.hosts[der] = (now + HOST_CACHE_SECONDS, serial, cn)
        return Caller(host_id=cn, serial=serial)

    async def token(self, header: str) -> Caller:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise TOKEN_NEEDED
        p = await self._db(lambda s: token_principal(s, token))
        if p is None:
            raise TOKEN_BAD
        return Caller(principal=p)

    async def session(self, header: str) -> Caller:
        cookie = cookie_parser(header).get(COOKIE, "") if header else ""
        if not cookie:
            raise LOGIN

        def check(s: Session) -> tuple[bytes | None, Principal | None]:
            key = self.session_key
            if key is None:
                row = s.get(Setting, "session-key")
                if row is None:  # nobody has logged in yet
                    return None, None
                key = bytes.fromhex(row.value)
            name = read_cookie(key, cookie, time.time())
            user = s.get(User, name) if name else None
            if user is None or user.disabled or not user.password_hash:
                return key, None
            return key, Principal(user.name, user.role)

        key, who = await self._db(check)
        self.session_key = key
        if key is None or who is None:
            raise LOGIN
        return Caller(principal=who, csrf=csrf_token(key, cookie))


def caller_of(scope_state: Any) -> Caller:
    """The gate's finding for a request (``request.state``); an empty Caller if none."""
    c = getattr(scope_state, "caller", None)
    return c if isinstance(c, Caller) else Caller()
