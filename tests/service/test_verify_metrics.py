"""The engine-server's ``dflare_engine_*`` metrics agree with what its requests report.

A live ``engine-server --verify-policy`` on the tiny pair, with a gateway in front: the verify-width
histogram counts exactly the verify steps the requests' ``usage.speculative`` (through the gateway) and
``meta_info`` (native ``/generate``) report, its sum their verified drafts, the plain-step counter their
``plain_decode_steps``; the calibration error is exported only with the policy on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sglang_ext.engine_server.verify_metrics import VerifyWidthCollector
from sglang_ext.reference.engine import SpeculativeEngine
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.reference.tiny import tiny_drafter
from sglang_ext.stats import SpecStats, total
from tests.core.helpers import prompts_for, target
from tests.service.conftest import MODEL, Proc, free_port, gateway, start

WIDTH, PLAIN, ERROR = (
    "dflare_engine_verify_width",
    "dflare_engine_plain_decode_steps",
    "dflare_engine_calibration_error",
)


@pytest.fixture(scope="module")
def policy_engine(tiny_pair, tmp_path_factory) -> Iterator[Proc]:
    target_dir, drafter_dir = tiny_pair
    port = free_port()
    args = ["engine-server", "--model-path", str(target_dir), "--draft-model-path", str(drafter_dir)]
    args += ["--served-model-name", MODEL, "--threads", "1", "--max-batch", "4", "--verify-policy"]
    proc = start([*args, "--port", str(port)], tmp_path_factory.mktemp("logs") / "policy_engine.log", port)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def policy_gateway(policy_engine, tmp_path_factory) -> Iterator[Proc]:
    proc = gateway([policy_engine.url], tmp_path_factory.mktemp("logs") / "policy_gateway.log")
    yield proc
    proc.stop()


def engine_samples(url: str) -> dict[str, dict[tuple, float]]:
    """Our metrics' samples by family: {sample name + sorted non-constant labels: value}."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("dflare_engine_"):
            for s in family.samples:
                assert s.labels.get("model_name") == MODEL, s
                out.setdefault(family.name, {})[(s.name, s.labels.get("le"))] = s.value
    return out


def chat_usage(gateway_url: str, content: str) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    body |= {"max_tokens": 24, "temperature": 0}
    r = httpx.post(gateway_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return {**r.json()["usage"], "request_id": r.headers["x-request-id"]}


def access_line(proc: Proc, request_id: str) -> dict:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [line for line in proc.output().splitlines() if request_id in line]
        if lines:
            return json.loads(lines[0])
        time.sleep(0.1)
    raise AssertionError(f"no access line for {request_id}")


def test_metrics_add_up_to_the_requests_stats(policy_engine, policy_gateway) -> None:
    before = engine_samples(policy_engine.url)  # the start-up profile may have stepped the engine
    stats: list[SpecStats] = []
    for content in ("the the the", "a b c d e f", "count to ten"):
        usage = chat_usage(policy_gateway.url, content)
        spec = usage["speculative"]
        assert spec is not None and "plain_decode_steps" in spec, usage
        stats.append(SpecStats.from_usage(spec))
        line = access_line(policy_gateway, usage["request_id"])["speculative"]
        assert line["plain_decode_steps"] == spec["plain_decode_steps"]
        assert line["draft_tokens"] == spec["draft_tokens"]
    for ids in ([17, 42, 99, 7, 150, 33], [5, 6, 7]):
        payload = {"input_ids": ids, "sampling_params": {"max_new_tokens": 24, "temperature": 0}}
        meta = httpx.post(policy_engine.url + "/generate", json=payload, timeout=60).json()["meta_info"]
        assert "spec_num_plain_steps" in meta, meta
        read = SpecStats.from_sglang_meta_info(meta)
        assert read is not None and read.plain_steps == meta["spec_num_plain_steps"]
        stats.append(read)
    after = engine_samples(policy_engine.url)
    summed = total(stats)
    assert summed is not None and summed.verify_steps + summed.plain_steps >= 5 * 20  # >= 1 token a step
    assert summed.plain_steps > 0  # the tiny pair's random drafter rarely pays: the policy decodes plainly

    def grew(family: str, sample: str, le: str | None = None) -> float:
        return after[family][(sample, le)] - before.get(family, {}).get((sample, le), 0.0)

    assert grew(WIDTH, WIDTH + "_count") == summed.verify_steps
    assert grew(WIDTH, WIDTH + "_sum") == summed.draft_tokens
    assert grew(WIDTH, WIDTH + "_bucket", "+Inf") == summed.verify_steps
    assert grew(WIDTH, WIDTH + "_bucket", "3.0") == summed.verify_steps  # block 4: at most 3 drafts
    assert grew(WIDTH, WIDTH + "_bucket", "1.0") <= grew(WIDTH, WIDTH + "_bucket", "2.0")
    assert grew(PLAIN, PLAIN + "_total") == summed.plain_steps
    error = after[ERROR][(ERROR, None)]
    assert 0.0 <= error <= 1.0


def test_calibration_error_only_with_the_policy_and_nothing_without_drafts() -> None:
    """The collector over engines in this process: a fixed threshold exports widths, no calibration
    error; plain decoding (block 1) exports nothing."""
    model = target(0)
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=4), 4, min_draft_confidence=0.02)
    results = engine.generate(prompts_for(0, 2), SamplingParams(max_tokens=12))
    names = {m.name: m for m in VerifyWidthCollector(engine, {"model_name": MODEL}).collect()}
    assert set(names) == {WIDTH, PLAIN}
    count = next(s.value for s in names[WIDTH].samples if s.name == WIDTH + "_count")
    assert count == sum(r.stats.verify_steps for r in results) > 0
    plain_engine = SpeculativeEngine(model, None, 1)
    plain_engine.generate(prompts_for(0, 1), SamplingParams(max_tokens=4))
    assert list(VerifyWidthCollector(plain_engine, {"model_name": MODEL}).collect()) == []
