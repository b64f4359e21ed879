"""`dflare serve` flags, defaults and settings sources (no server started)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from service import cli
from service.settings import Settings

ENV_KEYS = (
    "DFLARE_HOST",
    "DFLARE_PORT",
    "DFLARE_WORKERS",
    "DFLARE_BACKENDS",
    "DFLARE_CONFIG_FILE",
    "DFLARE_LOG_LEVEL",
)


@pytest.fixture(autouse=True)
def clean_env():
    """The CLI exports flags into os.environ (for its workers): keep them out of other tests."""
    saved = {key: os.environ.pop(key) for key in ENV_KEYS if key in os.environ}
    yield
    for key in ENV_KEYS:
        os.environ.pop(key, None)
    os.environ.update(saved)


def test_defaults_serve_the_embedded_demo_on_localhost_8000():
    s = Settings()
    assert (s.host, s.port, s.workers) == ("127.0.0.1", 8000, 1)
    assert s.uses_embedded_engine and s.embedded_model == "dflare-demo"
    assert s.embedded_target_dir is None and s.embedded_drafter == "dflare"


def test_flags_become_settings_for_every_worker(tmp_path, monkeypatch):
    config = tmp_path / "gateway.yaml"
    config.write_text("port: 9100\nmax_in_flight: 7\nbackends: [http://from-file:30000]\n")
    args = cli.build_parser().parse_args(
        [
            "--backend",
            "http://a:30000",
            "--backend",
            "http://b:30000",
            "--port",
            "9000",
            "--config",
            str(config),
        ]
    )
    cli._export_flags(args)
    s = Settings()
    assert s.backends == ["http://a:30000", "http://b:30000"]  # flags beat the config file
    assert s.port == 9000
    assert s.max_in_flight == 7  # the file fills what flags and env leave unset
    assert not s.uses_embedded_engine
    assert json.loads(os.environ["DFLARE_BACKENDS"]) == s.backends


def test_invalid_settings_are_reported(capsys):
    assert cli.main(["--port", "-5", "--workers", "0"]) == 2
    assert "invalid settings" in capsys.readouterr().err


def test_the_gateway_imports_without_torch():
    """The gateway image has no torch: only the embedded backend's start() may import it."""
    import subprocess
    import sys

    code = (
        "import sys, service.app, service.cli, service.backends.embedded, service.backends.sglang_http, "
        "sglang_ext.engine_server.app, sglang_ext.engine_server.serving; "
        "service.app.create_app(); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_several_workers_without_backends_share_one_local_engine_server(tiny_pair, tmp_path):
    import httpx

    from tests.service.conftest import MODEL, embedded_env, gateway

    gw = gateway([], tmp_path / "gateway.log", workers=2, env=embedded_env(tiny_pair))
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["speculative"]["block_size"] == 4
        engine = r.headers["x-dflare-backend"]
        assert engine.startswith("http://127.0.0.1:")
        assert httpx.get(engine + "/health").status_code == 200
    finally:
        gw.stop()
    assert gw.popen.returncode == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(engine + "/health")


def test_busy_port_fails_before_the_engine_loads(tmp_path):
    """Issue 19, defect 9: ``dflare serve`` on a port already taken says so at once, without first
    loading the embedded engine for seconds."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DFLARE_")}
        run = subprocess.run(
            [sys.executable, "-m", "sglang_ext.cli", "serve", "--port", str(port), "--log-level", "info"],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).parents[2],
            timeout=120,
        )
    assert run.returncode == 1
    assert f"127.0.0.1:{port}" in run.stderr and "in use" in run.stderr, run.stderr
    assert "loading the embedded engine" not in run.stderr + run.stdout
