"""Round robin: equal turns, blind to load. Predictable; useful for identical, uniform traffic."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from service.routing.policy import RouteDecision, RouteRequest, RoutingPolicy, register
from service.routing.pool import BackendEndpoint


@register("round_robin")
class RoundRobinPolicy(RoutingPolicy):
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[BackendEndpoint], request: RouteRequest) -> RouteDecision:
        # Order by key so the rotation is stable while membership changes.
        ordered = sorted(candidates, key=lambda e: e.key)
        return RouteDecision(ordered[next(self._counter) % len(ordered)], "round_robin")
