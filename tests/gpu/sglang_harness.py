"""Helpers shared by the GPU scripts: start/stop SGLang servers, HTTP calls, JSON results written as we go.

Not collected by pytest (``--ignore=tests/gpu``); runs on a GPU node with SGLang 0.5.17, started by
``tests/gpu/run_on_gpu.sh`` (which makes the plugin's entry point visible).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

OUT = Path(os.environ.get("OUT", "/tmp/out"))
LOGS = Path("/tmp/gpu_logs")

# Flags that need neither FlashInfer's JIT nor FA3, so the checks run on any SGLang 0.5.17 install:
# docs/sglang_plugin.md, "SGLang 0.5.17 facts the plugin relies on".
COMMON = [
    "--attention-backend", "triton",
    "--sampling-backend", "pytorch",
    "--grammar-backend", "none",
    "--host", "127.0.0.1",
    "--random-seed", "0",
    "--tokenizer-worker-num", "1",
    "--log-level", "info",
]  # fmt: skip
SPEC = ["--speculative-draft-attention-backend", "triton"]


class Results:
    """A JSON document rewritten after every update, so a run cut short still reports what it did."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.save()

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


class Server:
    """One ``python -m sglang.launch_server`` in its own process group, logging to /tmp/gpu_logs."""

    def __init__(self, name: str, port: int, args: list[str], env: dict[str, str] | None = None) -> None:
        with socket.socket() as probe:  # a server left by an interrupted run would answer in our place
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise RuntimeError(f"{name}: port {port} is already served (a stale server?); stop it first")
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = LOGS / f"{name}.log"
        cmd = [sys.executable, "-m", "sglang.launch_server", *COMMON, "--port", str(port), *args]
        self.cmd = cmd
        self.started = time.time()
        self.ready_s: float | None = None
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def wait(self, timeout: float = 480) -> bool:
        while time.time() - self.started < timeout:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "/health_generate", timeout=5) as r:
                    if r.status == 200:
                        self.ready_s = round(time.time() - self.started, 1)
                        return True
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
            time.sleep(1)
        return False

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def log_grep(self, needle: str) -> list[str]:
        return [ln for ln in self.log.read_text(errors="replace").splitlines() if needle in ln]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def stop_on_sigterm() -> None:
    """Turn SIGTERM (what ``timeout`` sends) into SystemExit, so ``finally`` blocks stop the servers: they
    run in their own sessions and would otherwise outlive the script."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def start_all(specs: Iterable[tuple[str, int, list[str], dict[str, str]]], timeout: float = 480) -> dict:
    """Start servers concurrently (startup is mostly CPU: imports, Triton JIT, graph capture)."""
    servers = {}
    for name, port, args, env in specs:  # staggered: each profiles free memory before the next loads
        servers[name] = Server(name, port, args, env)
        time.sleep(3)
    with cf.ThreadPoolExecutor(len(servers)) as pool:
        ok = dict(zip(servers, pool.map(lambda s: s.wait(timeout), servers.values()), strict=True))
    return {name: (srv, ok[name]) for name, srv in servers.items()}


def post(url: str, body: dict, timeout: float = 600) -> tuple[int, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def post_raw(url: str, body: dict, timeout: float = 600) -> tuple[int, str]:
    """Status and raw body text (SSE streams kept verbatim for fixtures)."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def generate(
    url: str, prompts: list[list[int]], sampling: dict, concurrency: int, timeout: float = 180
) -> list[dict]:
    """Native /generate for each prompt, ``concurrency`` requests in flight (batch size seen by SGLang).

    A request that does not finish within ``timeout`` fails the call (a hung server must not eat the run).
    """

    pool = cf.ThreadPoolExecutor(concurrency)
    try:
        return list(pool.map(lambda ids: generate_one(url, ids, sampling, timeout), prompts))
    finally:  # on a failure, queued requests are dropped instead of each waiting out its own timeout
        pool.shutdown(wait=False, cancel_futures=True)


def generate_one(
    url: str, ids: list[int], sampling: dict, timeout: float, send: Callable | None = None
) -> dict:
    """One native /generate (through ``send``, default ``post``); a non-200 answer raises."""
    status, body = (send or post)(url + "/generate", {"input_ids": ids, "sampling_params": sampling}, timeout)
    if status != 200:
        raise RuntimeError(f"/generate -> {status}: {body}")
    return body


def keep_full(
    url: str,
    prompt: list[int],
    sampling: dict,
    concurrency: int,
    seconds: float,
    send: Callable[[str, dict, float], tuple[int, Any]] | None = None,
    timeout: float = 180,
    spread: float = 0.0,
) -> tuple[float, list[tuple[float, float, int]]]:
    """A server kept at ``concurrency`` requests in flight for ``seconds``: each of ``concurrency`` clients
    sends its next /generate as soon as its last one answered, as a busy server's clients do (no closed
    batch draining to its slowest request). Returns the start time and (sent, answered, completion tokens)
    of every request (``time.monotonic``; those still running at the end are waited for).

    ``spread`` > 0: each request asks for ``max_new_tokens`` times a factor drawn uniformly from
    [1 - spread, 1 + spread] (client i draws from ``random.Random(i)``, so every server gets the same
    lengths), as real traffic's answers differ in length. With one length for all, plain decoding keeps its
    requests in lockstep: they finish together and their successors' prompts share one prefill forward,
    while speculative requests (each accepting differently) finish apart and pay a small prefill each."""
    start = time.monotonic()
    requests: list[tuple[float, float, int]] = []  # list.append is atomic: the clients share it as it is

    def client(index: int) -> None:
        draw = random.Random(index)
        while (sent := time.monotonic()) < start + seconds:
            asked = dict(sampling)
            if spread > 0:
                factor = draw.uniform(1 - spread, 1 + spread)
                asked["max_new_tokens"] = max(1, round(sampling["max_new_tokens"] * factor))
            body = generate_one(url, prompt, asked, timeout, send)
            requests.append((sent, time.monotonic(), int(body["meta_info"]["completion_tokens"])))

    with cf.ThreadPoolExecutor(concurrency) as pool:
        for done in [pool.submit(client, i) for i in range(concurrency)]:
            done.result()
    return start, requests


def steady_rate(requests: list[tuple[float, float, int]], t_from: float, t_to: float) -> float:
    """Tokens per second generated between ``t_from`` and ``t_to``: each request's tokens spread evenly
    over its lifetime and counted for the part of it inside the window. Counting whole requests at their
    answer overstates a window a few lifetimes long whenever requests finish in waves (AR keeps its batch
    in lockstep: a window holding two waves' answers but about 1.6 lifetimes read 1.25x too fast)."""
    tokens = 0.0
    for sent, answered, n in requests:
        inside = min(answered, t_to) - max(sent, t_from)
        if inside > 0:
            tokens += n * inside / max(answered - sent, 1e-9)
    return tokens / (t_to - t_from)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
