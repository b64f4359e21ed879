"""RoutedBackend over real stand-in SGLang processes: admission, retries, breaker, no retry on 4xx."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import aiohttp
import pytest

from service.backends.base import BackendRequest, Endpoint
from service.backends.sglang_http import SGLangHTTPBackend
from service.errors import BackendUnavailable, UpstreamError
from service.routing.discovery import StaticDiscovery
from service.routing.health import BreakerState
from service.routing.policy import make_policy
from service.routing.retry import RetryPolicy
from service.routing.routed import RoutedBackend


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def chat(i: int, stream: bool = False, model: str = "tiny") -> BackendRequest:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"hello {i}"}],
        "max_tokens": 3,
        "stream": stream,
    }
    return BackendRequest(Endpoint.CHAT, body, model, f"req-{i}", stream=stream)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def routed(urls: list[str], session: aiohttp.ClientSession, **kwargs) -> RoutedBackend:
    kwargs.setdefault("health_interval_s", 0.1)
    kwargs.setdefault("retry", RetryPolicy(3, 0.01))
    return RoutedBackend(
        lambda url: SGLangHTTPBackend(url, session), lambda pool: StaticDiscovery(pool, urls), **kwargs
    )


async def test_starts_with_no_backend_and_admits_only_after_health_passes(spawn, session):
    loading = spawn("slow", "--loading-s", "1.0")
    backend = routed([loading.url], session)
    await backend.start()  # never refuses to start
    try:
        with pytest.raises(BackendUnavailable, match="No healthy backend"):
            await backend.models()
        with pytest.raises(BackendUnavailable):
            await backend.complete(chat(0))
        await until(lambda: bool(backend.pool.models()))
        assert await backend.models() == ["tiny"]
        result = await backend.complete(chat(1))
        assert result.body["choices"][0]["message"]["content"].startswith("slow-t0")
    finally:
        await backend.close()
    stats = await (await session.get(loading.url + "/debug/stats")).json()
    assert stats["requests"] == 1  # the request made while loading never reached it


async def test_connect_errors_are_retried_and_the_dead_member_ejected(spawn, session):
    live = spawn("live")
    dead_url = closed_port_url()
    backend = routed([dead_url, live.url], session, health_interval_s=30)
    await backend.start()
    try:
        await until(lambda: len(backend.pool.healthy()) == 1)
        dead = backend.pool.get(dead_url)
        assert dead is not None
        dead.health.record(True)  # pretend it passed its probe, then died: only passive ejection helps
        dead.models = frozenset({"tiny"})
        reqs = [chat(i) for i in range(10)]
        results = await asyncio.gather(*(backend.complete(r) for r in reqs))
        assert all(r.body["choices"][0]["message"]["content"].startswith("live-") for r in results)
        assert all(r.served_by == live.url for r in reqs)
        assert not dead.health.healthy  # ejected on its first connect error
        retried = [r for r in reqs if r.route_reason and "retry=1" in r.route_reason]
        assert 1 <= len(retried) < 10
    finally:
        await backend.close()


async def test_5xx_is_retried_elsewhere_and_opens_the_breaker(spawn, session):
    good, bad = spawn("good"), spawn("bad", "--fail-status", "503")
    backend = routed(
        [good.url, bad.url],
        session,
        breaker_failures=2,
        breaker_cooldown_s=60,
        policy=make_policy("round_robin"),
    )
    await backend.start()
    try:
        await until(lambda: len(backend.pool.healthy()) == 2)
        for i in range(8):
            result = await backend.complete(chat(i))
            assert result.body["choices"][0]["message"]["content"].startswith("good-")
        bad_endpoint = backend.pool.get(bad.url)
        assert bad_endpoint is not None and bad_endpoint.breaker.state is BreakerState.OPEN
        assert bad_endpoint.health.healthy  # its /health still passes: only the breaker ejected it
        stats = await (await session.get(bad.url + "/debug/stats")).json()
        assert stats["requests"] == 2  # no more traffic once open
    finally:
        await backend.close()


async def test_upstream_4xx_is_relayed_not_retried(spawn, session):
    picky = spawn("picky", "--fail-status", "400")
    backend = routed([picky.url], session)
    await backend.start()
    try:
        await until(lambda: len(backend.pool.healthy()) == 1)
        with pytest.raises(UpstreamError) as err:
            await backend.complete(chat(0))
        assert err.value.status == 400
        stats = await (await session.get(picky.url + "/debug/stats")).json()
        assert stats["requests"] == 1
    finally:
        await backend.close()


async def test_all_members_failing_gives_503_after_bounded_attempts(spawn, session):
    a, b = spawn("a", "--fail-status", "500"), spawn("b", "--fail-status", "500")
    backend = routed([a.url, b.url], session, retry=RetryPolicy(3, 0.01), breaker_failures=100)
    await backend.start()
    try:
        await until(lambda: len(backend.pool.healthy()) == 2)
        with pytest.raises(BackendUnavailable) as err:
            await backend.complete(chat(0))
        assert err.value.upstream_status == 500
        counts = [(await (await session.get(x.url + "/debug/stats")).json())["requests"] for x in (a, b)]
        assert sum(counts) == 3 and min(counts) >= 1  # three tries, spread over both
    finally:
        await backend.close()


async def test_unknown_model_and_stream_first_event(spawn, session):
    one = spawn("one")
    backend = routed([one.url], session)
    await backend.start()
    try:
        await until(lambda: len(backend.pool.healthy()) == 1)
        with pytest.raises(BackendUnavailable, match="serves model"):
            await backend.complete(chat(0, model="other"))
        stream = await backend.stream(chat(1, stream=True))
        chunks = [c async for c in stream]
        text = b"".join(chunks)
        assert b"one-t0" in text and text.rstrip().endswith(b"data: [DONE]")
        assert backend.pool.get(one.url).outstanding == 0
    finally:
        await backend.close()


def blackhole_url() -> tuple[str, list[socket.socket]]:
    """A port whose accept backlog is full: SYNs are dropped and connects time out, like a dead pod IP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = [listener]
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        held.append(filler)
    return f"http://127.0.0.1:{port}", held


