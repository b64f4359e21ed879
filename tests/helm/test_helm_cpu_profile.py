"""The CPU profile for real: the rendered gateway container (command + env) runs `dflare serve` on loopback.

This proves the chart and the program agree on the command, the DFLARE_* names and values, the API
keys file format of the generated Secret, the probe paths and the port. Then the `helm test` pod's
own script runs against it (models list + one chat completion). Only what cannot apply outside a
cluster is changed: the listen address (loopback and a free port instead of 0.0.0.0:8000), and the
mounted Secret and emptyDir paths (files under tmp_path holding what the rendered Secret holds).
"""

from __future__ import annotations

import base64
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helm.chart import container, env_map, render

pytestmark = pytest.mark.slow

if importlib.util.find_spec("service.cli") is None:  # the gateway ships `dflare serve` from service/cli.py
    pytest.skip("service.cli (dflare serve) is not in this tree yet", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_pair_present() -> bool:
    try:
        from sglang_ext.demo import drafter_path, target_path

        return Path(target_path()).is_dir() and Path(drafter_path("dflare")).is_dir()
    except Exception:  # the demo package may not be built in this tree yet
        return False


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _wait_ready(base: str, proc: subprocess.Popen, timeout_s: float = 150.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dflare serve exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            if _get(base + "/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"/ready did not answer 200 within {timeout_s} s")


@pytest.fixture
def cpu_gateway(tmp_path: Path):
    rendered = render("cpu")
    deployment = rendered.one("Deployment", "-gateway")
    gw = container(deployment, "gateway")
    env = env_map(gw)
    # The chart's port wiring is consistent before we move it to a free loopback port.
    assert gw["ports"][0]["containerPort"] == int(env["DFLARE_PORT"])
    assert gw["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert gw["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}

    # Materialise the mounted Secret: same file name under a temp dir, same content as rendered.
    mounts = {m["name"]: m["mountPath"] for m in gw["volumeMounts"]}
    secret = rendered.one("Secret", "-api-keys")
    keys_dir = tmp_path / "api-keys"
    keys_dir.mkdir()
    for key, value in secret["data"].items():
        (keys_dir / key).write_bytes(base64.b64decode(value))
    keys_file = env["DFLARE_API_KEYS_FILE"]
    assert keys_file.startswith(mounts["api-keys"] + "/")
    env["DFLARE_API_KEYS_FILE"] = keys_file.replace(mounts["api-keys"], str(keys_dir))
    env["HOME"] = str(tmp_path)  # the /tmp emptyDir

    port = _free_port()
    env["DFLARE_HOST"], env["DFLARE_PORT"] = "127.0.0.1", str(port)
    if not _demo_pair_present():
        # Stand-in until the demo pair is built into sglang_ext/demo: the gateway tests' tiny pair,
        # same layout and loader. Remove once `dflare demo-path target` resolves in every checkout.
        from tests.service.tiny_models import build_pair

        target, drafter = build_pair(tmp_path / "models")
        env["DFLARE_EMBEDDED_TARGET_DIR"], env["DFLARE_EMBEDDED_DRAFTER_DIR"] = str(target), str(drafter)

    command = [str(Path(sys.executable).with_name(gw["command"][0])), *gw["command"][1:], *gw.get("args", [])]
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("DFLARE_")}
    proc = subprocess.Popen(
        command, env={**clean_env, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc)
        yield base, keys_dir / "api-keys", rendered
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_cpu_profile_gateway_starts_from_the_rendered_deployment(cpu_gateway) -> None:
    base, keys_file, rendered = cpu_gateway
    assert _get(base + "/health")[0] == 200
    # The generated key from the rendered Secret is accepted; no key is refused.
    key = keys_file.read_text().split()[0]
    assert _get(base + "/v1/models")[0] == 401
    status, body = _get(base + "/v1/models", {"Authorization": f"Bearer {key}"})
    assert status == 200 and b"dflare-demo" in body

    # The `helm test` pod's script, with its rendered env, against this gateway.
    pod = rendered.one("Pod", "-test-chat")
    test_container = pod["spec"]["containers"][0]
    test_env = env_map(test_container)
    test_env["GATEWAY_URL"] = base
    test_env["API_KEY_FILE"] = str(keys_file)
    test_env["TIMEOUT_S"] = "120"
    command = [sys.executable, *test_container["command"][1:]]
    assert test_container["command"][0] == "python3"
    proc = subprocess.run(
        command, env={**os.environ, **test_env}, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "models: ['dflare-demo']" in proc.stdout and proc.stdout.rstrip().endswith("OK")
