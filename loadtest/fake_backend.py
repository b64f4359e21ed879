"""A fast fake SGLang server for gateway benchmarks: canned answers, SGLang's wire format, no model.

It answers `POST /v1/chat/completions` (blocking, with SGLang's `choices[].meta_info` speculative
fields, or streamed as SSE with a usage chunk), `POST /v1/completions` (the same words as a text
completion), `/health`, `/v1/models` and SGLang's info endpoints,
on a bare asyncio protocol with httptools (keep-alive, no framework) so that one core of it outruns
any proxy put in front of it. `--fail` answers every chat request with HTTP 500 instead.

    python loadtest/fake_backend.py --port 31000 [--fail]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

import httptools

MODEL = "fake-model"
BLOCK_SIZE = 4
# 12 completion tokens from 4 verify steps that accepted 3, 2, 3, 0 drafts (+1 bonus token each).
HISTOGRAM = [1, 0, 2, 1]
META_INFO = {
    "id": "fake",
    "finish_reason": {"type": "length", "length": 12},
    "prompt_tokens": 20,
    "completion_tokens": 12,
    "cached_tokens": 0,
    "spec_verify_ct": 4,
    "spec_num_correct_drafts": sum(k * n for k, n in enumerate(HISTOGRAM)),
    "spec_num_proposed_drafts": 4 * (BLOCK_SIZE - 1),
    "spec_accept_rate": 7 / 12,
    "spec_accept_length": 3.0,
    "spec_correct_drafts_histogram": HISTOGRAM,
    "spec_accept_histogram": HISTOGRAM,
}
USAGE = {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}
WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", " and", " runs", "."]


def _chat_json() -> bytes:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "".join(WORDS)},
        "finish_reason": "length",
        "meta_info": META_INFO,
    }
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [choice],
        "usage": USAGE,
    }
    return json.dumps(body).encode()


def _text_json() -> bytes:
    """``/v1/completions``: the same words as a text completion (stock SGLang sends no meta_info here)."""
    choice = {"index": 0, "text": "".join(WORDS), "logprobs": None, "finish_reason": "length"}
    body = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": MODEL, "choices": [choice]}
    return json.dumps({**body, "usage": USAGE}).encode()


def _sse(chat: bool) -> bytes:
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
        choice = (
            {"index": 0, "delta": delta, "finish_reason": finish}
            if chat
            else {"index": 0, "text": delta.get("content", ""), "finish_reason": finish}
        )
        body = {
            "id": "chatcmpl-fake" if chat else "cmpl-fake",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 0,
            "model": MODEL,
            "choices": [] if usage else [choice],
        }
        if usage:
            body["usage"] = usage
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    parts = [chunk({"role": "assistant", "content": ""})] if chat else []
    parts += [chunk({"content": w}) for w in WORDS[:-1]]
    parts.append(chunk({"content": WORDS[-1]}, finish="length"))
    parts.append(chunk({}, usage=USAGE))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


CHAT = _response("200 OK", _chat_json())
CHAT_STREAM = _response("200 OK", _sse(chat=True), b"text/event-stream")
TEXT = _response("200 OK", _text_json())
TEXT_STREAM = _response("200 OK", _sse(chat=False), b"text/event-stream")
FAIL = _response(
    "500 Internal Server Error",
    json.dumps(
        {"object": "error", "message": "injected failure", "type": "InternalServerError", "code": 500}
    ).encode(),
)
MODELS = _response(
    "200 OK",
    json.dumps(
        {
            "object": "list",
            "data": [
                {"id": MODEL, "object": "model", "created": 0, "owned_by": "sglang", "max_model_len": 4096}
            ],
        }
    ).encode(),
)
INFO = _response(
    "200 OK",
    json.dumps(
        {
            "model_path": MODEL,
            "tokenizer_path": MODEL,
            "is_generation": True,
            "served_model_name": MODEL,
            "speculative_algorithm": "DFLARE",
            "max_total_num_tokens": 65536,
        }
    ).encode(),
)
HEALTH = _response("200 OK", b"")
NOT_FOUND = _response("404 Not Found", b'{"detail":"Not Found"}')
GET_ROUTES = {
    b"/health": HEALTH,
    b"/health_generate": HEALTH,
    b"/v1/models": MODELS,
    b"/get_model_info": INFO,
    b"/model_info": INFO,
    b"/get_server_info": INFO,
    b"/server_info": INFO,
}


class FakeSGLang(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; the answer depends only on method, path and `"stream": true`."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path = self.url.split(b"?", 1)[0]
        if self.parser.get_method() == b"GET":
            answer = GET_ROUTES.get(path, NOT_FOUND)
        elif path in (b"/v1/chat/completions", b"/v1/completions"):
            body = b"".join(self.body)
            stream = b'"stream":true' in body.replace(b" ", b"")
            if path == b"/v1/chat/completions":
                answer = CHAT_STREAM if stream else CHAT
            else:
                answer = TEXT_STREAM if stream else TEXT
            answer = FAIL if self.fail else answer
        else:
            answer = NOT_FOUND
        self.transport.write(answer)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(host: str, port: int, fail: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeSGLang(fail), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=31000)
    parser.add_argument("--fail", action="store_true", help="answer chat requests with HTTP 500")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.fail))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
