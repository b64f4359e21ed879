"""The lean upstream client (service.backends.h1client) against a raw HTTP/1.1 server on loopback.

The server writes exact bytes, so framing (Content-Length, chunked, split packets), keep-alive reuse,
a connection closed mid-answer, a refused connect and a slow reader are each checked on the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest

from service.backends.h1client import HIGH_WATER, H1Pool


class RawServer:
    """Reads one request head + Content-Length body at a time; ``answer`` writes the reply bytes."""

    def __init__(self, answer: Callable[[bytes, asyncio.StreamWriter], object]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                result = self.answer(body, writer)
                if asyncio.iscoroutine(result):
                    await result
                await writer.drain()
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> H1Pool:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.pool = H1Pool("127.0.0.1", port, connect_timeout_s=2.0)
        return self.pool

    async def __aexit__(self, *exc: object) -> None:
        await self.pool.close()
        assert self.server is not None
        self.server.close()


def fixed(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


async def post(pool: H1Pool, body: bytes = b'{"x":1}'):
    return await pool.post(b"/v1/chat/completions", b"Content-Type: application/json\r\n", body)


async def test_content_length_answers_reuse_one_connection():
    server = RawServer(lambda body, w: w.write(fixed(b"echo:" + body)))
    async with server as pool:
        for i in range(3):
            resp = await post(pool, b'{"i":%d}' % i)
            assert resp.status == 200
            assert await resp.read() == b'echo:{"i":%d}' % i
    assert server.connections == 1
    head = server.requests[0]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Content-Length: 7\r\n" in head


async def test_chunked_answer_split_across_packets_is_relayed_in_order():
    async def answer(body: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
            chunk = b"%x\r\n%s\r\n" % (len(part), part)
            w.write(chunk[:3])  # split inside the chunk header
            await w.drain()
            await asyncio.sleep(0.01)
            w.write(chunk[3:])
            await w.drain()
        w.write(b"0\r\n\r\n")

    server = RawServer(answer)
    async with server as pool:
        resp = await post(pool)
        got = b""
        while chunk := await resp.content.readany():
            got += chunk
        assert got == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        resp.release()
        assert len(pool.idle) == 1  # fully read: back in the pool
        resp2 = await post(pool)
        assert resp2.status == 200
        resp2.close()
    assert server.connections == 1


async def test_error_status_body_is_read():
    answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
    server = RawServer(lambda body, w: w.write(answer))
    async with server as pool:
        resp = await post(pool)
        assert resp.status == 503 and await resp.read() == b"busy"


async def test_connection_closed_mid_body_raises_a_client_error():
    def answer(body: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        w.close()

    async with RawServer(answer) as pool:
        resp = await post(pool)
        with pytest.raises(aiohttp.ClientConnectionError):
            await resp.read()
        assert not pool.idle


async def test_abandoned_answer_closes_its_connection():
    async def answer(body: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")

    server = RawServer(answer)
    async with server as pool:
        resp = await post(pool)
        assert await resp.content.readany() == b"hello"
        resp.close()  # the stream is cut early: never reused
        resp2 = await post(pool)
        resp2.close()
    assert server.connections == 2


async def test_refused_connect_is_a_connector_error():
    pool = H1Pool("127.0.0.1", _closed_port(), connect_timeout_s=2.0)
    with pytest.raises(aiohttp.ClientConnectorError):
        await post(pool)


async def test_a_slow_reader_pauses_the_upstream_and_loses_nothing():
    big = bytes(range(256)) * (4 * HIGH_WATER // 256)
    server = RawServer(lambda body, w: w.write(fixed(big)))
    async with server as pool:
        resp = await post(pool)
        await asyncio.sleep(0.2)  # let the server fill the buffer: reading must have paused
        assert resp._conn.paused
        assert await resp.read() == big


async def test_cancelled_request_does_not_poison_the_pool():
    gate = asyncio.Event()

    async def answer(body: bytes, w: asyncio.StreamWriter) -> None:
        if body == b"slow":
            await gate.wait()
        w.write(fixed(b"ok:" + body))

    server = RawServer(answer)
    async with server as pool:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await post(pool, b"slow")
        gate.set()
        resp = await post(pool, b"fast")
        assert await resp.read() == b"ok:fast"  # not the late answer to the cancelled request


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
