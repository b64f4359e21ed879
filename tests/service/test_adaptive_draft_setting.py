"""``embedded_min_draft_confidence`` and ``embedded_verify_policy`` reach the engine, on the embedded backend
and the local engine-server.

The tiny pair's random drafter is rarely confident, so at the fixed threshold 0.02 the target verifies one
draft per step and no draft past position 1 is accepted; with the threshold at 0 (the whole block) the
same request has deeper drafts accepted. That difference, visible in
``usage.speculative.accepted_per_position``, proves the setting took effect.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from service.local_engine import engine_server_args
from service.settings import Settings
from tests.service.conftest import MODEL, Proc, embedded_env, gateway

PROMPT = [17, 42, 99, 7, 150, 33]


@pytest.fixture(scope="module")
def whole_block(tiny_pair, tmp_path_factory) -> Iterator[Proc]:
    env = embedded_env(tiny_pair, min_draft_confidence="0")
    proc = gateway([], tmp_path_factory.mktemp("logs") / "whole_block.log", env=env)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def policy_on(tiny_pair, tmp_path_factory) -> Iterator[Proc]:
    proc = gateway(
        [], tmp_path_factory.mktemp("logs") / "policy.log", env=embedded_env(tiny_pair, policy=True)
    )
    yield proc
    proc.stop()


def _complete(url: str) -> dict:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _deep_acceptances(url: str) -> int:
    per_position = _complete(url)["usage"]["speculative"]["accepted_per_position"]
    assert per_position[0] > 0
    return sum(per_position[1:])


def test_threshold_zero_verifies_the_whole_block(whole_block, gateway_embedded) -> None:
    assert _deep_acceptances(gateway_embedded.url) == 0  # the 0.02 threshold cuts at one draft here
    assert _deep_acceptances(whole_block.url) > 0


def test_verify_policy_setting_serves_the_policy_losslessly(policy_on, whole_block) -> None:
    want = _complete(whole_block.url)["choices"][0]["text"]
    for _ in range(3):  # the calibration learns between requests; greedy text never changes
        body = _complete(policy_on.url)
        assert body["choices"][0]["text"] == want
        spec = body["usage"]["speculative"]  # present even when every step was a plain decode step
        assert spec["accepted_tokens"] <= spec["draft_tokens"] <= spec["verify_steps"] * 3
        decoded = body["usage"]["completion_tokens"] - 1  # after the prefill's token, at most 4 a step
        assert spec["verify_steps"] + spec["plain_decode_steps"] >= decoded / 4
    assert "verify-width policy on, block 4" in policy_on.output()


def test_the_local_engine_server_gets_the_flag() -> None:
    args = engine_server_args(Settings(embedded_min_draft_confidence=0.1), 1234)
    assert args[args.index("--min-draft-confidence") + 1] == "0.1"
    assert "--min-draft-confidence" not in engine_server_args(Settings(), 1234)
    assert "--verify-policy" in engine_server_args(Settings(embedded_verify_policy=True), 1234)
    assert "--no-verify-policy" in engine_server_args(Settings(embedded_verify_policy=False), 1234)
    default = engine_server_args(Settings(), 1234)  # the engine-server's own default: the policy on CPU
    assert "--verify-policy" not in default and "--no-verify-policy" not in default
