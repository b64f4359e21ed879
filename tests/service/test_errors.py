"""Every bad input gets OpenAI's error shape, status, type and code, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from service.app import create_app
from service.backends.base import Backend, BackendRequest, Completion, Stream
from service.settings import Settings
from tests.service.conftest import MODEL, free_port, serve_in_thread, start
from tests.service.tiny_models import MAX_CONTEXT

CHAT = "/v1/chat/completions"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# the tiny pair answers this with " the the ..." and no end-of-sequence: a long generation on demand
LONG = {**GOOD, "messages": [{"role": "user", "content": "Say the the the"}], "temperature": 0}
BAD_INPUTS = [
    # name, request kwargs, status, type, code, param
    (
        "malformed json",
        {"content": b'{"model": "tiny", "messages": [', "headers": {"content-type": "application/json"}},
        400,
        "invalid_request_error",
        None,
        None,
    ),
    ("wrong types", {"json": {**GOOD, "messages": "hello"}}, 400, "invalid_request_error", None, "messages"),
    (
        "negative max_tokens",
        {"json": {**GOOD, "max_tokens": -1}},
        400,
        "invalid_request_error",
        None,
        "max_tokens",
    ),
    (
        "max_tokens beyond context",
        {"json": {**GOOD, "max_tokens": 100_000}},
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "max_tokens",
    ),
    (
        "prompt beyond context",
        {"json": {**GOOD, "messages": [{"role": "user", "content": "the " * 400}]}},
        400,
        "invalid_request_error",
        "context_length_exceeded",
        None,
    ),
    (
        "unknown model",
        {"json": {**GOOD, "model": "gpt-17"}},
        404,
        "invalid_request_error",
        "model_not_found",
        "model",
    ),
    (
        "oversized body",
        {"json": {**GOOD, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}},
        413,
        "invalid_request_error",
        "request_too_large",
        None,
    ),
    (
        "wrong content type",
        {"content": b"model=tiny", "headers": {"content-type": "text/plain"}},
        400,
        "invalid_request_error",
        None,
        None,
    ),
    ("n=0", {"json": {**GOOD, "n": 0}}, 400, "invalid_request_error", None, "n"),
    ("n above the cap", {"json": {**GOOD, "n": 129}}, 400, "invalid_request_error", None, "n"),
    # 4 running + 64 waiting fit in the engine: more choices could never run together
    ("n beyond the engine", {"json": {**GOOD, "n": 100}}, 400, "invalid_request_error", None, "n"),
    ("logprobs", {"json": {**GOOD, "logprobs": True}}, 400, "invalid_request_error", None, "logprobs"),
    ("empty messages", {"json": {**GOOD, "messages": []}}, 400, "invalid_request_error", None, "messages"),
    ("no body", {"headers": {"content-type": "application/json"}}, 400, "invalid_request_error", None, None),
    (
        "temperature out of range",
        {"json": {**GOOD, "temperature": 7}},
        400,
        "invalid_request_error",
        None,
        "temperature",
    ),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "status", "type_", "code", "param"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input(any_gateway, name, kwargs, status, type_, code, param):
    r = httpx.post(any_gateway.url + CHAT, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert (error["type"], error["code"]) == (type_, code)
    if param is not None:
        assert error["param"] == param
    after = httpx.post(any_gateway.url + CHAT, json=GOOD, timeout=60)
    assert after.status_code == 200, "the server must keep serving after a bad request"


def test_unknown_route_and_method(gateway_http):
    r = httpx.get(gateway_http.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(gateway_http.url + CHAT)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_openai_client_sees_typed_errors(gateway_http):
    c = openai.OpenAI(base_url=gateway_http.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        c.chat.completions.create(model="gpt-17", messages=GOOD["messages"])
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=MODEL, messages=GOOD["messages"], max_tokens=100_000)
    assert exc.value.code == "context_length_exceeded"


def test_sglang_style_errors_are_converted(gateway_http, engine_server):
    """engine-server answers in SGLang's shape; the gateway answers in OpenAI's."""
    upstream = httpx.post(engine_server.url + CHAT, json={**GOOD, "max_tokens": 100_000}).json()
    assert upstream["object"] == "error" and upstream["code"] == 400
    converted = httpx.post(gateway_http.url + CHAT, json={**GOOD, "max_tokens": 100_000}).json()["error"]
    assert converted["code"] == "context_length_exceeded" and converted["message"] == upstream["message"]


def test_api_key_required_when_configured(engine_server):
    app = create_app(Settings(backends=[engine_server.url], api_keys=["s3cret"], health_interval_s=0.2))
    with serve_in_thread(app) as url:
        _wait_ready(url)
        c = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as exc:
            c.models.list()
        assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
        assert exc.value.body["type"] == "invalid_request_error"
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [MODEL]


def test_no_backend_is_503(tmp_path):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    with serve_in_thread(create_app(Settings(backends=[dead], health_interval_s=0.2))) as url:
        assert httpx.get(url + "/ready").status_code == 503
        r = httpx.post(url + CHAT, json=GOOD)
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error"
        assert httpx.get(url + "/health").status_code == 200


def test_backend_timeout_is_504(engine_server):
    app = create_app(Settings(backends=[engine_server.url], request_timeout_s=0.001, health_interval_s=0.2))
    with serve_in_thread(app) as url:
        _wait_ready(url)
        r = httpx.post(url + CHAT, json={**LONG, "max_tokens": 90}, timeout=30)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout"


def test_full_engine_queue_is_429(tiny_pair):
    target, drafter = tiny_pair
    settings = Settings(
        embedded_target_dir=target,
        embedded_drafter_dir=drafter,
        embedded_model=MODEL,
        embedded_max_batch=1,
        embedded_queue_size=1,
        embedded_threads=1,
    )
    with serve_in_thread(create_app(settings)) as url:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                body = {**LONG, "max_tokens": 30}
                return await asyncio.gather(*(client.post(url + CHAT, json=body) for _ in range(6)))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and set(codes) == {200, 429}, codes
        metrics = httpx.get(url + "/metrics").text
        assert f'dflare_rejected_requests_total{{reason="queue_full"}} {codes.count(429)}.0' in metrics
        limited = next(r for r in responses if r.status_code == 429)
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(limited.headers["retry-after"]) >= 1
        assert httpx.post(url + CHAT, json=GOOD, timeout=60).status_code == 200


class _BrokenBackend(Backend):
    """A backend with a bug: the gateway must answer 500 in OpenAI's shape, not a traceback."""

    name = "broken"

    async def models(self) -> list[str]:
        return [MODEL]

    async def health(self) -> bool:
        return True

    async def complete(self, req: BackendRequest) -> Completion:
        raise RuntimeError("bug in a backend")

    async def stream(self, req: BackendRequest) -> Stream:
        return _BrokenStream()


