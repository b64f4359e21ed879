"""What a real client meets at the edges: leaving early, shutdown, broken streams, error answers.

``dflare serve`` as its own process in front of stand-in SGLang processes (``fake_sglang``) that
record, with the time, every request whose client went away and how many tokens it had produced.
"""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import orjson
import pytest

from tests.routing.harness import (
    FakeBackend,
    Gateway,
    chat_body,
    leave_after,
    metric_samples,
    stream_chat,
    wait_admitted,
    wait_for,
)

CHAT = "/v1/chat/completions"


async def _ready(gw: Gateway, members: int = 1) -> None:
    await wait_for(gw.url)
    await wait_admitted(gw.url, members)


async def _aborts(session: aiohttp.ClientSession, backend: FakeBackend) -> list[dict]:
    async with session.get(backend.url + "/debug/stats") as resp:
        return (await resp.json())["aborts"]


async def _in_flight(gw: Gateway) -> float:
    return sum((await metric_samples(gw.url, "dflare_requests_in_flight")).values())


@pytest.mark.parametrize(
    ("stream", "cors"),
    [(True, False), (False, False), (False, True)],
    ids=["streamed", "non_streamed", "non_streamed_cors_chain"],
)
async def test_client_leaving_before_any_byte_aborts_upstream_and_frees_its_slot_at_once(
    spawn, gateway, stream, cors
):
    """Issue 19, defects 1 and 2: the engine queues the request for 6 s; the client gives up after 1 s.
    With CORS on, the completion endpoints go through the middleware chain instead of the hot path."""
    queued = spawn("queued", "--queue-delay", "6", "--token-delay", "0.01")
    settings = {"cors_origins": "https://ui.example"} if cors else {}
    gw = gateway([queued.url], max_in_flight=1, **settings)
    await _ready(gw)
    async with aiohttp.ClientSession() as session:
        left_at = await leave_after(session, gw.url, chat_body("wait", 50, stream=stream), 1.0)
        deadline = time.monotonic() + 5
        while not (aborts := await _aborts(session, queued)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert aborts, "the backend never saw the abort"
        assert aborts[0]["tokens"] == 0 and aborts[0]["at"] - left_at < 1.0, aborts
        while await _in_flight(gw) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert await _in_flight(gw) == 0
        # the one slot is free again: the next request is admitted, not refused with 429
        async with session.post(gw.url + CHAT, json=chat_body("next", 2, stream=False)) as resp:
            assert resp.status != 429
    requests = await metric_samples(gw.url, "dflare_requests_total")
    assert any(dict(k)["status"] == "499" for k in requests), requests


async def test_shutdown_deadline_answers_waiting_requests_with_a_retryable_503(spawn, gateway):
    """Issue 19, defect 3: a non-streamed request still waiting at the deadline."""
    stuck = spawn("stuck", "--queue-delay", "30")
    gw = gateway([stuck.url], shutdown_grace_s=1.5)
    await _ready(gw)
    async with aiohttp.ClientSession() as session:
        waiting = [
            asyncio.create_task(session.post(gw.url + CHAT, json=chat_body(f"w{i}", 4, stream=False)))
            for i in range(2)
        ]
        await asyncio.sleep(0.5)
        gw.proc.send_signal(signal.SIGTERM)
        for task in waiting:
            async with await task as resp:
                assert resp.status == 503, await resp.text()
                assert resp.headers["content-type"] == "application/json"
                assert resp.headers["retry-after"].isdigit()
                error = (await resp.json())["error"]
                assert error["code"] == "service_unavailable" and "retry" in error["message"]
    assert await asyncio.to_thread(gw.proc.wait, 10) == 0
    log = gw.log.read_text()
    assert log.count("cancelled at the shutdown deadline") == 2, log
    assert "Traceback" not in log and "CancelledError" not in log, log


async def test_stream_broken_mid_way_is_counted_and_logged_as_an_error(spawn, gateway):
    """Issue 19, defect 4."""
    slow = spawn("slow", "--token-delay", "0.05")
    gw = gateway([slow.url], access_log="true")
    await _ready(gw)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(stream_chat(session, gw.url, chat_body("long", 200)))
        await asyncio.sleep(0.6)
        slow.kill()
        outcome = await task
    assert outcome.status == 200 and outcome.error is not None
    requests = await metric_samples(gw.url, "dflare_requests_total")
    chat = {dict(k)["status"]: v for k, v in requests.items() if dict(k)["endpoint"] == CHAT}
    assert chat == {"503": 1.0}, requests
    lines = [orjson.loads(x) for x in gw.log.read_text().splitlines() if x.startswith('{"ts"')]
    (line,) = [x for x in lines if x["path"] == CHAT]
    assert line["status"] == 200 and line["error"] == "service_unavailable", line


@pytest.mark.parametrize("cors", [False, True], ids=["hot_path", "cors_chain"])
async def test_error_answers_carry_one_request_id(spawn, gateway, cors):
    """Issue 19, defect 5: 400, 404 and 503 of the completion endpoints."""
    backend = spawn("ids")
    settings = {"cors_origins": "https://ui.example"} if cors else {}
    gw = gateway([backend.url], **settings)
    await _ready(gw)
    async with aiohttp.ClientSession() as session:
        cases = [
            (CHAT, {"model": "tiny"}, 400),
            ("/v1/completions", {"model": "tiny"}, 400),
            (CHAT, chat_body("hi", 2, stream=False, model="nope"), 404),
            ("/v1/completions", {"model": "nope", "prompt": "hi", "max_tokens": 2}, 404),
        ]
        for path, body, status in cases:
            async with session.post(gw.url + path, json=body) as resp:
                assert resp.status == status
                assert len(resp.headers.getall("x-request-id")) == 1, (path, resp.headers)
        backend.kill()
        await wait_for(gw.url, "/ready", status=503, timeout=10)
        async with session.post(gw.url + CHAT, json=chat_body("hi", 2, stream=False)) as resp:
            assert resp.status == 503
            assert resp.headers.getall("x-request-id") == [resp.headers["x-request-id"]]


async def test_upstream_failure_is_told_in_plain_words_and_logged_in_full(spawn, gateway):
    """Issue 19, defect 6: no backend URL, no bytes literal, no raw upstream body to the client."""
    failing = spawn("failing", "--fail-status", "500")
    gw = gateway([failing.url], retry_max_attempts=1)
    await _ready(gw)
    body = chat_body("hi", 2, stream=False)
    async with aiohttp.ClientSession() as session, session.post(gw.url + CHAT, json=body) as resp:
        assert resp.status == 503
        message = (await resp.json())["error"]["message"]
    assert "http://" not in message and "b'" not in message and "injected" not in message, message
    assert "500" in message, message
    log = gw.log.read_text()
    assert failing.url in log and "injected failure" in log, log


async def test_options_without_a_key_is_refused_before_anything_else(spawn, gateway):
    """Issue 19, defect 8: with keys configured and CORS off, OPTIONS is 401 without a key."""
    backend = spawn("keys")
    gw = gateway([backend.url], api_keys="k1")
    await wait_for(gw.url)
    async with aiohttp.ClientSession() as session:
        async with session.options(gw.url + CHAT) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
        async with session.options(gw.url + CHAT, headers={"authorization": "Bearer k1"}) as resp:
            assert resp.status == 405
            assert resp.headers["allow"] == "POST"
