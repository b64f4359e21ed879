"""The set of known backends and which of them may take a request now.

Discovery (static list or Kubernetes) decides *membership* through ``add`` / ``remove`` / ``replace``;
the health prober decides *admission* through each member's ``HealthState``; the routed backend asks
``candidates(model)`` for the routable members that serve a model. Membership changes are applied
at once: a deleted or NotReady pod is gone from the next routing decision, while requests already
running on it finish on their own connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from service.routing.health import CircuitBreaker, HealthState

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class BackendEndpoint:
    """One backend replica. ``client`` is the single-URL backend object requests go through."""

    key: str  # pod name under discovery, the URL for static backends
    url: str
    health: HealthState
    breaker: CircuitBreaker
    client: Any = None
    models: frozenset[str] = frozenset()
    outstanding: int = 0

    @property
    def routable(self) -> bool:
        return self.health.healthy and self.breaker.available()

    def serves(self, model: str | None) -> bool:
        return model is None or model in self.models

    def __repr__(self) -> str:
        return f"BackendEndpoint({self.key!r}, {self.url!r}, {self.health.status}, {self.breaker.state})"


EndpointFactory = Callable[[str, str], BackendEndpoint]
Listener = Callable[[str, BackendEndpoint], None]


class BackendPool:
    """Membership of backends keyed by a stable key; URL changes replace the member."""

    def __init__(self, make_endpoint: EndpointFactory) -> None:
        self._make_endpoint = make_endpoint
        self._members: dict[str, BackendEndpoint] = {}
        self._listeners: list[Listener] = []

    # --- membership (discovery side) ---
    def subscribe(self, listener: Listener) -> None:
        """``listener(event, endpoint)`` with event ``added`` or ``removed``."""
        self._listeners.append(listener)

    def add(self, key: str, url: str) -> BackendEndpoint:
        current = self._members.get(key)
        if current is not None and current.url == url:
            return current
        if current is not None:
            self.remove(key)
        endpoint = self._make_endpoint(key, url)
        self._members[key] = endpoint
        logger.info("backend %s added (%s), waiting for its health check", key, url)
        self._emit("added", endpoint)
        return endpoint

    def remove(self, key: str) -> BackendEndpoint | None:
        endpoint = self._members.pop(key, None)
        if endpoint is not None:
            logger.info("backend %s removed (%s)", key, endpoint.url)
            self._emit("removed", endpoint)
        return endpoint

    def replace(self, wanted: dict[str, str]) -> None:
        """Make membership exactly ``wanted`` (key -> URL): used after a full re-list."""
        for key in [k for k in self._members if k not in wanted]:
            self.remove(key)
        for key, url in wanted.items():
            self.add(key, url)

    # --- queries (routing side) ---
    def members(self) -> list[BackendEndpoint]:
        return list(self._members.values())

    def get(self, key: str) -> BackendEndpoint | None:
        return self._members.get(key)

    def __contains__(self, endpoint: object) -> bool:
        return isinstance(endpoint, BackendEndpoint) and self._members.get(endpoint.key) is endpoint

    def __len__(self) -> int:
        return len(self._members)

    def candidates(self, model: str | None, exclude: Iterable[BackendEndpoint] = ()) -> list[BackendEndpoint]:
        excluded = {id(e) for e in exclude}
        return [e for e in self._members.values() if id(e) not in excluded and e.routable and e.serves(model)]

    def healthy(self) -> list[BackendEndpoint]:
        return [e for e in self._members.values() if e.health.healthy]

    def models(self) -> set[str]:
        """Models served by admitted backends."""
        return {m for e in self.healthy() for m in e.models}

    def _emit(self, event: str, endpoint: BackendEndpoint) -> None:
        for listener in self._listeners:
            try:
                listener(event, endpoint)
            except Exception:  # a listener bug must not break membership
                logger.exception("pool listener failed on %s %s", event, endpoint.key)
