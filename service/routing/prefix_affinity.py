"""Prefix affinity: the same prompt prefix goes to the same backend, so SGLang's radix cache hits.

The API layer hands over the prompt prefix as ``BackendRequest.affinity_key``. Consistent hashing
of that prefix on a ring of virtual nodes: adding or removing a backend moves only the keys that
belonged to it. Pure affinity would let one hot system prompt melt one
replica, so the choice is bounded by load (consistent hashing with bounded loads): walking the ring
from the key's point, the first backend whose outstanding count is within ``load_factor`` x the
mean (+1) takes the request; the reason says whether it was the affine one or a spill.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence

from service.routing.policy import RouteDecision, RouteRequest, RoutingPolicy, register
from service.routing.pool import BackendEndpoint

VIRTUAL_NODES = 64


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@register("prefix_affinity")
class PrefixAffinityPolicy(RoutingPolicy):
    def __init__(self, load_factor: float = 1.25) -> None:
        self.load_factor = load_factor
        self._ring_keys: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []

    def choose(self, candidates: Sequence[BackendEndpoint], request: RouteRequest) -> RouteDecision:
        by_key = {e.key: e for e in candidates}
        if request.affinity_key is None:
            best = min(candidates, key=lambda e: (e.outstanding, e.key))
            return RouteDecision(best, "no_prefix_least_outstanding")
        self._ensure_ring(sorted(by_key))
        mean = sum(e.outstanding for e in candidates) / len(candidates)
        bound = math.ceil(self.load_factor * (mean + 1))
        start = bisect.bisect(self._points, _hash(request.affinity_key)) % len(self._points)
        first: BackendEndpoint | None = None
        seen: set[str] = set()
        for i in range(len(self._points)):
            owner = self._owners[(start + i) % len(self._points)]
            if owner in seen:
                continue
            seen.add(owner)
            endpoint = by_key[owner]
            first = first or endpoint
            if endpoint.outstanding < bound:
                reason = "prefix_hit" if endpoint is first else f"prefix_spill(from={first.key})"
                return RouteDecision(endpoint, reason)
            if len(seen) == len(by_key):
                break
        assert first is not None
        return RouteDecision(first, "prefix_hit_overloaded")

    def _ensure_ring(self, keys: list[str]) -> None:
        if tuple(keys) == self._ring_keys:
            return
        ring = sorted((_hash(f"{key}#{v}"), key) for key in keys for v in range(VIRTUAL_NODES))
        self._points = [point for point, _ in ring]
        self._owners = [key for _, key in ring]
        self._ring_keys = tuple(keys)
