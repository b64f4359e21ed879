"""Metrics scraped and parsed back change by exactly what the requests did (one and several workers).

Expected amounts come from the responses themselves (usage and usage.speculative), which other tests
tie to the engine's own counts, so a metric that double counts, drops a request or mixes up a label
fails here.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sglang_ext.stats import SpecStats
from tests.service.conftest import MODEL, gateway

CHAT = "/v1/chat/completions"
SCHED_METRICS = [
    "num_running_reqs",
    "num_retracted_reqs",
    "queue_time_seconds_count",
    "num_queue_reqs",
    "token_usage",
    "cache_hit_rate",
    "gen_throughput",
    "spec_accept_length",
    "spec_accept_rate",
]
REQ_METRICS = [
    "prompt_tokens_total",
    "generation_tokens_total",
    "num_requests_total",
    "time_to_first_token_seconds_count",
    "inter_token_latency_seconds_count",
    "e2e_request_latency_seconds_count",
]


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(url + "/metrics", headers={"connection": "close"}, timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def body(max_tokens: int, *, stream: bool = False, usage: bool = False, content: str = "the the") -> dict:
    b = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if usage:
        b["stream_options"] = {"include_usage": True}
    return b


def stream_usage(url: str, payload: dict) -> dict | None:
    """POST a streamed request on a fresh connection; return its usage chunk, if any."""
    import orjson

    usage = None
    with httpx.stream("POST", url + CHAT, json=payload, headers={"connection": "close"}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                data = orjson.loads(line[6:])
                if data.get("usage"):
                    usage = data["usage"]
    return usage


def run_mix(url: str) -> list[dict]:
    """2 plain, 2 streamed-with-usage, 1 streamed-without (same request as one with): their usages."""
    usages = []
    for n in (6, 9):
        r = httpx.post(url + CHAT, json=body(n), headers={"connection": "close"}, timeout=60)
        assert r.status_code == 200
        usages.append(r.json()["usage"])
    for n in (7, 5):
        usages.append(stream_usage(url, body(n, stream=True, usage=True)))
    assert stream_usage(url, body(5, stream=True)) is None
    usages.append(usages[-1])  # greedy: identical request, identical usage
    return usages


def expected_deltas(usages: list[dict]) -> dict:
    stats = [SpecStats.from_usage(u["speculative"]) for u in usages]
    per_pos = Counter()
    for s in stats:
        for i, n in enumerate(s.accepted_per_position):
            per_pos[str(i)] += n
    return {
        "prompt": sum(u["prompt_tokens"] for u in usages),
        "completion": sum(u["completion_tokens"] for u in usages),
        "drafts": sum(s.verify_steps for s in stats),
        "draft_tokens": sum(s.draft_tokens for s in stats),
        "accepted": sum(s.accepted_tokens for s in stats),
        "tau_sum": sum(s.acceptance_length for s in stats),
        "per_pos": per_pos,
        "le2": sum(s.acceptance_length <= 2 for s in stats),
    }


def check_gateway_deltas(before: dict, after: dict, backend: str, usages: list[dict]) -> None:
    exp = expected_deltas(usages)
    mb = {"model": MODEL, "backend": backend}
    assert delta(before, after, "dflare_requests_total", endpoint=CHAT, status="200", **mb) == 5
    assert delta(before, after, "dflare_request_duration_seconds_count", endpoint=CHAT, **mb) == 5
    assert delta(before, after, "dflare_prompt_tokens_total", **mb) == exp["prompt"]
    assert delta(before, after, "dflare_completion_tokens_total", **mb) == exp["completion"]
    assert delta(before, after, "dflare_spec_decode_num_drafts_total", **mb) == exp["drafts"]
    assert delta(before, after, "dflare_spec_decode_num_draft_tokens_total", **mb) == exp["draft_tokens"]
    assert delta(before, after, "dflare_spec_decode_num_accepted_tokens_total", **mb) == exp["accepted"]
    # block 4: one to three drafts verified per step (the CPU engine's adaptive draft length)
    assert exp["drafts"] > 0 and exp["drafts"] <= exp["draft_tokens"] <= 3 * exp["drafts"]
    for pos in ("0", "1", "2"):
        got = delta(before, after, "dflare_spec_decode_num_accepted_tokens_per_pos_total", position=pos, **mb)
        assert got == exp["per_pos"][pos], pos
    assert delta(before, after, "dflare_spec_decode_acceptance_length_count", **mb) == 5
    assert delta(before, after, "dflare_spec_decode_acceptance_length_sum", **mb) == pytest.approx(
        exp["tau_sum"]
    )
    assert delta(before, after, "dflare_spec_decode_acceptance_length_bucket", le="2.0", **mb) == exp["le2"]
    assert delta(before, after, "dflare_time_to_first_token_seconds_count", **mb) == 3
    assert delta(before, after, "dflare_inter_token_latency_seconds_count", **mb) == 3
    assert after[("dflare_requests_in_flight", frozenset())] == 0


def test_gateway_metrics_change_by_exact_amounts(gateway_http, engine_server):
    url = gateway_http.url
    before = scrape(url)
    usages = run_mix(url)
    bad = httpx.post(url + CHAT, json={**body(3), "model": "no-such-model"})
    assert bad.status_code == 404
    invalid = httpx.post(url + CHAT, json={**body(3), "max_tokens": -1})
    assert invalid.status_code == 400
    after = scrape(url)
    check_gateway_deltas(before, after, engine_server.url, usages)
    none = {"model": "none", "backend": "none", "endpoint": CHAT}
    assert delta(before, after, "dflare_requests_total", status="404", **none) == 1
    assert delta(before, after, "dflare_requests_total", status="400", **none) == 1
    assert after[("dflare_backend_up", frozenset({("backend", engine_server.url)}))] == 1
    info = {"backend": engine_server.url, "backend_pod": engine_server.url.removeprefix("http://")}
    assert after[("dflare_backend_info", frozenset({**info, "backend_namespace": ""}.items()))] == 1


def test_embedded_gateway_metrics(gateway_embedded):
    before = scrape(gateway_embedded.url)
    usages = run_mix(gateway_embedded.url)
    check_gateway_deltas(before, scrape(gateway_embedded.url), "embedded", usages)


def test_several_workers_aggregate(engine_server, tmp_path):
    gw = gateway([engine_server.url], tmp_path / "gateway_workers.log", workers=2)
    try:
        before = scrape(gw.url)
        usages = run_mix(gw.url) + run_mix(gw.url)
        scrapes = [scrape(gw.url) for _ in range(6)]  # fresh connections: several workers answer
    finally:
        gw.stop()
    exp = expected_deltas(usages)
    mb = {"model": MODEL, "backend": engine_server.url}
    for after in scrapes:
        assert delta(before, after, "dflare_requests_total", endpoint=CHAT, status="200", **mb) == 10
        assert delta(before, after, "dflare_completion_tokens_total", **mb) == exp["completion"]
        assert delta(before, after, "dflare_spec_decode_num_accepted_tokens_total", **mb) == exp["accepted"]
        assert delta(before, after, "dflare_spec_decode_num_drafts_total", **mb) == exp["drafts"]
        assert delta(before, after, "dflare_time_to_first_token_seconds_count", **mb) == 6
        assert after[("dflare_requests_in_flight", frozenset())] == 0


def test_engine_server_exports_sglang_metrics(engine_server):
    url = engine_server.url
    before = scrape(url)
    r = httpx.post(url + CHAT, json=body(6), timeout=60)
    usage = r.json()["usage"]
    after = scrape(url)
    sched = {"model_name": MODEL, "engine_type": "unified", "tp_rank": "0"}
    req = {"model_name": MODEL, "engine_type": "unified"}
    for name in SCHED_METRICS:
        assert (f"sglang:{name}", frozenset(sched.items())) in after, name
    for name in REQ_METRICS:
        assert (f"sglang:{name}", frozenset(req.items())) in after, name
    stats = SpecStats.from_usage(usage["speculative"])
    assert delta(before, after, "sglang:num_requests_total", **req) == 1
    assert delta(before, after, "sglang:prompt_tokens_total", **req) == usage["prompt_tokens"]
    assert delta(before, after, "sglang:generation_tokens_total", **req) == usage["completion_tokens"]
    assert delta(before, after, "sglang:spec_verify_calls_total", **sched) == stats.verify_steps
    assert delta(before, after, "sglang:time_to_first_token_seconds_count", **req) == 1
    # Queue time ends when the step that prefills the request begins: before its first token.
    assert delta(before, after, "sglang:queue_time_seconds_count", **sched) == 1
    queued = delta(before, after, "sglang:queue_time_seconds_sum", **sched)
    assert 0 <= queued < delta(before, after, "sglang:time_to_first_token_seconds_sum", **req)
    assert after[("sglang:num_retracted_reqs", frozenset(sched.items()))] == 0
    assert after[("sglang:num_running_reqs", frozenset(sched.items()))] == 0
    assert after[("sglang:spec_accept_length", frozenset(sched.items()))] >= 1.0
