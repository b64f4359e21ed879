"""Fixtures: stand-in SGLang backends as real processes on loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class FakeBackend:
    name: str
    url: str
    proc: subprocess.Popen[str]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def start_fake(name: str, *args: str) -> FakeBackend:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.routing.fake_sglang", "--name", name, *args],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"fake backend {name} did not start: {line!r}")
    return FakeBackend(name, f"http://127.0.0.1:{int(line.split()[1])}", proc)


@pytest.fixture
def fake_backends() -> Iterator[list[FakeBackend]]:
    """Call ``start(name, *args)`` on the returned list's ``.start``; all are killed at teardown."""
    started: list[FakeBackend] = []
    yield started
    for backend in started:
        backend.kill()


@pytest.fixture
def spawn(fake_backends: list[FakeBackend]):
    def _spawn(name: str, *args: str) -> FakeBackend:
        backend = start_fake(name, *args)
        fake_backends.append(backend)
        return backend

    return _spawn
