"""A lean pooled HTTP/1.1 client for the gateway's one hot call: ``POST`` JSON to an SGLang server.

Why not aiohttp here: its ``ClientSession`` request machinery (request and response objects,
header multidicts, payload registry, timers, trace hooks, cookie jar) costs about 385,000 CPU
instructions per request (measured with callgrind against the benchmark's fake backend), a third
of everything the gateway spent on a completion. This client writes the request as one byte string
on a kept-alive connection and lets ``httptools`` (uvicorn's parser, already a dependency) frame
the response: status, ``Content-Length`` or chunked body, keep-alive. aiohttp still serves health
checks, ``/v1/models`` and ``https`` backends.

The response object offers the subset of ``aiohttp.ClientResponse`` the backend uses (``status``,
``read()``, ``content.readany()``, ``release()``, ``close()``), and failures are raised as aiohttp's
exception types (a connect timeout as ``ConnectionTimeoutError``, a refused connect as
``ClientConnectorError``, a broken connection as a ``ClientConnectionError`` subclass, a malformed
answer as ``ClientPayloadError``), so the backend's mapping to OpenAI errors and the router's retry
rules apply unchanged. A connection whose answer was not read to the end (a cancelled or abandoned
request) is closed, never reused; closing a stream early closes its connection, which SGLang takes
as an abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque

import aiohttp
import httptools
from aiohttp.client_reqrep import ConnectionKey

HIGH_WATER = 256 * 1024  # bytes buffered from upstream before reading pauses (a slow client)


class _Connection(asyncio.Protocol):
    """One kept-alive connection; at most one request in flight on it."""

    def __init__(self, pool: H1Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.headers_done: asyncio.Future[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.paused = False

    # ---- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:  # an upgrade too: we never ask for one
            self._fail(aiohttp.ClientPayloadError(f"Invalid HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        if not self.complete:
            if exc is None:
                self._fail(aiohttp.ServerDisconnectedError("Server disconnected"))
            else:
                self._fail(aiohttp.ClientOSError(getattr(exc, "errno", None) or 0, f"Connection lost: {exc}"))

    # ---- httptools callbacks --------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.headers_done is not None and not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # ---- helpers --------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        for fut in (self.headers_done, self.waiter):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self.complete = False  # never back to the pool
        if self.transport is not None:
            self.transport.close()


class H1Response:
    """The answer to one request: status known, body read with :meth:`read` or :meth:`readany`."""

    __slots__ = ("_conn", "_released", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self._released = False

    @property
    def complete(self) -> bool:
        """The whole body has arrived: :meth:`read` returns without waiting."""
        return self._conn.complete

    @property
    def content(self) -> H1Response:
        """``resp.content.readany()`` as on an aiohttp response."""
        return self

    async def readany(self) -> bytes:
        """The next body bytes received, or ``b""`` at the end of the body."""
        conn = self._conn
        while not conn.chunks:
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            conn.waiter = asyncio.get_running_loop().create_future()
            try:
                await conn.waiter
            finally:
                conn.waiter = None
        data = b"".join(conn.chunks) if len(conn.chunks) > 1 else conn.chunks[0]
        conn.chunks.clear()
        conn.buffered = 0
        if conn.paused and conn.transport is not None:
            conn.paused = False
            conn.transport.resume_reading()
        return data

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool once it is read."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        self.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Done with the answer: a fully read one frees its connection for reuse, else it is closed."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if conn.complete and conn.keep_alive and not conn.chunks and conn.error is None:
            conn.pool.put_back(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abandon the answer and its connection (the server sees the disconnect)."""
        self._released = True
        self._conn.close()


class H1Pool:
    """Kept-alive connections to one ``host:port`` (no cap: the gateway's in-flight limit bounds them)."""

    def __init__(self, host: str, port: int, connect_timeout_s: float) -> None:
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self.idle: list[_Connection] = []
        self.all: set[_Connection] = set()
        self.key = ConnectionKey(host, port, False, True, None, None, None, None)
        host_header = host if ":" not in host else f"[{host}]"
        self.host_header = f"Host: {host_header}:{port}\r\n".encode("latin-1")

    def forget(self, conn: _Connection) -> None:
        self.all.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def put_back(self, conn: _Connection) -> None:
        if conn.transport is not None and not conn.transport.is_closing():
            self.idle.append(conn)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await loop.create_connection(lambda: conn, self.host, self.port)
        except TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(
                f"Connection timeout to host {self.host}:{self.port}"
            ) from exc
        except OSError as exc:  # refused, unreachable, unresolvable: what aiohttp raises for it
            raise aiohttp.ClientConnectorError(self.key, exc) from exc
        self.all.add(conn)
        return conn

    async def post(self, target: bytes, headers: bytes, body: bytes) -> H1Response:
        """Send ``POST target`` with ``headers`` (``Name: value\\r\\n`` lines) and ``body``; return
        once the status line and headers arrived."""
        conn = None
        while self.idle:
            candidate = self.idle.pop()
            if candidate.transport is not None and not candidate.transport.is_closing():
                conn = candidate
                break
        if conn is None:
            conn = await self._connect()
        conn.parser = httptools.HttpResponseParser(conn)
        conn.status, conn.complete, conn.keep_alive, conn.error = 0, False, False, None
        conn.chunks.clear()
        conn.buffered = 0
        conn.headers_done = asyncio.get_running_loop().create_future()
        head = b"POST %s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n" % (
            target,
            self.host_header,
            headers,
            len(body),
        )
        try:
            assert conn.transport is not None
            conn.transport.write(head + body)
            await conn.headers_done
        except BaseException:
            conn.close()
            raise
        finally:
            conn.headers_done = None
        return H1Response(conn)

    async def close(self) -> None:
        for conn in list(self.all):
            conn.close()
        self.all.clear()
        self.idle.clear()
