"""Fixtures: stand-in SGLang backends as real processes on loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.routing.harness import FakeBackend, start_fake, start_fakes


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
