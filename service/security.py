"""API keys, request body limit and CORS: the gateway's outer shell, as pure ASGI middleware.

Keys come from ``DFLARE_API_KEYS`` and/or ``DFLARE_API_KEYS_FILE`` (one per line, ``#`` comments; a
mounted Kubernetes secret). Only their SHA-256 digests are kept in memory, and a presented key is
hashed and compared against every digest with ``hmac.compare_digest``, so neither the timing nor a
memory dump reveals a key. With no keys configured the gateway is open (a local demo). ``/health``
and ``/ready`` never need a key (kubelet probes carry none); ``/metrics`` does when
``metrics_require_auth`` is set. Keys travel as ``Authorization: Bearer <key>`` (what OpenAI clients
send) or ``x-api-key``. CORS is off unless ``cors_origins`` lists origins.

The body limit counts what is actually received, so a chunked upload without ``Content-Length``
cannot bypass it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import AuthenticationError, GatewayError, RequestTooLarge

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def load_api_keys(keys: list[str], keys_file: Path | None) -> list[bytes]:
    """SHA-256 digests of the configured keys (env list plus file); raises if the file is unreadable."""
    plain = [k.strip() for k in keys if k.strip()]
    if keys_file is not None:
        for line in Path(keys_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                plain.append(line)
    return [_digest(k) for k in dict.fromkeys(plain)]


class KeyChecker:
    """Constant-time membership test of a presented key against stored digests."""

    def __init__(self, digests: list[bytes]) -> None:
        self._digests = digests

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, presented: str | None) -> bool:
        candidate = _digest(presented or "")
        match = False
        for digest in self._digests:  # no early exit: time does not depend on which key matched
            match |= hmac.compare_digest(candidate, digest)
        return match and presented is not None


async def send_error(send: Send, err: GatewayError, headers: dict[str, str] | None = None) -> None:
    """Send a complete OpenAI-shaped JSON error from middleware (outside FastAPI's exception handlers)."""
    body = orjson.dumps(err.body())
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    merged = {**(err.headers() or {}), **(headers or {})}
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in merged.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _presented_key(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key":
            return value.decode("latin-1").strip() or None
    return None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, checker: KeyChecker, metrics_require_auth: bool = False) -> None:
        self.app = app
        self.checker = checker
        self.open_paths = OPEN_PATHS if metrics_require_auth else OPEN_PATHS | {"/metrics"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # CORS preflights carry no credentials, but never reach this layer: the CORS middleware in
        # front of it answers them itself. Any other OPTIONS needs a key like every other method.
        if scope["type"] != "http" or not self.checker or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        if self.checker.check(presented):
            await self.app(scope, receive, send)
            return
        message = "Missing API key" if presented is None else "Invalid API key"
        err = AuthenticationError(f"{message}: send 'Authorization: Bearer <key>'.")
        await send_error(send, err, {"www-authenticate": "Bearer"})


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive``: an HTTPException, so FastAPI's body parsing re-raises it as a 413
    instead of wrapping it into a 400, and the app's handler gives it the OpenAI shape."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"Request body larger than {max_bytes} bytes.")


def limited_receive(receive: Receive, max_bytes: int) -> Receive:
    """``receive`` that raises :class:`_BodyTooLarge` once more than ``max_bytes`` of body arrived
    (for bodies no ``Content-Length`` bounds up front)."""
    received = 0

    async def receive_limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise _BodyTooLarge(max_bytes)
        return message

    return receive_limited


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``, by ``Content-Length`` up front or by counting chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(send)
                return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive(receive, self.max_bytes), tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        await send_error(send, RequestTooLarge(f"Request body larger than {self.max_bytes} bytes."))
