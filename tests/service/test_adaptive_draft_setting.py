"""``embedded_min_draft_confidence`` reaches the engine, on the embedded backend and the local engine-server.

The tiny pair's random drafter is never confident, so at the CPU default (0.02) the target verifies one
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


def _deep_acceptances(url: str) -> int:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    per_position = r.json()["usage"]["speculative"]["accepted_per_position"]
    assert per_position[0] > 0
    return sum(per_position[1:])


def test_threshold_zero_verifies_the_whole_block(whole_block, gateway_embedded) -> None:
    assert _deep_acceptances(gateway_embedded.url) == 0  # the CPU default cuts at one draft here
    assert _deep_acceptances(whole_block.url) > 0


def test_the_local_engine_server_gets_the_flag() -> None:
    args = engine_server_args(Settings(embedded_min_draft_confidence=0.1), 1234)
    assert args[args.index("--min-draft-confidence") + 1] == "0.1"
    assert "--min-draft-confidence" not in engine_server_args(Settings(), 1234)
