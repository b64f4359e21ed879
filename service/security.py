"""API keys, request body limit and CORS: the gateway's outer shell, as pure ASGI middleware.

Keys come from ``DFLARE_API_KEYS`` and/or ``DFLARE_API_KEYS_FILE`` (one per line, ``#`` comments; a
mounted Kubernetes secret). The file is re-read when it changes (checked at most every
``api_keys_reload_s``), so a rotated Secret takes effect without a restart: the kubelet swaps the
mounted file, the next check sees a new inode or mtime and loads it; a file that cannot be read or
parsed keeps the keys in force and is logged. A configured file means auth is on, even while it is
empty (fail closed). ``/metrics`` may also have its own tokens (``metrics_tokens_file``): a scraper's
credential that opens ``/metrics`` and nothing else, so Prometheus never holds a user API key.
Only the keys' SHA-256 digests are kept in memory, and a presented key is
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
import os
import time
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


def _read_keys(keys_file: Path) -> list[str]:
    keys = []
    for line in Path(keys_file).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


def load_api_keys(keys: list[str], keys_file: Path | None) -> list[bytes]:
    """SHA-256 digests of the configured keys (env list plus file); raises if the file is unreadable."""
    plain = [k.strip() for k in keys if k.strip()]
    if keys_file is not None:
        plain += _read_keys(keys_file)
    return [_digest(k) for k in dict.fromkeys(plain)]


def _file_signature(path: Path) -> tuple[int, int, int]:
    """What changes when a file is rewritten or a Secret volume swaps its ``..data`` link."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


class KeyChecker:
    """Constant-time membership test of a presented key against stored digests.

    With ``keys_file`` and ``reload_s`` > 0 the file is checked for changes at most every ``reload_s``
    seconds, on the request path (one ``stat``), and its keys replace the file's previous ones.
    """

    def __init__(
        self,
        digests: list[bytes],
        *,
        static_keys: list[str] | None = None,
        keys_file: Path | None = None,
        reload_s: float = 0.0,
    ) -> None:
        self._digests = digests
        self._static = [k.strip() for k in static_keys or () if k.strip()]
        self._file = keys_file
        self._reload_s = reload_s
        self._next_check = time.monotonic() + reload_s
        self._signature = _file_signature(keys_file) if keys_file is not None and reload_s else None

    @classmethod
    def from_sources(cls, keys: list[str], keys_file: Path | None, reload_s: float = 0.0) -> KeyChecker:
        """Keys from a list and a file; raises if the file is unreadable at start."""
        return cls(load_api_keys(keys, keys_file), static_keys=keys, keys_file=keys_file, reload_s=reload_s)

    def __len__(self) -> int:
        return len(self._digests)

    def __bool__(self) -> bool:
        """Whether keys are required: any key configured, or a keys file (even an empty one)."""
        return bool(self._digests) or self._file is not None

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check or self._file is None:
            return
        self._next_check = now + self._reload_s
        try:
            signature = _file_signature(self._file)
            if signature == self._signature:
                return
            digests = [_digest(k) for k in dict.fromkeys(self._static + _read_keys(self._file))]
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning(
                "keys file %s unreadable, keeping the %d keys in force: %s", self._file, len(self), exc
            )
            return
        self._signature = signature
        self._digests = digests
        logger.info("keys file %s changed: %d keys in force", self._file, len(digests))

    def check(self, presented: str | None) -> bool:
        if self._reload_s:
            self._maybe_reload()
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
    """API keys on every path but the open ones; ``/metrics`` also takes the metrics tokens."""

    def __init__(
        self,
        app: ASGIApp,
        checker: KeyChecker,
        metrics_require_auth: bool = False,
        metrics_checker: KeyChecker | None = None,
    ) -> None:
        self.app = app
        self.checker = checker
        self.metrics_checker = metrics_checker
        self.open_paths = OPEN_PATHS if metrics_require_auth else OPEN_PATHS | {"/metrics"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # CORS preflights carry no credentials, but never reach this layer: the CORS middleware in
        # front of it answers them itself. Any other OPTIONS needs a key like every other method.
        path = scope.get("path")
        metrics_path = path == "/metrics" and self.metrics_checker is not None
        if scope["type"] != "http" or not (self.checker or metrics_path) or path in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        if self.checker.check(presented) or (
            metrics_path and self.metrics_checker is not None and self.metrics_checker.check(presented)
        ):
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
