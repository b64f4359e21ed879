"""Discovery end to end: ``dflare serve`` finds stand-in backends through a Kubernetes API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.routing.fake_k8s import FakeKubernetesAPI, make_pod
from tests.routing.harness import chat_body, port_of, start_discovery_gateway, stream_chat, wait_for


async def served(session: aiohttp.ClientSession, gateway: str, n: int = 6) -> set[str | None]:
    outcomes = [await stream_chat(session, gateway, chat_body(f"q{i}", 2)) for i in range(n)]
    assert all(o.ok for o in outcomes), [(o.status, o.error) for o in outcomes]
    return {o.served_by for o in outcomes}


async def until_served(
    session: aiohttp.ClientSession, gateway: str, want: set[str], timeout: float = 10.0
) -> None:
    """Until a round of requests lands exactly on ``want`` (membership changes are asynchronous)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen: set[str | None] = set()
    while loop.time() < deadline:
        seen = await served(session, gateway, n=9)
        if seen == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"served by {seen}, wanted {want}")


async def test_gateway_follows_pods(spawn, tmp_path: Path):
    b0, b1, b2 = spawn.many(["b0", "b1", "b2"])
    api = FakeKubernetesAPI(namespace="serving")
    await api.start()
    await api.put(make_pod("engine-0", port=port_of(b0.url)))
    await api.put(make_pod("engine-1", port=port_of(b1.url), ready=False))
    gw = start_discovery_gateway(api.kubeconfig(), "serving", tmp_path)
    try:
        await wait_for(gw.url)
        await wait_for(gw.url, "/ready", timeout=15)
        async with aiohttp.ClientSession() as session:
            await until_served(session, gw.url, {"b0"})  # the NotReady pod gets nothing
            await api.put(make_pod("engine-1", port=port_of(b1.url)))  # turns Ready
            await until_served(session, gw.url, {"b0", "b1"})
            await api.put(make_pod("engine-0", port=port_of(b0.url), ready=False))  # NotReady
            await until_served(session, gw.url, {"b1"})
            await api.put(make_pod("engine-2", port=port_of(b2.url)))  # added
            await until_served(session, gw.url, {"b1", "b2"})
            await api.delete("engine-1")  # deleted
            await until_served(session, gw.url, {"b2"})
            # Missed events, then the watch expires (410 Gone): only a re-list brings engine-0 back.
            api.change_unseen(put=[make_pod("engine-0", port=port_of(b0.url))])
            await api.expire()
            await until_served(session, gw.url, {"b0", "b2"})
        lists = [q for q in api.requests if not q.get("watch")]
        assert len(lists) == 2  # the initial list and the re-list after 410
    finally:
        gw.stop()
        await api.stop()
