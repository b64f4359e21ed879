"""Real-process harness for resilience runs: a gateway process in front of stand-in backends.

Shared by the pytest scenarios (``test_resilience.py``) and the figures script
(``python -m tests.routing.reliability_run``), so the numbers in docs/reliability.md come from the
same code the tests run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeBackend:
    """A stand-in SGLang process (``fake_sglang``); it reports aborts itself."""

    name: str
    url: str
    proc: subprocess.Popen[str]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    async def request_counts(self, session: aiohttp.ClientSession) -> tuple[int, int]:
        """(requests ended in any way, of which aborted)."""
        async with session.get(self.url + "/debug/stats") as resp:
            stats = await resp.json()
        return stats["finished"] + len(stats["aborts"]), len(stats["aborts"])


@dataclass
class EngineServer(FakeBackend):
    """A real ``dflare engine-server``; aborts are read from its ``sglang:num_aborted_requests``."""

    async def request_counts(self, session: aiohttp.ClientSession) -> tuple[int, int]:
        async with session.get(self.url + "/metrics") as resp:
            text = await resp.text()
        totals = {"sglang:num_requests_total": 0.0, "sglang:num_aborted_requests_total": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
        return int(totals["sglang:num_requests_total"]), int(totals["sglang:num_aborted_requests_total"])


def build_long_context_pair(root: Path, max_context: int = 1024) -> tuple[Path, Path]:
    """The service tests' tiny random pair, with room for streams long enough to be cut mid-way."""
    from tests.service import tiny_models

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_models, "MAX_CONTEXT", max_context)
        return tiny_models.build_pair(root)


def start_engine_servers(
    names: list[str], target: Path, drafter: Path, model: str, log_dir: Path, timeout: float = 120.0
) -> list[EngineServer]:
    """``dflare engine-server`` processes (one torch thread each), started in parallel; waits for /health."""
    servers = []
    for name in names:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "sglang_ext.cli",
            "engine-server",
            "--model-path",
            str(target),
            "--draft-model-path",
            str(drafter),
            "--served-model-name",
            model,
            "--threads",
            "1",
            "--max-batch",
            "4",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        with (log_dir / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
        servers.append(EngineServer(name, f"http://127.0.0.1:{port}", proc))
    try:
        asyncio.run(_all_healthy(servers, timeout))
    except BaseException:
        for server in servers:
            server.kill()
        raise
    return servers


async def _all_healthy(servers: list[EngineServer], timeout: float) -> None:
    await asyncio.gather(*(wait_for(s.url, "/health", timeout) for s in servers))


def start_fakes(names: list[str], *args: str) -> list[FakeBackend]:
    """``tests.routing.fake_sglang`` processes on free ports, started in parallel (each prints its port)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.routing.fake_sglang", "--name", name, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for name in names
    ]
    backends = []
    for name, proc in zip(names, procs, strict=True):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            for p in procs:
                p.kill()
            raise RuntimeError(f"fake backend {name} did not start: {line!r}")
        backends.append(FakeBackend(name, f"http://127.0.0.1:{int(line.split()[1])}", proc))
    return backends


def start_fake(name: str, *args: str) -> FakeBackend:
    return start_fakes([name], *args)[0]


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_gateway(backends: list[str], log: Path, **settings: Any) -> Gateway:
    """``dflare serve`` as its own process; ``settings`` become ``DFLARE_*`` environment variables."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFLARE_")}
    env.update(
        {
            "DFLARE_BACKENDS": ",".join(backends),
            "DFLARE_HEALTH_INTERVAL_S": "0.2",
            "DFLARE_ACCESS_LOG": "false",
            "DFLARE_SHUTDOWN_GRACE_S": "5",
        }
    )
    env.update({f"DFLARE_{k.upper()}": str(v) for k, v in settings.items()})
    cmd = [sys.executable, "-m", "sglang_ext.cli", "serve", "--port", str(port), "--log-level", "warning"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Gateway(f"http://127.0.0.1:{port}", proc, log)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def start_discovery_gateway(kubeconfig_text: str, namespace: str, tmp_path: Path, **settings: Any) -> Gateway:
    """A gateway that finds its backends through Kubernetes discovery (the API a kubeconfig names)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kubeconfig_text)
    return start_gateway(
        [],
        tmp_path / "gateway.log",
        discovery_enabled="true",
        discovery_namespace=namespace,
        discovery_kubeconfig=kubeconfig,
        **settings,
    )


def rss_kib(pid: int) -> int:
    """Resident memory of a process (Linux ``/proc``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def wait_for(url: str, path: str = "/health", timeout: float = 30.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + path) as resp:
                    if resp.status == status:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}{path} did not answer {status} within {timeout} s")
            await asyncio.sleep(0.05)


async def metric_samples(url: str, name: str, headers: dict[str, str] | None = None) -> dict[tuple, float]:
    """Samples of one metric from ``/metrics``, parsed with prometheus_client: labels tuple -> value."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics", headers=headers) as resp:
        text = await resp.text()
    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def wait_admitted(url: str, count: int, timeout: float = 30.0) -> None:
    """Until ``count`` members report ``dflare_backend_up 1``."""
    deadline = time.monotonic() + timeout
    while True:
        up = await metric_samples(url, "dflare_backend_up")
        if sum(1 for labels, v in up.items() if v == 1 and dict(labels)["backend"] != "routed") >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {up} admitted")
        await asyncio.sleep(0.05)


@dataclass
class Outcome:
    """What one client saw. ``started``: a content event arrived; ``done``: ``[DONE]`` arrived."""

    status: int = 0
    backend: str | None = None  # the x-dflare-backend header
    served_by: str | None = None  # stand-in backend name, read from its first token ("b1-t0")
    retry_after: str | None = None
    started: bool = False
    done: bool = False
    error: dict[str, Any] | None = None
    transport_error: str | None = None
    tokens: int = 0
    events: list[bytes] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None and self.transport_error is None


def chat_body(prompt: str, max_tokens: int, stream: bool = True, model: str = "tiny") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def stream_chat(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Outcome:
    out = Outcome()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
                out.status = resp.status
                out.backend = resp.headers.get("x-dflare-backend")
                out.retry_after = resp.headers.get("retry-after")
                if resp.status != 200:
                    out.error = (await resp.json()).get("error")
                    return out
                if not body.get("stream"):
                    await resp.read()
                    out.done = True
                    return out
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    *events, buffer = buffer.split(b"\n\n")
                    for event in events:
                        _read_event(out, event)
    except TimeoutError:
        out.transport_error = "hang"
    except aiohttp.ClientError as exc:
        out.transport_error = repr(exc)
    return out


async def leave_after(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], seconds: float
) -> float:
    """Send ``body`` and drop the connection after ``seconds`` without having read a byte; returns
    the wall-clock time it left (comparable with the stand-in backends' abort times)."""
    task = asyncio.create_task(session.post(url + "/v1/chat/completions", json=body))
    await asyncio.sleep(seconds)
    assert not task.done(), "the request was answered before the client left"
    task.cancel()  # aiohttp closes the connection of a cancelled request
    left_at = time.time()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return left_at


def _read_event(out: Outcome, event: bytes) -> None:
    out.events.append(event)
    if event == b"data: [DONE]":
        out.done = True
        return
    data = orjson.loads(event[len(b"data: ") :])
    if "error" in data:
        out.error = data["error"]
    elif data.get("choices"):
        if not out.started:
            choice = data["choices"][0]
            text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
            out.served_by = text.rsplit("-t", 1)[0] or None
        out.started = True
        out.tokens += 1
