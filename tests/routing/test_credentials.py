"""Credentials of a live gateway process: the engine key it sends upstream, keys-file reload, the
separate metrics scrape token. The engines are stand-in SGLang processes that demand the key as
SGLang's ``--api-key`` does (everything but ``/health*`` and ``/metrics``)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest

from tests.routing.harness import chat_body, wait_admitted, wait_for

ENGINE_KEY = "engine-key-7f3a"


async def _chat(url: str, key: str | None, stream: bool) -> tuple[int, bytes]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/chat/completions", json=chat_body("hi", 4, stream=stream), headers=headers
        ) as resp,
    ):
        return resp.status, await resp.read()


async def _stats(url: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(url + "/debug/stats") as resp:
        return await resp.json()


async def test_gateway_sends_the_engine_key_upstream(spawn, gateway) -> None:
    engine = spawn("keyed", "--api-key", ENGINE_KEY)
    # The key arrives as a Secret's env value, trailing newline included.
    gw = gateway([engine.url], backend_api_key=ENGINE_KEY + "\n")
    await wait_for(gw.url)
    await wait_admitted(gw.url, 1)  # the prober's /v1/models call needs the key too
    for stream in (False, True):
        status, body = await _chat(gw.url, None, stream)
        assert status == 200, body
        assert b"keyed-t0" in body
    stats = await _stats(engine.url)
    assert stats["unauthorized"] == 0 and stats["finished"] == 2


async def test_without_the_engine_key_the_engine_refuses_and_is_never_admitted(spawn, gateway) -> None:
    engine = spawn("keyed", "--api-key", ENGINE_KEY)
    gw = gateway([engine.url])
    await wait_for(gw.url)
    with pytest.raises(TimeoutError):
        await wait_for(gw.url, "/ready", timeout=2.0)
    assert (await _stats(engine.url))["unauthorized"] > 0  # the fake really checks


def _swap(keys_file: Path, text: str) -> None:
    """Replace the file as the kubelet updates a Secret volume: write aside, then rename over it."""
    tmp = keys_file.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, keys_file)


async def _status_with(url: str, path: str, key: str) -> int:
    headers = {"authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as session:
        if path == "/metrics":
            async with session.get(url + path, headers=headers) as resp:
                return resp.status
        body = chat_body("hi", 2, stream=False)
        async with session.post(url + path, json=body, headers=headers) as resp:
            return resp.status


async def test_keys_file_change_takes_effect_without_restart(spawn, gateway, tmp_path: Path) -> None:
    engine = spawn("plain")
    keys_file = tmp_path / "api-keys"
    keys_file.write_text("old-key\n")
    gw = gateway([engine.url], api_keys_file=keys_file, api_keys_reload_s=0.2)
    await wait_for(gw.url, "/ready")
    chat = "/v1/chat/completions"
    assert await _status_with(gw.url, chat, "old-key") == 200
    assert await _status_with(gw.url, chat, "new-key") == 401
    pid = gw.proc.pid
    _swap(keys_file, "# rotated\nnew-key\n")
    deadline = time.monotonic() + 10
    while await _status_with(gw.url, chat, "new-key") != 200:
        assert time.monotonic() < deadline, "the new key was never accepted"
        await asyncio.sleep(0.1)
    assert await _status_with(gw.url, chat, "old-key") == 401
    # An unreadable file keeps the keys in force (a half-written Secret must not open or lock the gateway).
    keys_file.unlink()
    await asyncio.sleep(0.5)
    assert await _status_with(gw.url, chat, "new-key") == 200
    assert gw.proc.poll() is None and gw.proc.pid == pid


async def test_metrics_token_opens_metrics_and_nothing_else(spawn, gateway, tmp_path: Path) -> None:
    engine = spawn("plain")
    (tmp_path / "keys").write_text("user-key\n")
    (tmp_path / "scrape").write_text("scrape-token\n")
    gw = gateway(
        [engine.url],
        api_keys_file=tmp_path / "keys",
        metrics_tokens_file=tmp_path / "scrape",
        metrics_require_auth="true",
    )
    await wait_for(gw.url, "/ready")
    assert await _status_with(gw.url, "/metrics", "scrape-token") == 200
    assert await _status_with(gw.url, "/v1/chat/completions", "scrape-token") == 401
    assert await _status_with(gw.url, "/metrics", "wrong") == 401
    assert await _status_with(gw.url, "/v1/chat/completions", "user-key") == 200
