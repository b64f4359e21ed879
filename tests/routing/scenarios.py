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


async def kill_during_load(
    gateway: str,
    victim: FakeBackend,
    *,
    requests: int = 150,
    concurrency: int = 15,
    max_tokens: int = 20,
    kill_after_s: float = 0.5,
    model: str = "tiny",
) -> dict[str, Any]:
    """Closed-loop streaming load; ``victim`` is SIGKILLed mid-run. Classifies every request."""
    outcomes: list[Outcome] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = chat_body(f"load {i}", max_tokens, model=model)
            outcomes.append(await stream_chat(session, gateway, body))

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
        "interrupted_on_victim": sum(1 for o in interrupted if o.backend == victim.url),
        "lost": len(lost),
        "lost_detail": [(o.status, o.error, o.transport_error, o.started) for o in lost][:5],
        "retried": int(retries),
        "served_by": dict(Counter(o.backend for o in outcomes if o.ok)),
        "victim": victim.url,
    }


async def abort_latency(
    gateway: str,
    backends: list[FakeBackend],
    samples: int = 5,
    max_tokens: int = 2000,
    model: str = "tiny",
    max_races: int = 3,
) -> list[float]:
    """Client drops a stream after 3 events; seconds until a backend counted the request as aborted.

    Polled every 10 ms, so each figure is an upper bound (plus one poll round trip). A request that
    ended normally before the abort arrived (a race, not a lost abort) is not a sample; more than
    ``max_races`` of those fails, which is what a gateway that never propagates aborts would cause.
    """
    latencies: list[float] = []
    races = 0
    async with aiohttp.ClientSession() as session:
        while len(latencies) < samples:
            ended, aborted = await _counts(session, backends)
            resp = await session.post(
                gateway + "/v1/chat/completions",
                json=chat_body(f"long {len(latencies)}", max_tokens, model=model),
            )
            assert resp.status == 200, await resp.text()
            for _ in range(3):
                await resp.content.readuntil(b"\n\n")
            closed_at = time.monotonic()
            resp.close()  # drops the TCP connection, as a client that went away does
            while (now := await _counts(session, backends))[0] == ended:
                if time.monotonic() - closed_at > 5.0:
                    raise AssertionError("the request neither ended nor was aborted within 5 s")
                await asyncio.sleep(0.01)
            if now[1] == aborted:
                races += 1
                assert races <= max_races, "requests kept ending normally: aborts are not propagated"
                continue
            latencies.append(time.monotonic() - closed_at)
    return latencies


async def _counts(session: aiohttp.ClientSession, backends: list[FakeBackend]) -> tuple[int, int]:
    counts = [await b.request_counts(session) for b in backends if b.proc.poll() is None]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


async def overload(gateway: str, requests: int, max_tokens: int = 20, model: str = "tiny") -> dict[str, Any]:
    """All ``requests`` at once (10x the gateway's bound): who got in, who got 429, who failed."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        outcomes = await asyncio.gather(
            *(
                stream_chat(session, gateway, chat_body(f"burst {i}", max_tokens, model=model))
                for i in range(requests)
            )
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
