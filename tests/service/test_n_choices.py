"""OpenAI ``n`` > 1 (several choices per request) through the gateway, on every kind of backend.

Oracles come from ``n=1`` requests of the same engine, never from the code under test: with a seed,
choice ``i`` must equal a single request seeded with ``choice_seed(seed, i)`` (the reference engine's
seeded sampling is batch independent, ``tests/core/test_sampling.py``), so the ``n`` answer's
``completion_tokens`` must be the sum of those requests' and its ``usage.speculative`` their merged
stats; greedy, every choice equals the greedy answer and the stats are ``n`` times its stats. The
embedded demo pair runs in this process (so the test can see inside its engine); the tiny pair runs
as real ``dflare serve`` / ``dflare engine-server`` processes (``conftest.py``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest

from service.app import create_app
from service.settings import Settings
from sglang_ext.engine_server.serving import choice_seed
from sglang_ext.stats import SpecStats, total
from tests.service.conftest import FIXED_THRESHOLD, MODEL, serve_in_thread
from tests.service.test_metrics import delta, scrape

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DEMO_PROMPT = [{"role": "user", "content": "Write a Python function that adds."}]
TINY_PROMPT = [{"role": "user", "content": "Say the the the"}]


# ---- helpers -----------------------------------------------------------------------------------
def post(url: str, body: dict[str, Any]) -> httpx.Response:
    resp = httpx.post(url, json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp


def sse(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON events of a streamed answer; it must end with ``[DONE]``."""
    resp = httpx.post(url, json={**body, "stream": True}, timeout=120)
    assert resp.status_code == 200, resp.text
    payloads = [e[len("data: ") :] for e in resp.text.split("\n\n") if e.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [orjson.loads(p) for p in payloads[:-1]]


def choice_text(choice: dict[str, Any]) -> str:
    return choice["message"]["content"] if "message" in choice else choice["text"]


def stream_choices(events: list[dict[str, Any]], chat: bool) -> dict[int, dict[str, Any]]:
    """Per index: concatenated text, the finish reasons sent, and the order of its events."""
    out: dict[int, dict[str, Any]] = {}
    for event in events:
        assert "error" not in event, event
        for c in event["choices"]:
            seen = out.setdefault(c["index"], {"text": "", "finish": [], "kinds": []})
            if chat:
                kind = "role" if "role" in c["delta"] else "finish" if c["finish_reason"] else "text"
                seen["text"] += c["delta"].get("content") or ""
            else:
                kind = "finish" if c["finish_reason"] else "text"
                seen["text"] += c["text"]
            seen["kinds"].append(kind)
            if c["finish_reason"]:
                seen["finish"].append(c["finish_reason"])
    return out


def check_stream_shape(events: list[dict[str, Any]], n: int, chat: bool) -> dict[int, dict[str, Any]]:
    """Every index 0..n-1 present, each opened by its role chunk (chat) and closed by one finish
    chunk, nothing of it after that; one usage chunk last."""
    per = stream_choices(events[:-1], chat)
    assert sorted(per) == list(range(n))
    for i, seen in per.items():
        assert len(seen["finish"]) == 1, (i, seen)
        assert seen["kinds"][-1] == "finish", (i, seen["kinds"])
        if chat:
            assert seen["kinds"][0] == "role" and seen["kinds"].count("role") == 1, (i, seen["kinds"])
    assert events[-1]["choices"] == [] and isinstance(events[-1]["usage"], dict)
    assert all(len(e["choices"]) == 1 for e in events[:-1]), "one choice per chunk, as SGLang"
    return per


def n_times(stats: SpecStats, n: int) -> SpecStats:
    verified = None if stats.verified_drafts is None else stats.verified_drafts * n
    return SpecStats(stats.block_size, [k * n for k in stats.histogram], verified)


# ---- the embedded demo pair, in this process ---------------------------------------------------
@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[str, Any]]:
    """``dflare serve``'s default backend (the embedded demo pair) on loopback, and its app."""
    settings = Settings(
        embedded_threads=1,
        embedded_max_batch=4,
        embedded_min_draft_confidence=float(FIXED_THRESHOLD),  # stats compared across requests
        access_log=False,
    )
    app = create_app(settings)
    with serve_in_thread(app) as url:
        yield url, app


def demo_body(**extra: Any) -> dict[str, Any]:
    return {"model": Settings().embedded_model, "messages": DEMO_PROMPT, "max_tokens": 24, **extra}


def wait_for_deltas(url: str, before: dict, labels: dict[str, str], want: dict[str, float]) -> None:
    """Metrics are recorded once the response has gone out: poll briefly for the expected deltas."""
    deadline = time.monotonic() + 5
    while (got := {name: delta(before, scrape(url), name, **labels) for name in want}) != want:
        assert time.monotonic() < deadline, f"metrics moved by {got}, expected {want}"
        time.sleep(0.05)


