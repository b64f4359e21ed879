"""Health thresholds and circuit breaker state machines, driven by a fake clock."""

from __future__ import annotations

from service.routing.health import BreakerState, CircuitBreaker, HealthState, HealthStatus


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pending_backend_is_admitted_only_after_success_threshold() -> None:
    state = HealthState(fail_threshold=3, success_threshold=2)
    for _ in range(10):  # loading: failures keep it pending, never "unhealthy"
        state.record(False)
    assert state.status is HealthStatus.PENDING
    assert not state.record(True)
    assert state.status is HealthStatus.PENDING
    assert state.record(True)
    assert state.healthy


def test_healthy_backend_leaves_after_fail_threshold_and_comes_back() -> None:
    state = HealthState(fail_threshold=3, success_threshold=1)
    state.record(True)
    state.record(False)
    state.record(False)
    state.record(True)  # a success resets the failure run
    state.record(False)
    state.record(False)
    assert state.healthy
    assert state.record(False)
    assert state.status is HealthStatus.UNHEALTHY
    assert state.record(True)
    assert state.healthy


def test_mark_down_ejects_at_once() -> None:
    state = HealthState(fail_threshold=3, success_threshold=1)
    state.record(True)
    state.mark_down()
    assert state.status is HealthStatus.UNHEALTHY


def test_breaker_opens_then_half_open_admits_one_trial() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=5, max_cooldown_s=20, clock=clock)
    for _ in range(2):
        breaker.on_failure()
    assert breaker.available()
    breaker.on_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.available()
    clock.now += 4.9
    assert not breaker.available()
    clock.now += 0.2
    assert breaker.available() and breaker.state is BreakerState.HALF_OPEN
    breaker.on_dispatch()
    assert not breaker.available()  # only one trial at a time
    breaker.on_success()
    assert breaker.state is BreakerState.CLOSED and breaker.available()


def test_failed_trial_reopens_with_doubled_bounded_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, max_cooldown_s=8, clock=clock)
    breaker.on_failure()
    clock.now += 5
    assert breaker.available()
    breaker.on_dispatch()
    breaker.on_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now += 7.9
    assert not breaker.available()  # cool-down is now min(10, 8) = 8
    clock.now += 0.1
    assert breaker.available()
    breaker.on_dispatch()
    breaker.on_abandon()  # the trial's client left: another trial may go
    assert breaker.available()


def test_reset_closes_breaker() -> None:
    breaker = CircuitBreaker(failure_threshold=1)
    breaker.on_failure()
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED and breaker.available()
