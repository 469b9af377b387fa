"""The controller's HTTP edge: what every request passes before the app reads a byte of its body.

A pure ASGI middleware (`Edge`), in this order:
1. a declared Content-Length over `Settings.max_body_bytes`: 413 at once;
2. `/v1/...`: a syntactically valid `Authorization: Bearer TOKEN`, then the token itself
   (Controller.authenticate, usually the store's token cache), else 401; a peer address with too
   many failed tokens lately gets 429 for any token not already known good;
3. the token's rate limit (admins exempt): 429 with Retry-After;
4. a body streamed without a length (chunked) is counted as it arrives: past the cap, 413.

Note [Authenticate before the body]: FastAPI reads and parses a route's body before it solves
the route's dependencies, so a check of the token in a dependency comes after the whole body is in
memory: a 200 MiB chunked body with no token grew the controller by 400-500 MiB before its
answer. Here the token is checked first, so a caller without a valid token never has a byte of
its body read, and one with a token has at most `max_body_bytes` read. The principal found is
handed to the routes in the request state (`principal` in app.py uses it), so a token is checked
once per request.

Note [Close after an early answer]: an answer sent before the body was read (or while it was
still arriving) says `Connection: close`, so uvicorn closes the connection instead of reading
and discarding the rest of the body to reach the next request.

Paths outside `/v1` (/healthz, /openapi.json, /docs, /redoc, and 404s) need no token; their
bodies are capped all the same.
"""

from __future__ import annotations

import math
import re
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpupool.controller.errors import ControllerError
from gpupool.controller.ratelimit import Buckets

if TYPE_CHECKING:
    from gpupool.controller.app import Controller
    from gpupool.controller.store import Principal

# RFC 6750's b64token; our tokens are "gpt_" + URL-safe base64. Longer than any real token is refused
# before it is hashed or looked up.
_BEARER = re.compile(rb"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/-]{1,512}=*) *")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    """The app's error shape, `{"code", "message", ...}` (ErrorOut in app.py)."""
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"code": code, "message": message, **extra}, status_code=status, headers=headers)


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of the first Authorization header if it is `Bearer TOKEN` (the header HTTPBearer
    reads), else None."""
    for name, value in headers:
        if name == b"authorization":
            m = _BEARER.fullmatch(value)
            return m.group(1).decode("ascii") if m else None
    return None


class Edge:
    """Authenticate, rate-limit and cap bodies before the app runs (the module's docstring)."""

    def __init__(self, app: ASGIApp, controller: Controller) -> None:
        self.app = app
        self.controller = controller
        s = controller.settings
        self.max_body = s.max_body_bytes
        self.per_token = Buckets(s.rate_per_s, s.rate_burst)
        self.failures = Buckets(s.auth_failures_per_s, s.auth_failure_burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
        length = next((v for k, v in headers if k == b"content-length"), None)
        has_body = length not in (None, b"0") or any(k == b"transfer-encoding" for k, _ in headers)
        close = {"Connection": "close"} if has_body else {}  # Note [Close after an early answer]
        if length is not None and not length.isdigit():
            await error_response(400, "invalid_request", "invalid request: a bad Content-Length header",
                                 close)(scope, receive, send)
            return
        if length is not None and int(length) > self.max_body:
            await self._too_large()(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if path == "/v1" or path.startswith("/v1/"):
            refusal = await self._admit(scope, headers)
            if refusal is not None:
                refusal.headers.update(close)
                await refusal(scope, receive, send)
                return
        if not has_body:
            await self.app(scope, receive, send)
            return
        await self._capped(scope, receive, send)

    def _too_large(self) -> JSONResponse:
        return error_response(413, "too_large", f"request bodies are limited to {self.max_body} bytes",
                              {"Connection": "close"})

    async def _admit(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> JSONResponse | None:
        """None if the caller's token is good and within its rate, else the answer to send.
        On success the principal is left in the request state (Note [Authenticate before the body])."""
        secret = bearer_token(headers)
        if secret is None:
            present = any(k == b"authorization" for k, _ in headers)
            why = " (the Authorization header is not `Bearer TOKEN`)" if present else ""
            return error_response(401, "unauthorized", f"missing bearer token{why}: pass --token or set GPUPOOL_TOKEN")
        c = self.controller
        principal: Principal | None = c.store.cached_principal(secret, time.time())
        if principal is None:
            peer = (scope.get("client") or ("?", 0))[0]
            wait = self.failures.wait(peer, time.monotonic())
            if wait > 0:
                return self._slow_down(wait, f"too many invalid tokens from {peer}")
            try:
                principal = await c.authenticate(secret)
            except ControllerError as e:
                if e.status == 401:
                    self.failures.take(peer, time.monotonic())
                return error_response(e.status, e.code, str(e))
            except OperationalError:
                return error_response(503, "database_unavailable", "the controller's database is unavailable "
                                      "or busy: retry shortly", {"Retry-After": "1"})
        if not principal.admin:
            # Admins are exempt: an admin token can mint as many tokens as it likes, so a limit on
            # it binds no one, and operators' tools (benchmarks, `gpupool up`) run as admin.
            wait = self.per_token.take(principal.token_id, time.monotonic())
            if wait > 0:
                return self._slow_down(wait, f"token {principal.token_id} is over its rate limit "
                                             f"({c.settings.rate_per_s:g} requests a second)")
        scope.setdefault("state", {})["principal"] = principal
        return None

    @staticmethod
    def _slow_down(wait: float, why: str) -> JSONResponse:
        after = max(1, math.ceil(wait))
        return error_response(429, "rate_limited", f"{why}: retry in {after} s", {"Retry-After": str(after)})

    async def _capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with a body counted as it arrives; past the cap, answer 413 and tell the app
        the client went away (its own answer is then dropped)."""
        seen = 0
        refused = started = False

        async def capped_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    refused = True
                    if not started:
                        await self._too_large()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, capped_receive, guarded_send)
