"""Graceful shutdown on SIGTERM, the signal Kubernetes sends before it kills a pod.

uvicorn already does the draining: on SIGTERM it closes the listening socket (the pod's endpoint
is leaving the Service anyway), lets in-flight requests and streams finish for up to
``timeout_graceful_shutdown`` (``DFLARE_SHUTDOWN_GRACE_S``), runs the lifespan shutdown, and then
re-raises the signal so the default action runs. For SIGTERM that default is death by signal,
exit status 143, which supervisors and CI count as a crash. uvicorn restores the handler that was
in place before it started, so installing ours first turns that final re-raise into exit 0. A
SIGTERM that arrives before uvicorn took over (while importing) exits at once, also with 0.
Streams still running near the deadline are ended cleanly by ``drain_before_deadline``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from types import FrameType


def _exit_zero(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def exit_zero_after_drain() -> None:
    """Call in the main thread before ``uvicorn.run``; harmless when several workers are supervised."""
    signal.signal(signal.SIGTERM, _exit_zero)


def drain_before_deadline(grace_s: float, drain: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """On SIGTERM, run ``drain`` shortly before uvicorn's ``grace_s`` deadline; returns an undo.

    Past the deadline uvicorn cancels what still runs, and a stream cut that way just stops (a
    truncated chunked body). Draining a little earlier lets each running stream end properly, with
    an OpenAI error event and ``[DONE]``. Chains to the handler in place (uvicorn's, which starts
    the shutdown). Call from the event loop in the main thread, after uvicorn installed its
    handlers (the lifespan); elsewhere (tests, threads) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    delay = max(grace_s - min(1.0, grace_s / 4), 0.0)
    tasks: set[asyncio.Task[None]] = set()

    def start_drain() -> None:
        task = loop.create_task(drain())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(loop.call_later, delay, start_drain)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)

    def undo() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return undo
