"""Per-request stats equal the engine's own counts, on every path they can travel.

The oracle is the reference engine itself, loaded in this process from the same checkpoint: greedy
decoding is deterministic, so the served request and the direct ``generate`` must agree on the
tokens and on every verify step.
"""

from __future__ import annotations

import time

import httpx
import orjson
import pytest

from sglang_ext.stats import SpecStats
from tests.service.conftest import FIXED_THRESHOLD, MODEL
from tests.service.test_metrics import delta, scrape

PROMPT_IDS = [17, 42, 99, 7, 150, 33]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def engine_result(tiny_pair):
    from sglang_ext.reference import SamplingParams, load_engine

    target, drafter = tiny_pair
    engine = load_engine(target, drafter, min_draft_confidence=float(FIXED_THRESHOLD))
    eos = engine.tokenizer.eos_token_id
    result = engine.generate([PROMPT_IDS], SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=(eos,)))[0]
    return result, engine.tokenizer


def completion(url: str, **extra) -> dict:
    body = {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_stats_equal_the_engines_own_counts(any_gateway, engine_result):
    result, tokenizer = engine_result
    assert result.stats is not None and result.stats.accepted_tokens > 0, "the tiny pair must accept drafts"
    body = completion(any_gateway.url)
    assert body["usage"]["completion_tokens"] == result.completion_tokens
    assert body["choices"][0]["text"] == tokenizer.decode(result.output_ids, skip_special_tokens=True)
    assert body["usage"]["speculative"] == result.stats.to_usage()


def test_native_generate_meta_info(engine_server, engine_result):
    result, _ = engine_result
    payload = {"input_ids": PROMPT_IDS, "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0}}
    meta = httpx.post(engine_server.url + "/generate", json=payload, timeout=60).json()["meta_info"]
    assert meta["spec_verify_ct"] == result.stats.verify_steps
    assert meta["spec_num_correct_drafts"] == result.stats.accepted_tokens
    # proposed keeps SGLang's meaning (whole blocks: clients infer B from it); verified is what the
    # adaptive draft length let the target check, and what usage.speculative calls draft_tokens
    assert meta["spec_num_proposed_drafts"] == result.stats.verify_steps * (result.stats.block_size - 1)
    assert meta["spec_num_verified_drafts"] == result.stats.draft_tokens
    assert meta["spec_correct_drafts_histogram"] == result.stats.histogram
    assert meta["spec_accept_length"] == pytest.approx(result.completion_tokens / result.stats.verify_steps)
    assert meta["completion_tokens"] == result.completion_tokens
    assert SpecStats.from_sglang_meta_info(meta) == result.stats
    with httpx.stream("POST", engine_server.url + "/generate", json={**payload, "stream": True}) as r:
        chunks = [orjson.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "spec_verify_ct" not in chunks[0]["meta_info"]
    assert chunks[-1]["meta_info"]["spec_correct_drafts_histogram"] == result.stats.histogram
    assert chunks[-1]["output_ids"] == result.output_ids


def test_stock_sglang_meta_info_becomes_usage_speculative(gateway_plain, engine_server_plain):
    """Without our plugin, non-streamed chat still gets stats: from meta_info, which is stripped."""
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "the the"}],
        "max_tokens": 9,
        "temperature": 0,
    }
    upstream = httpx.post(
        engine_server_plain.url + "/v1/chat/completions", json={**chat, "return_meta_info": True}
    ).json()
    assert "speculative" not in upstream["usage"]
    expected = SpecStats.from_sglang_meta_info(upstream["choices"][0]["meta_info"])
    r = httpx.post(gateway_plain.url + "/v1/chat/completions", json=chat, timeout=60)
    body = r.json()
    assert "meta_info" not in body["choices"][0]
    assert body["usage"]["speculative"] == expected.to_usage()
    assert r.headers["x-dflare-verify-steps"] == str(expected.verify_steps)
    # stock SGLang's streams and /v1/completions carry no stats: null, never invented
    assert completion(gateway_plain.url)["usage"]["speculative"] is None
    with httpx.stream(
        "POST",
        gateway_plain.url + "/v1/chat/completions",
        json={**chat, "stream": True, "stream_options": {"include_usage": True}},
    ) as s:
        events = [orjson.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[-1]["usage"]["speculative"] is None


def test_client_disconnect_aborts_upstream(gateway_http, engine_server):
    before = scrape(engine_server.url)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 100,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", gateway_http.url + "/v1/chat/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # the stream is running; now hang up
    deadline = time.monotonic() + 5
    labels = {"model_name": MODEL, "engine_type": "unified"}
    while True:
        after = scrape(engine_server.url)
        if delta(before, after, "sglang:num_aborted_requests_total", **labels) == 1:
            break
        assert time.monotonic() < deadline, "engine-server never saw the abort"
        time.sleep(0.1)
    generated = delta(before, after, "sglang:generation_tokens_total", **labels)
    assert 0 < generated < 100
