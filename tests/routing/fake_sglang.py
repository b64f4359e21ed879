"""A stand-in SGLang server speaking its OpenAI HTTP protocol, run as a real process on loopback.

For routing tests that need many backends, misbehaving ones and precise observation, which a real
engine cannot give cheaply on 2 CPU cores: ``/health`` (503 while "loading"), ``/v1/models``,
``/v1/chat/completions`` and ``/v1/completions`` (streamed SSE with a final usage chunk, or JSON),
tokens paced by ``--token-delay`` after ``--queue-delay`` seconds in a simulated queue.
``/debug/stats`` reports what the gateway cannot fake: requests seen, finished, and for each request
whose client went away (streamed or not) the wall-clock time it noticed and the tokens it had sent.

    python -m tests.routing.fake_sglang --name b0 --model tiny [--port 0] [--loading-s 2]

prints ``PORT <n>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
from aiohttp import web


class FakeSGLang:
    def __init__(
        self,
        name: str,
        model: str,
        token_delay_s: float,
        loading_s: float,
        fail_status: int | None,
        drop_before_first_token: bool = False,
        api_key: str | None = None,
        queue_delay_s: float = 0.0,
    ) -> None:
        self.name = name
        self.model = model
        self.token_delay_s = token_delay_s
        self.ready_at = time.monotonic() + loading_s
        self.fail_status = fail_status
        self.drop_before_first_token = drop_before_first_token
        self.api_key = api_key
        self.queue_delay_s = queue_delay_s
        self.stats: dict[str, Any] = {
            "requests": 0,
            "finished": 0,
            "aborts": [],
            "prompts": [],
            "unauthorized": 0,
        }

    @web.middleware
    async def require_key(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """As SGLang with ``--api-key``: everything but /health* and /metrics needs the bearer key."""
        open_path = request.path.startswith(("/health", "/metrics", "/debug/"))
        authorized = request.headers.get("Authorization") == f"Bearer {self.api_key}"
        if self.api_key and not open_path and not authorized:
            self.stats["unauthorized"] += 1
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.require_key])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_get("/debug/stats", self.debug_stats)
        app.router.add_post("/debug/fail", self.set_fail)
        app.router.add_post("/debug/ready", self.set_ready)
        return app

    async def health(self, request: web.Request) -> web.Response:
        if time.monotonic() < self.ready_at:
            return web.Response(status=503, text="loading")
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "sglang"}]}
        )

    async def debug_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def set_ready(self, request: web.Request) -> web.Response:
        """End the simulated model loading now."""
        self.ready_at = time.monotonic()
        return web.json_response({"ready": True})

    async def set_fail(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.fail_status = body.get("status")
        return web.json_response({"fail_status": self.fail_status})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.stats["requests"] += 1
        if self.fail_status:
            error = {"object": "error", "message": "injected failure", "code": self.fail_status}
            return web.json_response(error, status=self.fail_status)
        chat = request.path.endswith("chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        self.stats["prompts"].append(prompt)
        n = int(body.get("max_tokens") or 8)
        words = [f"{self.name}-t{i}" for i in range(n)]
        rid = request.headers.get("x-request-id", "req")
        usage = {"prompt_tokens": len(str(prompt).split()), "completion_tokens": n, "total_tokens": 0}
        if not body.get("stream"):
            try:  # aiohttp cancels the handler when the client's connection closes: SGLang's abort
                await asyncio.sleep(self.queue_delay_s + self.token_delay_s * n)
            except asyncio.CancelledError:
                self.stats["aborts"].append({"request_id": rid, "at": time.time(), "tokens": 0})
                raise
            self.stats["finished"] += 1
            text = " ".join(words)
            message = {"role": "assistant", "content": text}
            choice = (
                {"index": 0, "message": message, "finish_reason": "length"}
                if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": self.model,
                    "choices": [choice],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:  # waiting in the engine's queue: the 200 went out, no event yet
            await asyncio.sleep(self.queue_delay_s)
        except asyncio.CancelledError:
            self.stats["aborts"].append({"request_id": rid, "at": time.time(), "tokens": 0})
            raise
        if self.drop_before_first_token:  # accepted (200 sent), then the engine "crashes"
            await response.write(b"")
            assert request.transport is not None
            request.transport.close()
            return response
        kind = "chat.completion.chunk" if chat else "text_completion"
        i = 0
        try:
            for i, word in enumerate(words):
                await asyncio.sleep(self.token_delay_s)
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError
                piece = word if i == 0 else " " + word
                choice = (
                    {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                    if chat
                    else {"index": 0, "text": piece, "finish_reason": None}
                )
                await response.write(
                    b"data: "
                    + orjson.dumps({"id": rid, "object": kind, "model": self.model, "choices": [choice]})
                    + b"\n\n"
                )
            if (body.get("stream_options") or {}).get("include_usage"):
                await response.write(
                    b"data: "
                    + orjson.dumps(
                        {"id": rid, "object": kind, "model": self.model, "choices": [], "usage": usage}
                    )
                    + b"\n\n"
                )
            await response.write(b"data: [DONE]\n\n")
            self.stats["finished"] += 1
        except (ConnectionResetError, asyncio.CancelledError):
            self.stats["aborts"].append({"request_id": rid, "at": time.time(), "tokens": i})
            raise
        return response


async def serve(args: argparse.Namespace) -> None:
    fake = FakeSGLang(
        args.name,
        args.model,
        args.token_delay,
        args.loading_s,
        args.fail_status,
        args.drop_before_first_token,
        args.api_key,
        args.queue_delay,
    )
    runner = web.AppRunner(fake.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"PORT {port}", flush=True)  # the parent reads it
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--loading-s", type=float, default=0.0)
    parser.add_argument("--fail-status", type=int, default=None)
    parser.add_argument("--drop-before-first-token", action="store_true")
    parser.add_argument("--api-key", default=None, help="demand 'Authorization: Bearer KEY' as SGLang does")
    parser.add_argument("--queue-delay", type=float, default=0.0, help="seconds before the first token")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
