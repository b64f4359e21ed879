"""Resilience scenarios against a running gateway; each returns the figures it measured.

Used by ``test_resilience.py`` (asserting on the figures) and ``reliability_run.py`` (reporting them).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp

from tests.routing.harness import FakeBackend, Outcome, chat_body, metric_samples, stream_chat


async def kill_during_load(gateway: str, backends: list[FakeBackend], victim: FakeBackend, *,
                           requests: int = 150, concurrency: int = 15, max_tokens: int = 20,
                           kill_after_s: float = 0.5) -> dict[str, Any]:
    """Closed-loop streaming load; ``victim`` is SIGKILLed mid-run. Classifies every request."""
    outcomes: list[Outcome] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            outcomes.append(await stream_chat(session, gateway, chat_body(f"load {i}", max_tokens)))

    async def killer() -> None:
        await asyncio.sleep(kill_after_s)
        victim.kill()

    retries_before = sum((await metric_samples(gateway, "dflare_retries_total")).values())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(killer(), *(worker(session) for _ in range(concurrency)))
    retries = sum((await metric_samples(gateway, "dflare_retries_total")).values()) - retries_before

    interrupted = [o for o in outcomes if o.status == 200 and o.started and o.error is not None and o.done]
    lost = [o for o in outcomes if not o.ok and o not in interrupted]
    return {
        "sent": len(outcomes),
        "completed": sum(1 for o in outcomes if o.ok),
        "interrupted_cleanly": len(interrupted),
        "interrupted_on_victim": sum(1 for o in interrupted if o.served_by == victim.name),
        "lost": len(lost),
        "lost_detail": [(o.status, o.error, o.transport_error, o.started) for o in lost][:5],
        "retried": int(retries),
        "served_by": dict(Counter(o.served_by for o in outcomes if o.ok)),
        "victim": victim.name,
    }


async def abort_latency(gateway: str, backends: list[FakeBackend], samples: int = 5) -> list[float]:
    """Client drops a stream after 3 events; seconds until the backend noticed (its own clock)."""
    latencies = []
    async with aiohttp.ClientSession() as session:
        for i in range(samples):
            rid = f"abort-{time.time_ns()}-{i}"
            resp = await session.post(gateway + "/v1/chat/completions", json=chat_body("long", 2000),
                                      headers={"x-request-id": rid})
            assert resp.status == 200
            for _ in range(3):
                await resp.content.readuntil(b"\n\n")
            closed_at = time.time()
            resp.close()  # drops the TCP connection, as a client that went away does
            noticed = await _wait_abort(session, backends, rid, timeout=5.0)
            latencies.append(noticed - closed_at)
    return latencies


async def _wait_abort(session: aiohttp.ClientSession, backends: list[FakeBackend], rid: str,
                      timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for backend in backends:
            async with session.get(backend.url + "/debug/stats") as resp:
                for abort in (await resp.json())["aborts"]:
                    if abort["request_id"] == rid:
                        return abort["at"]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no backend saw the abort of {rid} within {timeout} s")


async def overload(gateway: str, requests: int, max_tokens: int = 20) -> dict[str, Any]:
    """All ``requests`` at once (10x the gateway's bound): who got in, who got 429, who failed."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        outcomes = await asyncio.gather(
            *(stream_chat(session, gateway, chat_body(f"burst {i}", max_tokens)) for i in range(requests))
        )
    rejected = [o for o in outcomes if o.status == 429]
    admitted = [o for o in outcomes if o.status != 429]
    return {
        "sent": len(outcomes),
        "admitted": len(admitted),
        "admitted_ok": sum(1 for o in admitted if o.ok),
        "admitted_failed": sum(1 for o in admitted if not o.ok),
        "rejected_429": len(rejected),
        "rejected_with_retry_after": sum(1 for o in rejected if o.retry_after and o.retry_after.isdigit()),
        "rejected_error_codes": sorted({(o.error or {}).get("code") for o in rejected}),
    }
