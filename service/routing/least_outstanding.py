"""Least outstanding requests (the default): send to the backend with the fewest requests in flight.

LLM requests differ in length by orders of magnitude, so counting what is still running tracks a
replica's real load far better than turns. Ties are broken at random so that an idle fleet still
spreads a burst instead of piling it onto the first key.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from service.routing.policy import RouteDecision, RouteRequest, RoutingPolicy, register
from service.routing.pool import BackendEndpoint


@register("least_outstanding")
class LeastOutstandingPolicy(RoutingPolicy):
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[BackendEndpoint], request: RouteRequest) -> RouteDecision:
        lowest = min(e.outstanding for e in candidates)
        best = [e for e in candidates if e.outstanding == lowest]
        return RouteDecision(self._rng.choice(best), f"least_outstanding({lowest})")
