"""OpenAI chat users, streaming and not, that measure what a user of a speculative server feels.

With `stream=True` locust times only the response headers, so the numbers that matter are measured
here, as vLLM's `bench_serving` defines them (`request_metrics.py`): TTFT, TPOT, E2E, output tokens/s
per request, and `usage.speculative.acceptance_length` when present. They go to the run's
`Measurements` (printed and written as `<csv prefix>_measurements.csv` at the end), not into locust's
stats, whose "Aggregated" row stays the HTTP requests alone. Every request also goes to the run's
`RequestLog` with exact values, for the PNG summary.
"""

from __future__ import annotations

import itertools
import time

from locust import FastHttpUser, between, task
from openai_stream import StreamTimes
from prompt_sets import PromptPicker, load_prompts
from request_metrics import request_metrics
from run_checks import RequestRecord, measurements, recorder

CHAT_PATH = "/v1/chat/completions"
_user_ids = itertools.count()


class ChatUser(FastHttpUser):
    """One chat client: mostly streaming (as chat UIs do), sometimes a blocking call (as batch jobs do)."""

    wait_time = between(0.05, 0.25)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        sets = [s.strip() for s in options.prompt_sets.split(",") if s.strip()]
        self.prompts = PromptPicker(load_prompts(sets), seed=next(_user_ids))
        self.model = options.model or self._first_served_model()

    def _first_served_model(self) -> str:
        with self.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"/v1/models answered {resp.status_code}")
                return "default"
            data = resp.json().get("data") or []
            return data[0]["id"] if data else "default"

    def _body(self, stream: bool) -> dict:
        options = self.environment.parsed_options
        prompt = self.prompts.next()
        body = {
            "model": self.model,
            "messages": prompt.messages,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    @task(3)
    def chat_stream(self) -> None:
        name = "chat stream"
        times = StreamTimes(start=time.perf_counter())
        with self.client.post(
            CHAT_PATH, json=self._body(True), name=name, stream=True, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {_error_message(resp)}")
                self._record(name, stream=True, ok=False, status=resp.status_code)
                return
            done = False
            buffer = ""
            for chunk in resp.iter_content(chunk_size=4096):
                buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
                while "\n" in buffer and not done:
                    line, buffer = buffer.split("\n", 1)
                    done = times.feed(line.strip(), time.perf_counter())
            end = time.perf_counter()
            problem = times.error or (None if done else "stream ended without [DONE]")
            if problem is None and times.first_token is None:
                problem = "stream carried no content"
            if problem:
                resp.failure(problem)
                self._record(name, stream=True, ok=False, status=resp.status_code)
                return
            resp.success()
        tokens = int((times.usage or {}).get("completion_tokens") or times.content_chunks)
        self._measured(name, times.usage, tokens, end - times.start, ttft=times.first_token - times.start)

    @task(1)
    def chat_blocking(self) -> None:
        name = "chat"
        start = time.perf_counter()
        with self.client.post(CHAT_PATH, json=self._body(False), name=name, catch_response=True) as resp:
            end = time.perf_counter()
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {_error_message(resp)}")
                self._record(name, stream=False, ok=False, status=resp.status_code)
                return
            body = resp.json()
            if not body.get("choices"):
                resp.failure("response without choices")
                self._record(name, stream=False, ok=False, status=resp.status_code)
                return
        usage = body.get("usage") or {}
        tokens = int(usage.get("completion_tokens") or 0)
        self._measured(name, usage, tokens, end - start, ttft=None)

    # ---- reporting -------------------------------------------------------------------------------
    def _measured(
        self, name: str, usage: dict | None, tokens: int, e2e: float, *, ttft: float | None
    ) -> None:
        """``ttft`` is None for a blocking call: it cannot tell when the first token was ready."""
        m = request_metrics(e2e, tokens, ttft)
        spec = (usage or {}).get("speculative") or {}
        accept_len = spec.get("acceptance_length")
        measurements(self.environment).add_request(
            name, m, float(accept_len) if accept_len is not None else None
        )
        self._record(
            name,
            stream=ttft is not None,
            ok=True,
            status=200,
            ttft_s=ttft,
            tpot_s=m.tpot_s,
            e2e_s=e2e,
            completion_tokens=tokens,
            output_tokens_per_s=m.output_tokens_per_s,
            acceptance_length=accept_len,
            acceptance_rate=spec.get("acceptance_rate"),
        )

    def _record(self, name: str, **fields: object) -> None:
        recorder(self.environment).add(RequestRecord(t=time.time(), name=name, **fields))


def _error_message(resp: object) -> str:
    try:
        return str(resp.json()["error"]["message"])[:200]  # the OpenAI error shape
    except Exception:
        return (getattr(resp, "text", "") or "")[:200]
