"""Routing policies over in-memory endpoints: choice, spread, stickiness, load bound, reasons."""

from __future__ import annotations

import collections
import random

import pytest

from service.routing.health import CircuitBreaker, HealthState
from service.routing.policy import RouteRequest, make_policy
from service.routing.pool import BackendEndpoint
from service.routing.prefix_affinity import PrefixAffinityPolicy
from service.routing.retry import RetryPolicy


def endpoints(n: int) -> list[BackendEndpoint]:
    out = []
    for i in range(n):
        e = BackendEndpoint(f"b{i}", f"http://10.0.0.{i}:30000", HealthState(3, 1), CircuitBreaker())
        e.health.record(True)
        out.append(e)
    return out


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")


def test_round_robin_takes_turns() -> None:
    policy = make_policy("round_robin")
    eps = endpoints(3)
    picks = [policy.choose(eps, RouteRequest("m")).endpoint.key for _ in range(6)]
    assert picks == ["b0", "b1", "b2", "b0", "b1", "b2"]


def test_least_outstanding_picks_least_loaded_and_spreads_ties() -> None:
    policy = make_policy("least_outstanding")
    eps = endpoints(3)
    eps[0].outstanding, eps[1].outstanding, eps[2].outstanding = 4, 1, 2
    decision = policy.choose(eps, RouteRequest("m"))
    assert decision.endpoint.key == "b1" and decision.reason == "least_outstanding(1)"
    for e in eps:
        e.outstanding = 0
    seen = {policy.choose(eps, RouteRequest("m")).endpoint.key for _ in range(60)}
    assert seen == {"b0", "b1", "b2"}


def test_prefix_affinity_is_sticky_and_spreads_distinct_prefixes() -> None:
    policy = make_policy("prefix_affinity")
    eps = endpoints(4)
    owners = collections.Counter()
    for i in range(200):
        key = f"system prompt #{i}: you are a helpful assistant"
        first = policy.choose(eps, RouteRequest("m", key))
        again = policy.choose(eps, RouteRequest("m", key))
        assert first.endpoint is again.endpoint and first.reason == "prefix_hit"
        owners[first.endpoint.key] += 1
    assert len(owners) == 4 and min(owners.values()) > 20  # 64 virtual nodes each: roughly even


def test_prefix_affinity_moves_only_the_keys_of_a_removed_backend() -> None:
    policy = PrefixAffinityPolicy()
    eps = endpoints(4)
    keys = [f"prefix {i}" for i in range(300)]
    before = {k: policy.choose(eps, RouteRequest("m", k)).endpoint.key for k in keys}
    after = {k: policy.choose(eps[:3], RouteRequest("m", k)).endpoint.key for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "b3" for k in moved)


def test_prefix_affinity_spills_when_the_owner_is_overloaded() -> None:
    policy = PrefixAffinityPolicy(load_factor=1.25)
    eps = endpoints(3)
    owner = policy.choose(eps, RouteRequest("m", "hot prefix")).endpoint
    owner.outstanding = 10  # mean 3.33 -> bound ceil(1.25 * 4.33) = 6
    decision = policy.choose(eps, RouteRequest("m", "hot prefix"))
    assert decision.endpoint is not owner
    assert decision.reason == f"prefix_spill(from={owner.key})"


def test_retry_attempts_and_backoff_bounds() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_base_s=0.1, backoff_max_s=0.3, rng=random.Random(1))
    assert policy.should_retry(1) and policy.should_retry(2) and not policy.should_retry(3)
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.3), (8, 0.3)):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 4  # jitter is real
