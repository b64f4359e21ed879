"""A request ended by the end-of-turn token counts that token, on every path, as SGLang does.

SGLang's ``completion_tokens`` and native ``output_ids`` include the matched stop token id (its text does
not: see ``tests/fixtures/sglang/dflare_generate.json``, which ends with id 2 and reports it). Our engine
used to drop it, so an answer cut by the end-of-turn token reported one token fewer than SGLang, and an
answer that was only that token reported 0. The target here leans so hard towards its end-of-turn token
that it answers with nothing else: the first generated token ends the request.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.service.conftest import MODEL, Proc, _engine_server, gateway
from tests.service.tiny_models import build_pair

EOT = "<|im_end|>"
PROMPT = [17, 42, 99, 7]


@pytest.fixture(scope="module")
def eot_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_pair(tmp_path_factory.mktemp("eot_pair"), favoured=EOT)


@pytest.fixture(scope="module")
def eot_id(eot_pair) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(eot_pair[0])).convert_tokens_to_ids(EOT)


@pytest.fixture(scope="module")
def eot_engine(eot_pair, tmp_path_factory) -> Iterator[Proc]:
    yield from _engine_server(eot_pair, tmp_path_factory.mktemp("logs") / "eot_engine.log")


@pytest.fixture(scope="module")
def eot_gateway(eot_engine, tmp_path_factory) -> Iterator[Proc]:
    proc = gateway([eot_engine.url], tmp_path_factory.mktemp("logs") / "eot_gateway.log")
    yield proc
    proc.stop()


def test_engine_result_keeps_the_matched_stop_token(eot_pair, eot_id) -> None:
    from sglang_ext.reference import SamplingParams, load_engine

    engine = load_engine(*eot_pair)
    result = engine.generate([PROMPT], SamplingParams(max_tokens=8, stop_token_ids=(eot_id,)))[0]
    assert (result.output_ids, result.matched_stop, result.finish_reason) == ([], eot_id, "stop")
    assert result.completion_tokens == 1


def test_native_generate_reports_it_like_sglang(eot_engine, eot_id) -> None:
    payload = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    body = httpx.post(eot_engine.url + "/generate", json=payload, timeout=60).json()
    assert body["text"] == ""
    assert body["output_ids"] == [eot_id]
    assert body["meta_info"]["completion_tokens"] == 1
    assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": eot_id}


@pytest.mark.parametrize("stream", [False, True])
def test_openai_usage_counts_it_through_the_gateway(eot_gateway, stream: bool) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", eot_gateway.url + "/v1/completions", json=body, timeout=60) as r:
            chunks = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
        events = [orjson.loads(c) for c in chunks]
        usage = events[-1]["usage"]
        finish = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    else:
        r = httpx.post(eot_gateway.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        usage, finish = r.json()["usage"], [r.json()["choices"][0]["finish_reason"]]
    assert usage["completion_tokens"] == 1
    assert usage.get("speculative") is None  # no verify step ran
    assert finish == ["stop"]
