"""uvicorn's httptools protocol with each loop turn's writes to a connection sent as one.

uvicorn writes the status line and headers of a response (``http.response.start``) and then its
body (``http.response.body``) as two ``transport.write`` calls. uvloop sends each at once: two
``send`` system calls and two TCP segments for every non-streamed answer, where one would do. On
loopback the kernel also runs the receiver's side of each segment on the sending core, so the second
write cost the gateway about a tenth of its CPU time per request (``loadtest/gateway_bench.py``).

:class:`CoalescingHttpToolsProtocol` gives uvicorn a transport that collects what is written to a
connection during one turn of the event loop and hands it to the real transport in one ``write`` at
the start of the next turn (``loop.call_soon``): bytes, order and framing are unchanged, nothing
waits for more data, and a stream's chunks still leave as they are sent. ``close`` and
``write_eof`` send what is pending first; ``abort`` drops it, as the real transport would.

It also tells the app at once when a connection is lost: each request's scope carries the
connection's set of disconnect callbacks (``scope["extensions"][DISCONNECT_CALLBACKS]``), which a
:class:`~sglang_ext.engine_server.client_watch.ClientWatch` joins for as long as it waits; the
alternative, a task per request listening on ``receive``, cost about 9% of a request's instructions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sglang_ext.engine_server.client_watch import DISCONNECT_CALLBACKS


class TurnBatchedTransport:
    """A transport proxy: ``write`` calls of one loop turn reach the wrapped transport as one."""

    __slots__ = ("_loop", "_pending", "_scheduled", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Hand what is pending to the real transport (dropped if the connection is already gone)."""
        self._scheduled = False
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if self.transport.is_closing():
            return
        self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def abort(self) -> None:
        self._pending = []
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:  # everything else: the real transport's
        return getattr(self.transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol, writing through a :class:`TurnBatchedTransport` and calling
    the connection's disconnect callbacks when it is lost."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.disconnect_callbacks: set[Callable[[], None]] = set()
        super().connection_made(TurnBatchedTransport(transport, self.loop))  # type: ignore[arg-type]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {DISCONNECT_CALLBACKS: self.disconnect_callbacks}  # type: ignore[typeddict-unknown-key]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for callback in list(self.disconnect_callbacks):
            callback()
