"""``dflare_backends_known`` / ``_routable`` and ``dflare_backend_info`` from a live ``dflare serve``.

The outage alerts rest on the two counts because the per-backend ``dflare_backend_up`` series is
deleted the moment discovery drops a pod: with every engine NotReady there would be nothing left to
alert on. ``dflare_backend_info`` names the pod behind each backend URL (dashboards join it for their
legends), so it must follow membership exactly: a stale one would give a new pod's IP an old name.
Here a real gateway process follows pods through a Kubernetes API on loopback while stand-in backends
are started and killed, and its ``/metrics`` text is parsed back after every step.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from service.routing.discovery import static_backend_identity
from tests.routing.fake_k8s import FakeKubernetesAPI, make_pod
from tests.routing.harness import metric_samples, port_of, start_discovery_gateway, start_gateway, wait_for

KNOWN, ROUTABLE, UP = "dflare_backends_known", "dflare_backends_routable", "dflare_backend_up"
INFO = "dflare_backend_info"


async def gauges(url: str) -> dict[str, dict[tuple, float]]:
    return {name: await metric_samples(url, name) for name in (KNOWN, ROUTABLE, UP, INFO)}


def pods(seen: dict) -> dict[str, tuple[str, str]]:
    """``dflare_backend_info`` as backend URL -> (pod, namespace); every sample must be 1."""
    assert set(seen[INFO].values()) <= {1.0}, seen[INFO]
    labels = [dict(k) for k in seen[INFO]]
    return {d["backend"]: (d["backend_pod"], d["backend_namespace"]) for d in labels}


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


async def until_named(url: str, want: dict[str, tuple[str, str]], timeout: float = 10.0) -> None:
    """Until ``dflare_backend_info`` says exactly ``want`` (for changes that leave the counts alone)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (named := pods(await gauges(url))) != want:
        if loop.time() > deadline:
            raise AssertionError(f"wanted {want}, /metrics says {named}")
        await asyncio.sleep(0.05)


async def ready_status(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url + "/ready") as resp:
        return resp.status


async def test_counts_follow_pods_and_processes_and_never_disappear(spawn, tmp_path: Path):
    b0, b1 = spawn.many(["b0", "b1"])
    api = FakeKubernetesAPI(namespace="serving")
    await api.start()
    gw = start_discovery_gateway(api.kubeconfig(), "serving", tmp_path)
    try:
        await wait_for(gw.url)
        # No pod yet: both counts are exported as 0 from start-up, not missing.
        seen = await until_counts(gw.url, known=0, routable=0)
        assert seen[UP] == {} and seen[INFO] == {}

        await api.put(make_pod("engine-0", port=port_of(b0.url)))
        await api.put(make_pod("engine-1", port=port_of(b1.url)))
        seen = await until_counts(gw.url, known=2, routable=2)
        assert pods(seen) == {b0.url: ("engine-0", "serving"), b1.url: ("engine-1", "serving")}

        # Pod gone NotReady: it leaves the pool and its dflare_backend_up and _info series with it.
        await api.put(make_pod("engine-1", port=port_of(b1.url), ready=False))
        seen = await until_counts(gw.url, known=1, routable=1)
        assert [dict(k)["backend"] for k in seen[UP]] == [b0.url]
        assert pods(seen) == {b0.url: ("engine-0", "serving")}

        # The engine process dies while its pod still says Ready: known, but not routable.
        b0.kill()
        seen = await until_counts(gw.url, known=1, routable=0)
        assert await ready_status(gw.url) == 503
        assert pods(seen) == {b0.url: ("engine-0", "serving")}  # still a member

        # All engines gone: no per-backend series at all, the two counts still say 0.
        await api.delete("engine-0")
        seen = await until_counts(gw.url, known=0, routable=0)
        assert seen[UP] == {} and seen[INFO] == {}

        # A replacement engine comes back: both counts recover.
        b2 = spawn("b2")
        await api.put(make_pod("engine-2", port=port_of(b2.url)))
        seen = await until_counts(gw.url, known=1, routable=1)
        assert await ready_status(gw.url) == 200
        assert pods(seen) == {b2.url: ("engine-2", "serving")}

        # The pod comes back under its name at another address (a StatefulSet pod recreated): the
        # old URL loses its name, the new one gets it.
        await api.put(make_pod("engine-2", port=port_of(b1.url)))
        await until_named(gw.url, {b1.url: ("engine-2", "serving")})
        await until_counts(gw.url, known=1, routable=1)
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
        seen = await until_counts(gw.url, known=2, routable=1)
        # Loopback URLs name no pod: host:port stands in, and both are named before passing a check.
        assert pods(seen) == {url: (url.removeprefix("http://"), "") for url in (up.url, loading.url)}
        up.kill()
        await until_counts(gw.url, known=2, routable=0)
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("url", "identity"),
    [
        # What the chart lists with discovery off: <pod>.<headless service>.<namespace>.svc
        ("http://dflare-engine-1.dflare-engine.llm.svc:30000", ("dflare-engine-1", "llm")),
        ("http://e-0.e.ns.svc.cluster.local:30000", ("e-0", "ns")),
        ("http://dflare-engine.llm.svc:30000", ("dflare-engine.llm.svc:30000", "")),  # a Service
        ("http://10.1.2.3:30000", ("10.1.2.3:30000", "")),
        ("http://[fd00::7]:30000", ("[fd00::7]:30000", "")),
    ],
)
def test_static_backend_identity_names_the_pod_where_the_url_does(url: str, identity: tuple[str, str]):
    assert static_backend_identity(url) == identity
