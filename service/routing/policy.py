"""Routing policies: which of the routable backends gets this request, and why.

A policy is a strategy over an already filtered candidate list (routable, serving the model, not yet
tried by this request); the reason it returns goes into the access log, so an operator can tell a
cache-affinity hit from a load-driven spill. Policies are picked by name through ``make_policy``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.routing.pool import BackendEndpoint


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at. ``affinity_key`` is the prompt prefix (prefix affinity only)."""

    model: str | None
    affinity_key: str | None = None


@dataclass(frozen=True)
class RouteDecision:
    endpoint: BackendEndpoint
    reason: str


class RoutingPolicy(abc.ABC):
    name: str

    @abc.abstractmethod
    def choose(self, candidates: Sequence[BackendEndpoint], request: RouteRequest) -> RouteDecision:
        """Pick one of ``candidates`` (never empty)."""


_REGISTRY: dict[str, Callable[[], RoutingPolicy]] = {}


def register(name: str) -> Callable[[type[RoutingPolicy]], type[RoutingPolicy]]:
    def deco(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def make_policy(name: str) -> RoutingPolicy:
    # Import for the registration side effect; kept here so callers only need this module.
    from service.routing import least_outstanding, prefix_affinity, round_robin  # noqa: F401

    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(_REGISTRY)}") from None
