"""Graceful shutdown on SIGTERM, the signal Kubernetes sends before it kills a pod.

uvicorn already does the draining: on SIGTERM it closes the listening socket (the pod's endpoint
is leaving the Service anyway), lets in-flight requests and streams finish for up to
``timeout_graceful_shutdown`` (``DFLARE_SHUTDOWN_GRACE_S``), runs the lifespan shutdown, and then
re-raises the signal so the default action runs. For SIGTERM that default is death by signal,
exit status 143, which supervisors and CI count as a crash. uvicorn restores the handler that was
in place before it started, so installing ours first turns that final re-raise into exit 0. A
SIGTERM that arrives before uvicorn took over (while importing) exits at once, also with 0.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _exit_zero(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def exit_zero_after_drain() -> None:
    """Call in the main thread before ``uvicorn.run``; harmless when several workers are supervised."""
    signal.signal(signal.SIGTERM, _exit_zero)
