"""Per-backend health: active-probe thresholds and a passive circuit breaker.

Two signals with different jobs. Active probes of ``/health`` decide *admission*: a backend (possibly
still loading weights and capturing CUDA graphs) is routable only after ``success_threshold``
consecutive passing probes, and leaves after ``fail_threshold`` consecutive failures. The breaker
reacts to *live traffic* within one request: consecutive request failures open it, ejecting the
backend at once; after a cool-down it turns half-open and lets a single trial request through, whose
outcome closes it again or re-opens it with a doubled cool-down.

Both are plain state machines with an injectable clock, so tests drive them without sleeping.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

Clock = Callable[[], float]


class HealthStatus(enum.StrEnum):
    PENDING = "pending"  # never passed a probe yet (still loading): not routable
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class HealthState:
    """Consecutive-threshold hysteresis over probe results."""

    def __init__(self, fail_threshold: int, success_threshold: int) -> None:
        self.fail_threshold = fail_threshold
        self.success_threshold = success_threshold
        self.status = HealthStatus.PENDING
        self._successes = 0
        self._failures = 0

    def record(self, ok: bool) -> bool:
        """Feed one probe result; returns True when the status changed."""
        before = self.status
        if ok:
            self._successes += 1
            self._failures = 0
            if self._successes >= self.success_threshold:
                self.status = HealthStatus.HEALTHY
        else:
            self._failures += 1
            self._successes = 0
            # A pending backend stays pending (it is loading, not broken) until it has been up once.
            if self.status is HealthStatus.HEALTHY and self._failures >= self.fail_threshold:
                self.status = HealthStatus.UNHEALTHY
        return self.status is not before

    def mark_down(self) -> None:
        """Immediate ejection (connection refused: the process is gone, no need to wait N probes)."""
        if self.status is HealthStatus.HEALTHY:
            self.status = HealthStatus.UNHEALTHY
        self._successes = 0

    @property
    def healthy(self) -> bool:
        return self.status is HealthStatus.HEALTHY


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive request failures; half-open admits one trial."""

    def __init__(
        self,
        failure_threshold: int = 5,
        cooldown_s: float = 5.0,
        max_cooldown_s: float = 60.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._clock = clock
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown_s = cooldown_s
        self._opened_at = 0.0
        self._trial_in_flight = False

    def available(self) -> bool:
        """May a request be sent now? Moves OPEN -> HALF_OPEN once the cool-down has passed."""
        if self.state is BreakerState.OPEN and self._clock() - self._opened_at >= self._cooldown_s:
            self.state = BreakerState.HALF_OPEN
            self._trial_in_flight = False
        if self.state is BreakerState.CLOSED:
            return True
        return self.state is BreakerState.HALF_OPEN and not self._trial_in_flight

    def on_dispatch(self) -> None:
        """A request was sent; in half-open it is the single trial."""
        if self.state is BreakerState.HALF_OPEN:
            self._trial_in_flight = True

    def on_success(self) -> None:
        self._failures = 0
        if self.state is not BreakerState.CLOSED:
            self.state = BreakerState.CLOSED
            self._cooldown_s = self.base_cooldown_s
        self._trial_in_flight = False

    def on_failure(self) -> None:
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self._open(min(self._cooldown_s * 2, self.max_cooldown_s))
        elif self.state is BreakerState.CLOSED and self._failures >= self.failure_threshold:
            self._open(self.base_cooldown_s)

    def on_abandon(self) -> None:
        """The request ended with no verdict (client went away): let another trial through."""
        self._trial_in_flight = False

    def reset(self) -> None:
        """Forget past failures (the backend passed a health probe after being down)."""
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown_s = self.base_cooldown_s
        self._trial_in_flight = False

    def _open(self, cooldown_s: float) -> None:
        self.state = BreakerState.OPEN
        self._cooldown_s = cooldown_s
        self._opened_at = self._clock()
        self._trial_in_flight = False
