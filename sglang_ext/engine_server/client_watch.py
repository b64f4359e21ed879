"""Notice a client that leaves while its request waits, and stop waiting for it at once.

An ASGI server reports a closed connection only to whoever awaits ``receive``. A handler that
awaits its engine, or an upstream server, for seconds never does, so a client that gave up kept its
engine request (and the gateway's in-flight slot) until the answer was ready. SGLang polls
``request.is_disconnected()`` for the same reason. :class:`ClientWatch` listens on ``receive`` next
to the handler and cancels the handler's task on ``http.disconnect``: the handler's own cancellation
paths (abort the engine request, close the upstream connection, which SGLang takes as an abort) run
at once. Used by ``dflare engine-server`` and by the gateway, after the request body was read.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import Receive


class ClientGone(Exception):
    """The client disconnected before its answer was complete; nothing more can reach it."""


class ClientWatch:
    """``with ClientWatch(receive): ...`` cancels the block when the client disconnects, and turns
    that cancellation into :class:`ClientGone`. Any other cancellation (a server shutting down)
    passes through unchanged. Enter it only once the body was read: it consumes ``receive``."""

    __slots__ = ("_cancelled", "_listener", "_receive", "_task", "armed")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task | None = None
        self._listener: asyncio.Task | None = None
        self._cancelled = False
        self.armed = False

    async def _listen(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if self.armed and self._task is not None:
            self._cancelled = True
            self._task.cancel()

    def __enter__(self) -> ClientWatch:
        self._task = asyncio.current_task()
        self.armed = True
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.armed = False  # synchronously: a disconnect seen from now on cancels nothing
        if self._listener is not None:
            self._listener.cancel()
        if self._cancelled:
            assert self._task is not None
            self._task.uncancel()
            raise ClientGone from None
