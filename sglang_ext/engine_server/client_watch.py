"""Notice a client that leaves while its request waits, and stop waiting for it at once.

An ASGI server reports a closed connection only to whoever awaits ``receive``. A handler that
awaits its engine, or an upstream server, for seconds never does, so a client that gave up kept its
engine request (and the gateway's in-flight slot) until the answer was ready. SGLang polls
``request.is_disconnected()`` for the same reason. :class:`ClientWatch` listens on ``receive`` next
to the handler and cancels the handler's task on ``http.disconnect``: the handler's own cancellation
paths (abort the engine request, close the upstream connection, which SGLang takes as an abort) run
at once. Used by ``dflare engine-server`` and by the gateway, after the request body was read.

Listening costs a task per request (about 9% of a gateway request's CPU instructions). A server
protocol that calls back on a lost connection, as the gateway's does, offers a set of callbacks in
``scope["extensions"][DISCONNECT_CALLBACKS]``; the watch then registers one there instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.types import Receive

DISCONNECT_CALLBACKS = "dflare.disconnect_callbacks"


class ClientGone(Exception):
    """The client disconnected before its answer was complete; nothing more can reach it."""


class ClientWatch:
    """``with ClientWatch(receive): ...`` cancels the block when the client disconnects, and turns
    that cancellation into :class:`ClientGone`. Any other cancellation (a server shutting down)
    passes through unchanged. Enter it only once the body was read: it consumes ``receive`` (unless
    the server offers disconnect callbacks in ``scope``)."""

    __slots__ = ("_callbacks", "_cancelled", "_listener", "_receive", "_task", "armed")

    def __init__(self, receive: Receive, scope: dict[str, Any] | None = None) -> None:
        self._receive = receive
        extensions = scope.get("extensions") if scope is not None else None
        self._callbacks: set[Callable[[], None]] | None = (
            extensions.get(DISCONNECT_CALLBACKS) if extensions else None
        )
        self._task: asyncio.Task | None = None
        self._listener: asyncio.Task | None = None
        self._cancelled = False
        self.armed = False

    def disconnected(self) -> None:
        """The client is gone: cancel the watched block (if still inside it)."""
        if self.armed and self._task is not None:
            self._cancelled = True
            self._task.cancel()

    async def _listen(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.disconnected()

    def __enter__(self) -> ClientWatch:
        self._task = asyncio.current_task()
        self.armed = True
        if self._callbacks is not None:
            self._callbacks.add(self.disconnected)
        else:
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.armed = False  # synchronously: a disconnect seen from now on cancels nothing
        if self._callbacks is not None:
            self._callbacks.discard(self.disconnected)
        elif self._listener is not None:
            self._listener.cancel()
        if self._cancelled:
            assert self._task is not None
            self._task.uncancel()
            raise ClientGone from None