async def test_connect_timeout_is_retried_elsewhere(spawn):
    live = spawn("live")
    url, held = blackhole_url()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_connect=0.3)) as session:
            rr = make_policy("round_robin")  # both members get turns: the hole is certainly tried
            backend = routed([url, live.url], session, health_interval_s=30, policy=rr)
            await backend.start()
            try:
                await until(lambda: len(backend.pool.healthy()) == 1, timeout=10)
                hole = backend.pool.get(url)
                hole.health.record(True)
                hole.models = frozenset({"tiny"})
                reqs = [chat(i) for i in range(4)]
                results = [await backend.complete(r) for r in reqs]
                assert all(r.body["choices"][0]["message"]["content"].startswith("live-") for r in results)
                assert not hole.health.healthy
            finally:
                await backend.close()
    finally:
        for sock in held:
            sock.close()


async def test_stream_that_breaks_before_its_first_event_is_retried(spawn, session):
    good, dropper = spawn("good"), spawn("dropper", "--drop-before-first-token")
    backend = routed(
        [good.url, dropper.url], session, policy=make_policy("round_robin"), breaker_failures=100
    )
    await backend.start()
    try:
        await until(lambda: len(backend.pool.healthy()) == 2)
        reqs = [chat(i, stream=True) for i in range(6)]
        for req in reqs:
            stream = await backend.stream(req)
            text = b"".join([chunk async for chunk in stream])
            assert b"good-t0" in text and b'"error"' not in text
            assert text.rstrip().endswith(b"data: [DONE]")
        retried = sum(1 for r in reqs if "retry=1" in (r.route_reason or ""))
        stats = await (await session.get(dropper.url + "/debug/stats")).json()
        assert retried == stats["requests"] >= 1  # every request the dropper took went on elsewhere
        assert all(e.outstanding == 0 for e in backend.pool.members())
    finally:
        await backend.close()
