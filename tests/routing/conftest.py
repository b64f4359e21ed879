"""Fixtures: stand-in SGLang backends and gateways as real processes on loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.routing.harness import FakeBackend, Gateway, start_fake, start_fakes, start_gateway


@pytest.fixture
def spawn() -> Iterator[Callable[..., FakeBackend]]:
    """``spawn(name, *args)`` starts a stand-in backend process; all are killed at teardown."""
    started: list[FakeBackend] = []

    def _spawn(name: str, *args: str) -> FakeBackend:
        backend = start_fake(name, *args)
        started.append(backend)
        return backend

    def _spawn_many(names: list[str], *args: str) -> list[FakeBackend]:
        backends = start_fakes(names, *args)
        started.extend(backends)
        return backends

    _spawn.many = _spawn_many  # type: ignore[attr-defined]
    yield _spawn
    for backend in started:
        backend.kill()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """``gateway(backends, **settings)`` starts a gateway process; all are stopped at teardown."""
    started: list[Gateway] = []

    def _start(backends: list[str], **settings) -> Gateway:
        gw = start_gateway(backends, tmp_path / f"gateway{len(started)}.log", **settings)
        started.append(gw)
        return gw

    yield _start
    for gw in started:
        gw.stop()
