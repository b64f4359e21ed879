"""Kubernetes discovery with the official client against a Kubernetes API served over loopback HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from service.routing.discovery import KubernetesDiscovery
from service.routing.health import CircuitBreaker, HealthState
from service.routing.pool import BackendEndpoint, BackendPool
from tests.routing.fake_k8s import FakeKubernetesAPI, make_pod

SELECTOR = "app.kubernetes.io/component=engine"


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def new_pool() -> BackendPool:
    return BackendPool(lambda key, url: BackendEndpoint(key, url, HealthState(1, 1), CircuitBreaker()))


def members(pool: BackendPool) -> dict[str, str]:
    return {e.key: e.url for e in pool.members()}


@pytest.fixture
async def api(tmp_path: Path):
    fake = FakeKubernetesAPI(namespace="serving")
    await fake.start()
    yield fake
    await fake.stop()


async def test_pods_added_ready_notready_deleted_and_relist_after_410(
    api: FakeKubernetesAPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="service.routing.discovery")
    await api.put(make_pod("a", port=31001))
    await api.put(make_pod("b", port=31002, ready=False))
    await api.put(make_pod("other", port=31003, labels={"app.kubernetes.io/component": "gateway"}))
    await api.put(make_pod("c"))  # no port annotation: the default port
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())

    pool = new_pool()
    discovery = KubernetesDiscovery(
        pool, "serving", SELECTOR, default_port=30000, kubeconfig=kubeconfig, watch_timeout_s=30
    )
    await discovery.start()
    try:
        await until(lambda: members(pool) == {"a": "http://127.0.0.1:31001", "c": "http://127.0.0.1:30000"})
        assert discovery.lists == 1
        assert api.requests[0]["labelSelector"] == SELECTOR

        await api.put(make_pod("d", port=31004))  # added
        await until(lambda: set(members(pool)) == {"a", "c", "d"})
        await api.put(make_pod("b", port=31002))  # turns Ready
        await until(lambda: set(members(pool)) == {"a", "b", "c", "d"})
        await api.put(make_pod("a", port=31001, ready=False))  # turns NotReady: leaves at once
        await until(lambda: set(members(pool)) == {"b", "c", "d"})
        await api.delete("d")
        await until(lambda: set(members(pool)) == {"b", "c"})
        terminating = make_pod("c")
        terminating["metadata"]["deletionTimestamp"] = "2026-11-28T06:00:00Z"
        await api.put(terminating)  # terminating pods take no new requests
        await until(lambda: set(members(pool)) == {"b"})
        await api.put(make_pod("b", port=31999))  # port changed: same key, new URL
        await until(lambda: members(pool) == {"b": "http://127.0.0.1:31999"})

        # Changes the watch never reports, then history expires: only a re-list can catch up.
        api.change_unseen(put=[make_pod("e", port=31005)], delete=["b"])
        await asyncio.sleep(0.2)
        assert set(members(pool)) == {"b"}
        await api.expire()
        await until(lambda: members(pool) == {"e": "http://127.0.0.1:31005"})
        assert discovery.lists == 2
        assert "410 Gone" in caplog.text
        watches = [q for q in api.requests if q.get("watch")]
        assert all(q["labelSelector"] == SELECTOR and q.get("resourceVersion") for q in watches)

        await api.put(make_pod("f", port=31006))  # and the new watch works
        await until(lambda: set(members(pool)) == {"e", "f"})
    finally:
        await discovery.stop()


async def test_watch_timeout_resumes_without_relist(api: FakeKubernetesAPI, tmp_path: Path):
    await api.put(make_pod("a", port=31001))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())
    pool = new_pool()
    discovery = KubernetesDiscovery(pool, "serving", SELECTOR, kubeconfig=kubeconfig, watch_timeout_s=1)
    await discovery.start()
    try:
        await until(lambda: set(members(pool)) == {"a"})
        await asyncio.sleep(1.5)  # the first watch ended by its server-side timeout
        await api.put(make_pod("b", port=31002))
        await until(lambda: set(members(pool)) == {"a", "b"})
        assert discovery.lists == 1
        assert sum(1 for q in api.requests if q.get("watch")) >= 2
    finally:
        await discovery.stop()


async def test_api_errors_are_retried_by_relisting(api: FakeKubernetesAPI, tmp_path: Path):
    await api.put(make_pod("a", port=31001))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig().replace("test-token", "wrong-token"))
    pool = new_pool()
    discovery = KubernetesDiscovery(pool, "serving", SELECTOR, kubeconfig=kubeconfig, max_backoff_s=0.2)
    await discovery.start()
    try:
        await until(lambda: len(api.requests) >= 2)  # 401s: keeps trying, pool stays empty
        assert len(pool) == 0
    finally:
        await discovery.stop()
