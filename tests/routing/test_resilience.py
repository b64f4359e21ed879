"""The gateway as a real process in front of stand-in SGLang processes: failure, overload, auth.

Each scenario's figures come from ``scenarios.py``, the same code ``reliability_run.py`` reports.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.routing.harness import (
    FakeBackend,
    chat_body,
    metric_samples,
    stream_chat,
    wait_admitted,
    wait_for,
)
from tests.routing.scenarios import abort_latency, kill_during_load, overload


@pytest.fixture
def three(spawn) -> list[FakeBackend]:
    return spawn.many(["b0", "b1", "b2"])


async def test_kill_one_backend_during_load(three, gateway):
    gw = gateway([b.url for b in three], breaker_failure_threshold=3)
    await wait_for(gw.url)
    await wait_admitted(gw.url, 3)
    figures = await kill_during_load(gw.url, victim=three[1], requests=150, concurrency=15)
    assert figures["lost"] == 0, figures
    assert figures["completed"] + figures["interrupted_cleanly"] == figures["sent"] == 150
    # only streams already running on the killed backend may end early, and those end with an error event
    assert figures["interrupted_on_victim"] == figures["interrupted_cleanly"]
    assert figures["interrupted_cleanly"] <= 15
    assert set(figures["served_by"]) >= {three[0].url, three[2].url}


async def test_client_disconnect_reaches_backend_within_1s(three, gateway):
    gw = gateway([b.url for b in three])
    await wait_for(gw.url)
    await wait_admitted(gw.url, 3)
    latencies = await abort_latency(gw.url, three, samples=3)
    assert max(latencies) < 1.0, latencies


async def test_tenfold_overload_gives_429_and_admitted_requests_succeed(three, gateway):
    gw = gateway([b.url for b in three], max_in_flight=8)
    await wait_for(gw.url)
    await wait_admitted(gw.url, 3)
    figures = await overload(gw.url, requests=80)
    assert figures["admitted_failed"] == 0, figures
    assert figures["admitted"] >= 8 and figures["rejected_429"] >= 40, figures
    assert figures["rejected_with_retry_after"] == figures["rejected_429"]
    assert figures["rejected_error_codes"] == ["rate_limit_exceeded"]
    rejected = await metric_samples(gw.url, "dflare_rejected_requests_total")
    assert rejected[(("reason", "overload"),)] == figures["rejected_429"]


async def test_prefix_affinity_sends_same_prefix_to_same_backend(three, gateway):
    gw = gateway([b.url for b in three], routing_policy="prefix_affinity")
    await wait_for(gw.url)
    await wait_admitted(gw.url, 3)
    owners: dict[str, set[str]] = {}
    async with aiohttp.ClientSession() as session:
        for round_ in range(3):
            for p in range(12):
                body = chat_body(f"You are assistant #{p}. Long shared system prompt. Question {round_}?", 2)
                body["messages"].insert(0, {"role": "system", "content": f"system prompt {p} " * 40})
                outcome = await stream_chat(session, gw.url, body)
                assert outcome.ok
                owners.setdefault(f"p{p}", set()).add(outcome.served_by)
    assert all(len(backends) == 1 for backends in owners.values()), owners
    assert len(set().union(*owners.values())) >= 2  # different prefixes spread over backends


async def test_starts_with_zero_backends_and_admits_when_health_passes(spawn, gateway):
    slow = spawn("slow", "--loading-s", "600")  # "loading weights" until told otherwise
    gw = gateway([slow.url])
    await wait_for(gw.url)  # live at once, although its only backend is still loading
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/ready") as resp:
            assert resp.status == 503
        early = await stream_chat(session, gw.url, chat_body("too early", 2))
        assert early.status == 503 and early.error["code"] == "service_unavailable"
        await asyncio.sleep(0.5)  # a few more probe rounds: still loading, still not admitted
        async with session.get(gw.url + "/ready") as resp:
            assert resp.status == 503
        async with session.post(slow.url + "/debug/ready") as resp:
            assert resp.status == 200
        await wait_for(gw.url, "/ready", timeout=10)
        late = await stream_chat(session, gw.url, chat_body("in time", 2))
        assert late.ok and late.served_by == "slow"
        async with session.get(slow.url + "/debug/stats") as resp:
            assert (await resp.json())["requests"] == 1  # nothing was routed to it while loading


async def test_backend_that_comes_back_is_used_again(spawn, gateway):
    a = spawn("a")
    b = spawn("b")
    gw = gateway([a.url, b.url], health_fail_threshold=1)
    await wait_for(gw.url)
    await wait_admitted(gw.url, 2)
    port = b.url.rsplit(":", 1)[1]
    b.kill()
    async with aiohttp.ClientSession() as session:
        for i in range(6):
            assert (await stream_chat(session, gw.url, chat_body(f"x{i}", 2))).served_by == "a"
        spawn("b2", "--port", port)
        await wait_admitted(gw.url, 2)
        seen = {(await stream_chat(session, gw.url, chat_body(f"y{i}", 2))).served_by for i in range(12)}
    assert "b2" in seen


async def test_auth_matrix_body_limit_and_cors(spawn, gateway, tmp_path: Path):
    backend = spawn("auth")
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated monthly\nfile-key-1\n\nfile-key-2\n")
    gw = gateway(
        [backend.url],
        api_keys="env-key",
        api_keys_file=keys_file,
        metrics_require_auth="true",
        max_body_bytes=4096,
        cors_origins="https://ui.example",
    )
    open_gw = gateway([backend.url])  # no keys: open, metrics open, CORS off
    await wait_for(gw.url)
    await wait_for(open_gw.url)
    await wait_for(gw.url, "/ready", timeout=10)
    body = chat_body("hi", 2, stream=False)
    keys = {
        "none": {},
        "wrong": {"authorization": "Bearer nope"},
        "env": {"authorization": "Bearer env-key"},
        "file": {"authorization": "Bearer file-key-2"},
        "x-api-key": {"x-api-key": "file-key-1"},
        "basic": {"authorization": "Basic env-key"},
        "empty": {"authorization": "Bearer "},
    }
    expected_ok = {"env", "file", "x-api-key"}
    async with aiohttp.ClientSession() as session:
        for name, headers in keys.items():
            for method, path in (
                ("GET", "/health"),
                ("GET", "/ready"),
                ("GET", "/metrics"),
                ("GET", "/v1/models"),
                ("POST", "/v1/chat/completions"),
            ):
                async with session.request(
                    method, gw.url + path, headers=headers, json=body if method == "POST" else None
                ) as resp:
                    want = 200 if path in ("/health", "/ready") or name in expected_ok else 401
                    assert resp.status == want, (name, path, resp.status)
                    if want == 401:
                        error = (await resp.json())["error"]
                        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
                        assert resp.headers["www-authenticate"] == "Bearer"
        auth = {"authorization": "Bearer env-key"}
        big = chat_body("x" * 5000, 2, stream=False)
        async with session.post(gw.url + "/v1/chat/completions", json=big, headers=auth) as resp:
            assert resp.status == 413 and (await resp.json())["error"]["code"] == "request_too_large"

        async def chunks():
            for _ in range(10):
                yield b" " * 1000

        async with session.post(
            gw.url + "/v1/chat/completions",
            data=chunks(),
            headers={**auth, "content-type": "application/json"},
        ) as resp:
            assert resp.status == 413  # no Content-Length: counted as it arrives
        async with session.post(
            gw.url + "/v1/chat/completions", json=big, headers={"x-api-key": "?"}
        ) as resp:
            assert resp.status == 401  # the key is checked before anything else
        preflight = {
            "origin": "https://ui.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type",
        }
        async with session.options(gw.url + "/v1/chat/completions", headers=preflight) as resp:
            assert resp.status == 200
            assert resp.headers["access-control-allow-origin"] == "https://ui.example"
        async with session.options(open_gw.url + "/v1/chat/completions", headers=preflight) as resp:
            assert "access-control-allow-origin" not in resp.headers
        async with session.post(
            open_gw.url + "/v1/chat/completions", json=body, headers={"origin": "https://ui.example"}
        ) as resp:
            assert resp.status == 200 and "access-control-allow-origin" not in resp.headers
        async with session.get(open_gw.url + "/metrics") as resp:
            assert resp.status == 200


async def test_killed_backend_mid_stream_ends_with_error_event(spawn, gateway):
    slow = spawn("slow", "--token-delay", "0.05")
    gw = gateway([slow.url])
    await wait_for(gw.url)
    await wait_admitted(gw.url, 1)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(stream_chat(session, gw.url, chat_body("long", 200)))
        await asyncio.sleep(0.6)
        slow.kill()
        outcome = await task
    assert outcome.status == 200 and outcome.started and outcome.done
    assert outcome.error is not None and outcome.error["type"] == "server_error"
    assert outcome.events[-1] == b"data: [DONE]"


async def test_sigterm_finishes_in_flight_streams_then_exits_zero(spawn, gateway):
    backend = spawn("drain", "--token-delay", "0.05")
    gw = gateway([backend.url])
    await wait_for(gw.url)
    await wait_admitted(gw.url, 1)
    async with aiohttp.ClientSession() as session:
        bodies = [chat_body(f"d{i}", 30) for i in range(3)]
        streams = [asyncio.create_task(stream_chat(session, gw.url, body)) for body in bodies]
        await asyncio.sleep(0.4)  # all three are streaming (1.5 s each)
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(aiohttp.ClientConnectionError):  # no longer accepting
            async with session.get(gw.url + "/health", headers={"connection": "close"}):
                pass
        outcomes = await asyncio.gather(*streams)
    assert all(o.ok and o.tokens == 30 for o in outcomes), outcomes
    assert await asyncio.to_thread(gw.proc.wait, 10) == 0


async def test_sigterm_deadline_ends_running_streams_with_an_error_event(spawn, gateway):
    backend = spawn("endless", "--token-delay", "0.05")
    gw = gateway([backend.url], shutdown_grace_s=2)
    await wait_for(gw.url)
    await wait_admitted(gw.url, 1)
    async with aiohttp.ClientSession() as session:
        stream = asyncio.create_task(stream_chat(session, gw.url, chat_body("long", 400)))  # 20 s
        await asyncio.sleep(0.5)
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        gw.proc.send_signal(signal.SIGTERM)
        outcome = await stream
        ended = loop.time() - signalled
    assert outcome.status == 200 and outcome.started and outcome.done, outcome
    assert outcome.error is not None and "shutting down" in outcome.error["message"]
    assert outcome.events[-1] == b"data: [DONE]"
    assert 1.0 < ended < 2.0  # drained half a second before the 2 s grace deadline
    assert await asyncio.to_thread(gw.proc.wait, 10) == 0


async def test_requests_go_only_to_backends_serving_their_model(spawn, gateway):
    alpha, beta = spawn("alpha-0", "--model", "alpha"), spawn("beta-0", "--model", "beta")
    gw = gateway([alpha.url, beta.url])
    await wait_for(gw.url)
    await wait_admitted(gw.url, 2)
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/v1/models") as resp:
            assert sorted(m["id"] for m in (await resp.json())["data"]) == ["alpha", "beta"]
        for i in range(6):
            for model in ("alpha", "beta"):
                outcome = await stream_chat(session, gw.url, chat_body(f"m{i}", 2, model=model))
                assert outcome.ok and outcome.served_by == f"{model}-0"
        unknown = await stream_chat(session, gw.url, chat_body("?", 2, model="gamma"))
        assert unknown.status == 404 and unknown.error["code"] == "model_not_found"
