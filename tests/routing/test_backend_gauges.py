"""``dflare_backends_known`` / ``dflare_backends_routable`` from a live ``dflare serve`` with discovery.

The outage alerts rest on these two gauges because the per-backend ``dflare_backend_up`` series is
deleted the moment discovery drops a pod: with every engine NotReady there would be nothing left to
alert on. Here a real gateway process follows pods through a Kubernetes API on loopback while stand-in
backends are started and killed, and its ``/metrics`` text is parsed back after every step.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.routing.fake_k8s import FakeKubernetesAPI, make_pod
from tests.routing.harness import metric_samples, start_gateway, wait_for

KNOWN, ROUTABLE, UP = "dflare_backends_known", "dflare_backends_routable", "dflare_backend_up"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def gauges(url: str) -> dict[str, dict[tuple, float]]:
    return {name: await metric_samples(url, name) for name in (KNOWN, ROUTABLE, UP)}


async def until_counts(url: str, known: int, routable: int, timeout: float = 10.0) -> dict:
    """Until the gateway reports ``known`` / ``routable`` (discovery and probes are asynchronous)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        seen = await gauges(url)
        if seen[KNOWN] == {(): known} and seen[ROUTABLE] == {(): routable}:
            return seen
        if loop.time() > deadline:
            raise AssertionError(f"wanted known={known} routable={routable}, /metrics says {seen}")
        await asyncio.sleep(0.05)


async def ready_status(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url + "/ready") as resp:
        return resp.status


async def test_counts_follow_pods_and_processes_and_never_disappear(spawn, tmp_path: Path):
    b0, b1 = spawn.many(["b0", "b1"])
    api = FakeKubernetesAPI(namespace="serving")
    await api.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())
    gw = start_gateway(
        [],
        tmp_path / "gateway.log",
        discovery_enabled="true",
        discovery_namespace="serving",
        discovery_kubeconfig=kubeconfig,
    )
    try:
        await wait_for(gw.url)
        # No pod yet: both counts are exported as 0 from start-up, not missing.
        seen = await until_counts(gw.url, known=0, routable=0)
        assert seen[UP] == {}

        await api.put(make_pod("engine-0", port=port_of(b0.url)))
        await api.put(make_pod("engine-1", port=port_of(b1.url)))
        await until_counts(gw.url, known=2, routable=2)

        # Pod gone NotReady: it leaves the pool and its dflare_backend_up series with it.
        await api.put(make_pod("engine-1", port=port_of(b1.url), ready=False))
        seen = await until_counts(gw.url, known=1, routable=1)
        assert [dict(k)["backend"] for k in seen[UP]] == [b0.url]

        # The engine process dies while its pod still says Ready: known, but not routable.
        b0.kill()
        seen = await until_counts(gw.url, known=1, routable=0)
        assert await ready_status(gw.url) == 503

        # All engines gone: no per-backend series at all, the two counts still say 0.
        await api.delete("engine-0")
        seen = await until_counts(gw.url, known=0, routable=0)
        assert seen[UP] == {}

        # A replacement engine comes back: both counts recover.
        b2 = spawn("b2")
        await api.put(make_pod("engine-2", port=port_of(b2.url)))
        await until_counts(gw.url, known=1, routable=1)
        assert await ready_status(gw.url) == 200
    finally:
        gw.stop()
        await api.stop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_static_backends_are_known_before_they_pass_a_health_check(spawn, tmp_path: Path, workers: int):
    """With several workers the counts are merged from their files (max over live workers)."""
    up = spawn("up")
    loading = spawn("loading", "--loading-s", "600")
    gw = start_gateway([up.url, loading.url], tmp_path / "gateway.log", workers=workers)
    try:
        await wait_for(gw.url)
        await until_counts(gw.url, known=2, routable=1)
        up.kill()
        await until_counts(gw.url, known=2, routable=0)
    finally:
        gw.stop()