class _BrokenStream(Stream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'data: {"choices": []}\n\n'
        raise RuntimeError("bug mid-stream")

    async def aclose(self) -> None:
        pass


def test_unexpected_errors_are_500_in_openai_shape():
    with serve_in_thread(create_app(Settings(), backend=_BrokenBackend())) as url:
        r = httpx.post(url + CHAT, json=GOOD)
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error" and "Traceback" not in r.text
        with httpx.stream("POST", url + CHAT, json={**GOOD, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line]
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"


def _wait_ready(url: str, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while httpx.get(url + "/ready").status_code != 200:
        assert time.monotonic() < deadline, "gateway never became ready"
        time.sleep(0.1)


def _stream_events(url: str, body: dict) -> tuple[int, list[str]]:
    with httpx.stream("POST", url + CHAT, json={**body, "stream": True}, timeout=30) as r:
        return r.status_code, [line for line in r.iter_lines() if line]


def test_first_token_timeout_is_504_before_any_byte(engine_server):
    settings = Settings(backends=[engine_server.url], first_token_timeout_s=0.001, health_interval_s=0.2)
    with serve_in_thread(create_app(settings)) as url:
        _wait_ready(url)
        status, lines = _stream_events(url, {**LONG, "max_tokens": 20})
        assert status == 504, lines
        assert json.loads(lines[0])["error"]["code"] == "timeout"


def test_idle_stream_timeout_ends_the_stream_with_an_error_event(engine_server):
    settings = Settings(backends=[engine_server.url], idle_stream_timeout_s=0.001, health_interval_s=0.2)
    with serve_in_thread(create_app(settings)) as url:
        _wait_ready(url)
        status, lines = _stream_events(url, {**LONG, "max_tokens": 60})
        assert status == 200
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: ") :])["error"]["code"] == "timeout"
        assert httpx.post(url + CHAT, json=GOOD, timeout=60).status_code == 200


def test_log_prompts_puts_texts_in_the_access_line(engine_server, caplog):
    settings = Settings(backends=[engine_server.url], log_prompts=True, health_interval_s=0.2)
    with caplog.at_level("INFO", logger="dflare.access"), serve_in_thread(create_app(settings)) as url:
        _wait_ready(url)
        body = httpx.post(url + CHAT, json={**LONG, "max_tokens": 4}, timeout=60).json()
        _stream_events(url, {**LONG, "max_tokens": 4})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dflare.access"]
    chats = [line for line in lines if line["path"] == CHAT]
    assert [line["stream"] for line in chats] == [False, True]
    assert all(line["prompt"] == "Say the the the" for line in chats)
    assert chats[0]["completion"] == body["choices"][0]["message"]["content"] == chats[1]["completion"]


def test_oversized_chunked_body_without_length_is_413(gateway_http):
    def chunks():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}]}'

    r = httpx.post(gateway_http.url + CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"


def test_too_many_stop_sequences_names_the_limit(gateway_http):
    """Issue 19, defect 9: the message names the limit, not a branch of the field's type."""
    r = httpx.post(gateway_http.url + CHAT, json={**GOOD, "stop": [f"s{i}" for i in range(17)]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "stop" and "16" in error["message"] and "17" in error["message"], error
    assert httpx.post(gateway_http.url + CHAT, json={**GOOD, "stop": ["s"] * 16}).status_code == 200


def test_long_prompt_is_refused_without_a_tokenizer_warning_in_the_log(tiny_pair, tmp_path):
    """Issue 19, defect 9: a tokenizer that knows its model's length (as real ones do) warns on every
    longer prompt; the engine refuses such a prompt itself, and the warning stays out of the log."""
    target, drafter = tiny_pair
    limited = tmp_path / "target"
    shutil.copytree(target, limited)
    config_path = limited / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "model_max_length": MAX_CONTEXT}))
    port = free_port()
    log = tmp_path / "engine.log"
    args = ["engine-server", "--model-path", str(limited), "--draft-model-path", str(drafter)]
    args += ["--served-model-name", MODEL, "--threads", "1", "--port", str(port)]
    proc = start(args, log, port)
    try:
        long_prompt = {**GOOD, "messages": [{"role": "user", "content": "the " * (2 * MAX_CONTEXT)}]}
        r = httpx.post(proc.url + CHAT, json=long_prompt, timeout=30)
        assert r.status_code == 400 and r.json()["code"] == 400, r.text
        assert "maximum context length" in r.json()["message"]
    finally:
        proc.stop()
    assert "longer than the specified maximum" not in log.read_text(), log.read_text()[-3000:]
