"""Real processes on loopback: a tiny engine-server, gateways in front of it and an embedded gateway.

Everything is started once per session (torch imports dominate start-up) on ports picked by binding
port 0, so parallel test runs do not collide. Each process logs to a file that is printed when it
fails to come up.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.service.tiny_models import build_pair

MODEL = "tiny"
# The engines here run the fixed adaptive threshold, not the CPU default (the verify-width policy), whose
# widths follow measured timings and what earlier requests accepted: these tests compare
# per-request stats between engines and between repeated requests, which only a deterministic width rule
# keeps equal. tests/service/test_adaptive_draft_setting.py serves the policy.
FIXED_THRESHOLD = "0.02"
START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """A server process and the base URL it listens on."""

    url: str
    popen: subprocess.Popen
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start(
    args: list[str], log: Path, port: int, *, env: dict[str, str] | None = None, ready_path: str = "/health"
) -> Proc:
    """Start ``python -m sglang_ext.cli ARGS`` and wait until ``ready_path`` answers 200."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    handle = log.open("wb")
    popen = subprocess.Popen(
        [sys.executable, "-m", "sglang_ext.cli", *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=Path(__file__).parents[2],
    )
    proc = Proc(f"http://127.0.0.1:{port}", popen, log, env or {})
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"{args[0]} exited with {popen.returncode}:\n{proc.output()}")
        try:
            if httpx.get(proc.url + ready_path, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.stop()
    raise RuntimeError(f"{args[0]} did not become ready in {START_TIMEOUT_S} s:\n{proc.output()}")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_pair(tmp_path_factory.mktemp("tiny_pair"))


def _engine_server(tiny_pair: tuple[Path, Path], log: Path, *extra: str) -> Iterator[Proc]:
    target, drafter = tiny_pair
    port = free_port()
    proc = start(
        [
            "engine-server",
            "--model-path",
            str(target),
            "--draft-model-path",
            str(drafter),
            "--served-model-name",
            MODEL,
            "--threads",
            "1",
            "--max-batch",
            "4",
            "--min-draft-confidence",
            FIXED_THRESHOLD,
            "--port",
            str(port),
            *extra,
        ],
        log,
        port,
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def engine_server(tiny_pair, tmp_path_factory) -> Iterator[Proc]:
    yield from _engine_server(tiny_pair, tmp_path_factory.mktemp("logs") / "engine.log")


@pytest.fixture(scope="session")
def engine_server_plain(tiny_pair, tmp_path_factory) -> Iterator[Proc]:
    """Behaves like stock SGLang: speculative stats only in meta_info."""
    yield from _engine_server(
        tiny_pair, tmp_path_factory.mktemp("logs") / "engine_plain.log", "--no-plugin-stats"
    )


def gateway(backends: list[str], log: Path, *, workers: int = 1, env: dict[str, str] | None = None) -> Proc:
    port = free_port()
    args = ["serve", "--port", str(port)]
    for url in backends:
        args += ["--backend", url]
    if workers > 1:
        args += ["--workers", str(workers)]
    fast_health = {"DFLARE_HEALTH_INTERVAL_S": "0.5", **(env or {})}
    return start(args, log, port, env=fast_health, ready_path="/ready")


@pytest.fixture(scope="session")
def gateway_http(engine_server, tmp_path_factory) -> Iterator[Proc]:
    proc = gateway([engine_server.url], tmp_path_factory.mktemp("logs") / "gateway_http.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def gateway_plain(engine_server_plain, tmp_path_factory) -> Iterator[Proc]:
    """A gateway in front of the stock-SGLang-like engine-server (stats only in meta_info)."""
    proc = gateway([engine_server_plain.url], tmp_path_factory.mktemp("logs") / "gateway_plain.log")
    yield proc
    proc.stop()


def embedded_env(tiny_pair: tuple[Path, Path], policy: bool = False, **settings: str) -> dict[str, str]:
    """Environment of a ``dflare serve`` whose embedded engine runs the tiny pair on one thread, at the
    fixed threshold unless ``policy`` (the verify-width policy); ``settings`` adds
    ``DFLARE_EMBEDDED_<NAME>`` variables."""
    target, drafter = tiny_pair
    env = {"TARGET_DIR": str(target), "DRAFTER_DIR": str(drafter), "MODEL": MODEL, "THREADS": "1"}
    if policy:
        env["VERIFY_POLICY"] = "true"
    else:
        env["MIN_DRAFT_CONFIDENCE"] = FIXED_THRESHOLD
    return {f"DFLARE_EMBEDDED_{name.upper()}": value for name, value in {**env, **settings}.items()}


@pytest.fixture(scope="session")
def gateway_embedded(tiny_pair, tmp_path_factory) -> Iterator[Proc]:
    """``dflare serve`` with no backend: the embedded engine (the tiny pair instead of the demo pair)."""
    env = embedded_env(tiny_pair, max_batch="4")
    proc = gateway([], tmp_path_factory.mktemp("logs") / "gateway_embedded.log", env=env)
    yield proc
    proc.stop()


@pytest.fixture(scope="session", params=["embedded", "sglang_http"])
def any_gateway(request) -> Proc:
    """Both kinds of backend behind the same API."""
    return request.getfixturevalue("gateway_embedded" if request.param == "embedded" else "gateway_http")


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run an ASGI app under uvicorn in a thread of this process (for gateways with special settings)."""
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("in-process gateway failed to start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