def test_demo_n3_seeded_choices_are_the_derived_single_requests(demo):
    url, _ = demo
    sampled = demo_body(temperature=0.8, seed=7)
    before = scrape(url)
    resp = post(url + CHAT, {**sampled, "n": 3})
    body = resp.json()
    usage = body["usage"]
    stats = SpecStats.from_usage(usage["speculative"])
    # headers and counters carry all three choices
    assert resp.headers["x-dflare-verify-steps"] == str(stats.verify_steps)
    assert resp.headers["x-dflare-accepted-tokens"] == str(stats.accepted_tokens)
    want = {
        "dflare_prompt_tokens_total": usage["prompt_tokens"],
        "dflare_completion_tokens_total": usage["completion_tokens"],
        "dflare_spec_decode_num_drafts_total": stats.verify_steps,
        "dflare_spec_decode_num_accepted_tokens_total": stats.accepted_tokens,
    }
    wait_for_deltas(url, before, {"model": body["model"], "backend": "embedded"}, want)
    # choice 0 is the request with its own seed, choice i the one seeded choice_seed(seed, i)
    seeds = [7, choice_seed(7, 1), choice_seed(7, 2)]
    singles = [post(url + CHAT, {**sampled, "seed": seed}).json() for seed in seeds]
    texts = [choice_text(c) for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert texts == [choice_text(s["choices"][0]) for s in singles]
    assert [c["finish_reason"] for c in body["choices"]] == [
        s["choices"][0]["finish_reason"] for s in singles
    ]
    assert len(set(texts)) == 3, f"seeded choices must differ: {texts}"
    assert usage["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"], "the prompt is counted once"
    assert usage["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    merged = total(SpecStats.from_usage(s["usage"]["speculative"]) for s in singles)
    assert merged is not None and merged.verify_steps > 0
    assert stats == merged


def test_demo_n3_stream_matches_the_answer(demo):
    url, _ = demo
    sampled = demo_body(temperature=0.8, seed=11, n=3)
    whole = post(url + CHAT, sampled).json()
    events = sse(url + CHAT, {**sampled, "stream_options": {"include_usage": True}})
    per = check_stream_shape(events, 3, chat=True)
    for c in whole["choices"]:
        assert per[c["index"]]["text"] == choice_text(c)
        assert per[c["index"]]["finish"] == [c["finish_reason"]]
    assert events[-1]["usage"] == whole["usage"]
    # completions too; without include_usage no usage chunk
    prompt = {"model": sampled["model"], "prompt": "def mul(a, b):", "max_tokens": 16, "temperature": 0.8}
    events = sse(url + COMPLETIONS, {**prompt, "n": 3, "seed": 3})
    assert all(e["choices"] for e in events)
    per = stream_choices(events, chat=False)
    whole = post(url + COMPLETIONS, {**prompt, "n": 3, "seed": 3}).json()
    assert {i: p["text"] for i, p in per.items()} == {c["index"]: c["text"] for c in whole["choices"]}


def test_demo_greedy_choices_are_equal(demo):
    url, _ = demo
    greedy = demo_body(temperature=0)
    one = post(url + CHAT, greedy).json()
    three = post(url + CHAT, {**greedy, "n": 3}).json()
    assert [choice_text(c) for c in three["choices"]] == [choice_text(one["choices"][0])] * 3
    assert three["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    assert (
        three["usage"]["speculative"]
        == n_times(SpecStats.from_usage(one["usage"]["speculative"]), 3).to_usage()
    )


def wait_until_idle(app: Any, timeout: float = 5.0) -> None:
    """Nothing admitted in the runner and no work left in the engine (aborts reach it next step)."""
    runner = app.state.backend.serving.runner
    deadline = time.monotonic() + timeout
    while runner.num_admitted or runner.engine.has_work():
        assert time.monotonic() < deadline, f"left in the engine: {runner.num_admitted} admitted"
        time.sleep(0.02)


@contextlib.contextmanager
def watched_engine(app: Any, free_steps: int) -> Iterator[tuple[dict[str, str], threading.Event]]:
    """How each engine request ended (request id -> finish reason, from the engine's own results).

    After ``free_steps`` steps the engine waits for the returned event before each step, so what the
    gateway does meanwhile (abort on a hang-up, admit a second request) cannot race the generation.
    """
    engine = app.state.backend.serving.runner.engine
    step = engine.step
    finished: dict[str, str] = {}
    release = threading.Event()
    steps = 0

    def gated_step() -> list[Any]:
        nonlocal steps
        steps += 1
        if steps > free_steps:
            release.wait(10)
        results = step()
        finished.update({r.request_id: r.finish_reason for r in results})
        return results

    engine.step = gated_step
    try:
        yield finished, release
    finally:
        release.set()
        del engine.step


def wait_admitted(app: Any, count: int, timeout: float = 10.0) -> None:
    runner = app.state.backend.serving.runner
    deadline = time.monotonic() + timeout
    while runner.num_admitted != count:
        assert time.monotonic() < deadline, f"{runner.num_admitted} requests admitted, expected {count}"
        time.sleep(0.01)


def endings(finished: dict[str, str], rid: str, count: int, timeout: float = 10.0) -> dict[str, str]:
    """How the engine ended the ``count`` choices of request ``rid`` (waits for them)."""
    deadline = time.monotonic() + timeout
    while len(found := {k: v for k, v in finished.items() if k.startswith(rid + "-")}) < count:
        assert time.monotonic() < deadline, f"the engine ended only {found} of request {rid}"
        time.sleep(0.02)
    return found


def test_demo_disconnect_aborts_every_choice(demo):
    url, app = demo
    rid = uuid.uuid4().hex
    body = demo_body(temperature=0.8, seed=7, n=3, stream=True, max_tokens=400)
    with watched_engine(app, free_steps=2) as (finished, release):
        with httpx.stream("POST", url + CHAT, json=body, headers={"x-request-id": rid}, timeout=60) as r:
            next(r.iter_lines())  # running, and held after its second step; hang up
        wait_admitted(app, 0)  # the gateway let go of every choice
        release.set()
        assert endings(finished, rid, 3) == {f"{rid}-{i}": "abort" for i in range(3)}
    wait_until_idle(app)


def test_demo_failed_choice_aborts_its_siblings(demo):
    """The engine refuses choice 1: the caller gets the error and choices 0 and 2 stop too."""
    url, app = demo
    engine = app.state.backend.serving.runner.engine
    add = engine.add_request

    def refuse_choice_1(req: Any) -> None:
        if req.request_id.endswith("-1"):
            raise RuntimeError("injected refusal")
        add(req)

    body = demo_body(temperature=0.8, seed=7, n=3, max_tokens=400)
    engine.add_request = refuse_choice_1
    try:
        with watched_engine(app, free_steps=1) as (finished, release):
            rid = uuid.uuid4().hex
            resp = httpx.post(url + CHAT, json=body, headers={"x-request-id": rid}, timeout=60)
            assert resp.status_code == 500 and "injected refusal" in resp.json()["error"]["message"]
            wait_admitted(app, 0)
            release.set()
            assert endings(finished, rid, 2) == {f"{rid}-0": "abort", f"{rid}-2": "abort"}
        wait_until_idle(app)
        with watched_engine(app, free_steps=1) as (finished, release):
            rid = uuid.uuid4().hex
            resp = httpx.post(
                url + CHAT, json={**body, "stream": True}, headers={"x-request-id": rid}, timeout=60
            )
            assert resp.status_code == 200  # the failure came after the 200: an error event, then [DONE]
            last = [e for e in resp.text.split("\n\n") if e.startswith("data: ")][-2:]
            assert "injected refusal" in orjson.loads(last[0][6:])["error"]["message"]
            assert last[1] == "data: [DONE]"
            wait_admitted(app, 0)
            release.set()
            assert endings(finished, rid, 2) == {f"{rid}-0": "abort", f"{rid}-2": "abort"}
        wait_until_idle(app)
    finally:
        del engine.add_request
    assert post(url + CHAT, {**body, "max_tokens": 4}).json()["usage"]["completion_tokens"] > 0


def test_demo_reused_request_id_runs_side_by_side(demo):
    """A client retrying with the same ``x-request-id`` while the first attempt still runs."""
    url, app = demo
    body = demo_body(temperature=0.8, seed=5, n=2)
    rid = uuid.uuid4().hex
    call = functools.partial(httpx.post, url + CHAT, json=body, headers={"x-request-id": rid}, timeout=60)
    with watched_engine(app, free_steps=0) as (finished, release), ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(call), pool.submit(call)
        wait_admitted(app, 4)  # both admitted before the engine ran a step
        release.set()
        answers = [first.result(), second.result()]
        assert [r.status_code for r in answers] == [200, 200], answers[1].text
        ended = endings(finished, rid, 4)
    assert answers[0].json()["choices"] == answers[1].json()["choices"], "same seed, same choices"
    assert set(ended.values()) <= {"stop", "length"}, ended


# ---- the tiny pair: embedded process, and the SGLang HTTP backend in front of engine-server -----
def tiny_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": TINY_PROMPT, "max_tokens": 10, "temperature": 0, **extra}


def test_n3_on_both_backends(any_gateway):
    """The tiny pair never ends on its own here: every choice runs to max_tokens."""
    one = post(any_gateway.url + CHAT, tiny_body()).json()
    resp = post(any_gateway.url + CHAT, tiny_body(n=3))
    three = resp.json()
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert [c["finish_reason"] for c in three["choices"]] == ["length"] * 3
    assert [choice_text(c) for c in three["choices"]] == [choice_text(one["choices"][0])] * 3
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert three["usage"]["completion_tokens"] == 30
    stats = n_times(SpecStats.from_usage(one["usage"]["speculative"]), 3)
    assert three["usage"]["speculative"] == stats.to_usage()
    assert resp.headers["x-dflare-verify-steps"] == str(stats.verify_steps)
    # streamed: index on every chunk, relayed as the engine-server sent them on the HTTP backend
    events = sse(any_gateway.url + CHAT, tiny_body(n=3, stream_options={"include_usage": True}))
    per = check_stream_shape(events, 3, chat=True)
    assert {i: p["text"] for i, p in per.items()} == {i: choice_text(one["choices"][0]) for i in range(3)}
    assert events[-1]["usage"] == three["usage"]
    completions = {"model": MODEL, "prompt": "the quick brown", "max_tokens": 6, "temperature": 0, "n": 2}
    whole = post(any_gateway.url + COMPLETIONS, completions).json()
    events = sse(any_gateway.url + COMPLETIONS, {**completions, "stream_options": {"include_usage": True}})
    per = check_stream_shape(events, 2, chat=False)
    assert {i: p["text"] for i, p in per.items()} == {c["index"]: c["text"] for c in whole["choices"]}
    assert events[-1]["usage"] == whole["usage"] and whole["usage"]["completion_tokens"] == 12


def test_engine_server_n2_stock_meta_info_is_merged(engine_server_plain, gateway_plain):
    """Stock SGLang (no plugin) has stats only in each choice's meta_info: the gateway merges them."""
    upstream = post(engine_server_plain.url + CHAT, tiny_body(n=2, return_meta_info=True)).json()
    metas = [c["meta_info"] for c in upstream["choices"]]
    assert "speculative" not in upstream["usage"] and len(metas) == 2
    merged = total(SpecStats.from_sglang_meta_info(m) for m in metas)
    assert merged is not None
    body = post(gateway_plain.url + CHAT, tiny_body(n=2)).json()
    assert all("meta_info" not in c for c in body["choices"])
    assert body["usage"]["speculative"] == merged.to_usage()
    assert body["usage"]["completion_tokens"] == sum(m["completion_tokens"] for m in metas)


def test_engine_server_disconnect_aborts_every_choice(gateway_http, engine_server):
    before = scrape(engine_server.url)
    body = tiny_body(n=3, max_tokens=100, stream=True)
    with httpx.stream("POST", gateway_http.url + CHAT, json=body, timeout=60) as r:
        next(r.iter_lines())  # running; hang up
    labels = {"model_name": MODEL, "engine_type": "unified"}
    deadline = time.monotonic() + 5
    while (
        aborted := delta(before, scrape(engine_server.url), "sglang:num_aborted_requests_total", **labels)
    ) < 3:
        assert time.monotonic() < deadline, f"engine-server aborted {aborted} of 3 choices"
        time.sleep(0.1)
    assert aborted == 3


@pytest.mark.parametrize(("n", "tokens"), [(1, 11), (3, 33)])
def test_inter_token_latency_is_per_choice(n, tokens):
    """``n`` choices stream side by side: 33 tokens of 3 choices over 1 s are 10 gaps per choice."""
    from prometheus_client.parser import text_string_to_metric_families

    from service.backends.base import Usage
    from service.metrics import GatewayMetrics
    from service.observability import ObservabilityMiddleware, RequestRecord

    metrics = GatewayMetrics()
    record = RequestRecord("r", start=100.0)
    record.model, record.backend, record.choices = MODEL, "embedded", n
    record.first_chunk_at, record.last_chunk_at = 100.5, 101.5
    record.usage = Usage(prompt_tokens=5, completion_tokens=tokens)
    scope = {"type": "http", "method": "POST", "path": CHAT, "headers": []}
    ObservabilityMiddleware(None, metrics, access_log=False)._finish(scope, record, 200, 2.0)
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
        if s.name.startswith("dflare_inter_token_latency_seconds_")
    }
    assert samples["dflare_inter_token_latency_seconds_count"] == 1
    assert samples["dflare_inter_token_latency_seconds_sum"] == pytest.approx(0.1)
