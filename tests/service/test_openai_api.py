"""The official openai client against both backends: responses, streams, usage.speculative, headers."""

from __future__ import annotations

import httpx
import openai
import pytest

from sglang_ext.stats import SpecStats
from tests.service.conftest import MODEL

MESSAGES = [{"role": "user", "content": "Say the the the"}]


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def check_speculative(spec: dict, completion_tokens: int) -> SpecStats:
    """usage.speculative is SpecStats.to_usage(): consistent with itself and with the token count."""
    stats = SpecStats.from_usage(spec)
    assert stats.to_usage() == spec
    assert stats.block_size == 4
    assert stats.verify_steps >= 1
    # every verify step commits accepted drafts + 1 bonus token; the prefill gives the first token
    assert completion_tokens <= 1 + stats.verify_steps + stats.accepted_tokens
    return stats


def test_models(any_gateway):
    models = client(any_gateway).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_non_streaming(any_gateway):
    raw = client(any_gateway).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    resp = raw.parse()
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 12
    spec = resp.usage.model_extra["speculative"]
    stats = check_speculative(spec, resp.usage.completion_tokens)
    assert "meta_info" not in resp.choices[0].model_extra
    assert raw.headers["x-dflare-verify-steps"] == str(stats.verify_steps)
    assert raw.headers["x-dflare-accepted-tokens"] == str(stats.accepted_tokens)
    assert float(raw.headers["x-dflare-acceptance-length"]) == pytest.approx(
        stats.acceptance_length, abs=1e-4
    )
    assert raw.headers["x-request-id"]


def test_chat_streaming_with_usage(any_gateway):
    chunks = list(
        client(any_gateway).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 10
    check_speculative(usage_chunk.usage.model_extra["speculative"], 10)
    # the same request without streaming gives the same text (greedy)
    whole = client(any_gateway).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0
    )
    assert whole.choices[0].message.content == text


def test_stream_without_usage_has_no_usage_chunk(any_gateway):
    chunks = list(
        client(any_gateway).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, stream=True
        )
    )
    assert chunks and all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_completions_streaming_and_not(any_gateway):
    c = client(any_gateway)
    whole = c.completions.create(model=MODEL, prompt="the quick brown", max_tokens=8, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    check_speculative(whole.usage.model_extra["speculative"], whole.usage.completion_tokens)
    chunks = list(
        c.completions.create(
            model=MODEL,
            prompt="the quick brown",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].usage.model_extra["speculative"] == whole.usage.model_extra["speculative"]


def test_stop_string_cuts_the_text(any_gateway):
    c = client(any_gateway)
    free = c.completions.create(model=MODEL, prompt="the quick brown", max_tokens=12, temperature=0)
    text = free.choices[0].text
    stop = text[3:6]
    assert len(stop) == 3 and stop in text
    cut = c.completions.create(
        model=MODEL, prompt="the quick brown", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    spec = cut.usage.model_extra["speculative"]  # a stop string keeps the request's stats
    assert spec is not None and spec["verify_steps"] + spec["plain_decode_steps"] >= 1  # drafted or plain
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=MODEL, prompt="the quick brown", max_tokens=12, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == cut.choices[0].text


def test_seeded_sampling_is_reproducible(any_gateway):
    c = client(any_gateway)
    kwargs = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 1.0,
        "top_p": 0.9,
        "extra_body": {"top_k": 50},
        "seed": 1234,
    }
    first = c.chat.completions.create(**kwargs).choices[0].message.content
    assert c.chat.completions.create(**kwargs).choices[0].message.content == first


def test_request_id_is_echoed(any_gateway):
    r = httpx.post(
        any_gateway.url + "/v1/completions",
        headers={"x-request-id": "my-id-123"},
        json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "my-id-123"


def test_health_and_ready(any_gateway):
    assert httpx.get(any_gateway.url + "/health").json() == {"status": "ok"}
    assert httpx.get(any_gateway.url + "/ready").status_code == 200


def test_one_json_access_line_per_request_without_prompt_text(any_gateway):
    import json
    import time
    import uuid

    rid = uuid.uuid4().hex
    secret = "zebra-crossing-4711"
    # greedy and fixed: a sampled answer can end at its first token (no decode step, usage.speculative null)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": secret}],
        "max_tokens": 4,
        "temperature": 0,
    }
    r = httpx.post(
        any_gateway.url + "/v1/chat/completions", headers={"x-request-id": rid}, json=body, timeout=60
    )
    assert r.status_code == 200
    usage = r.json()["usage"]
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in any_gateway.output().splitlines() if rid in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(lines) == 1, lines
    entry = json.loads(lines[0])
    assert entry["request_id"] == rid and entry["status"] == 200 and entry["model"] == MODEL
    assert entry["prompt_tokens"] == usage["prompt_tokens"]
    assert entry["completion_tokens"] == usage["completion_tokens"]
    # decode steps after the first token, drafted or plain as the engine's verify policy chose (a gibberish
    # prompt for the demo pair: after other requests like it the policy rightly decodes plainly)
    spec = usage["speculative"]
    assert 1 <= spec["verify_steps"] + spec["plain_decode_steps"] <= usage["completion_tokens"] - 1
    for key in ("verify_steps", "plain_decode_steps", "accepted_tokens", "draft_tokens"):
        assert entry["speculative"][key] == spec[key], key
    assert entry["latency_ms"] > 0 and entry["backend"]
    assert secret not in lines[0] and "prompt" not in entry


def test_an_answer_without_a_verify_step_reports_null_speculation(any_gateway):
    """Only the prefill's token: nothing was speculated, so ``null`` (as SGLang + plugin reports it)."""
    one = client(any_gateway).completions.create(model=MODEL, prompt="the quick brown", max_tokens=1)
    assert one.usage.completion_tokens == 1
    assert one.usage.model_extra["speculative"] is None
