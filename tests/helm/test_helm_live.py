"""The rendered gateway container (command + env) runs `dflare serve` for real, on loopback.

This proves the chart and the program agree on the command, the DFLARE_* names and values, the API
keys file format of the generated Secret, the probe paths and the port:
- CPU profile: the embedded demo engine answers /ready, then the `helm test` pod's own script runs
  against it (models list + one chat completion).
- GPU profile: discovery finds the engine pod exactly as the StatefulSet renders it (labels, port
  annotation) through a loopback Kubernetes API, using only the verbs the Role grants; a stand-in
  SGLang process plays the engine (no GPU here).
Only what cannot apply outside a cluster is changed: the listen address (loopback and a free port
instead of 0.0.0.0:8000), the mounted Secret and emptyDir paths (files under tmp_path holding what the
rendered Secret holds) and, for discovery, a kubeconfig instead of the in-cluster service account.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helm.chart import NAMESPACE, Rendered, container, env_map, render
from tests.routing.fake_k8s import FakeKubernetesAPI
from tests.routing.harness import start_fake

pytestmark = pytest.mark.slow


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


def _wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout_s: float = 150.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dflare serve exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if _get(base + "/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"/ready did not answer 200 within {timeout_s} s: {log.read_text()[-3000:]}")


def _gateway_env(rendered: Rendered, tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
    """Command and environment of the rendered gateway container, made runnable on this machine."""
    deployment = rendered.one("Deployment", "-gateway")
    gw = container(deployment, "gateway")
    env = env_map(gw)
    # Env from Secrets, resolved as the kubelet does (from the Secrets this release renders).
    for item in gw["env"]:
        if "valueFrom" in item:
            env[item["name"]] = _secret_value(rendered, item["valueFrom"]["secretKeyRef"])
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

    env["DFLARE_HOST"], env["DFLARE_PORT"] = "127.0.0.1", str(_free_port())
    command = [str(Path(sys.executable).with_name(gw["command"][0])), *gw["command"][1:], *gw.get("args", [])]
    return command, env, keys_dir / "api-keys"


def _secret_value(rendered: Rendered, ref: dict[str, str]) -> str:
    (secret,) = [s for s in rendered.of_kind("Secret") if s["metadata"]["name"] == ref["name"]]
    return base64.b64decode(secret["data"][ref["key"]]).decode()


@contextlib.contextmanager
def _running(command: list[str], env: dict[str, str], log: Path) -> Iterator[str]:
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("DFLARE_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env={**clean_env, **env}, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{env['DFLARE_PORT']}"
    try:
        _wait_ready(base, proc, log)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def cpu_gateway(tmp_path: Path):
    rendered = render("cpu")
    command, env, keys_file = _gateway_env(rendered, tmp_path)
    if not _demo_pair_present():
        # Stand-in until the demo pair is built into sglang_ext/demo: the gateway tests' tiny pair,
        # same layout and loader. Remove once `dflare demo-path target` resolves in every checkout.
        from tests.service.tiny_models import build_pair

        target, drafter = build_pair(tmp_path / "models")
        env["DFLARE_EMBEDDED_TARGET_DIR"], env["DFLARE_EMBEDDED_DRAFTER_DIR"] = str(target), str(drafter)

    with _running(command, env, tmp_path / "gateway.log") as base:
        yield base, keys_file, rendered


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

    # What the ServiceMonitor scrapes: /metrics on the same port, the chat request counted.
    status, body = _get(base + "/metrics")
    assert status == 200
    samples = [
        sample
        for family in text_string_to_metric_families(body.decode())
        if family.name == "dflare_requests"
        for sample in family.samples
        if sample.name == "dflare_requests_total"
    ]
    assert any(s.labels.get("model") == "dflare-demo" and s.value >= 1 for s in samples), samples


@contextlib.contextmanager
def _kubernetes_api(namespace: str) -> Iterator[tuple[FakeKubernetesAPI, Callable]]:
    """The routing tests' loopback Kubernetes API (pods list + watch), on its own event-loop thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro):  # run a coroutine of the API on its loop, from this (sync) test
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=10)

    api = call(_new_api(namespace))
    call(api.start())
    try:
        yield api, call
    finally:
        call(api.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


async def _new_api(namespace: str) -> FakeKubernetesAPI:
    return FakeKubernetesAPI(namespace=namespace)  # its asyncio.Condition binds to this loop


def _pod_from_template(owner: dict, name: str, port: int) -> dict:
    """A Ready pod as Kubernetes would create it from a rendered pod template, at 127.0.0.1."""
    template = owner["spec"]["template"]
    annotations = dict(template["metadata"].get("annotations", {}))
    if "dflare.ai/port" in annotations:
        annotations["dflare.ai/port"] = str(port)  # the stand-in listens on a free port, not 30000
    spec = copy.deepcopy(template["spec"])
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for group in c.get("resources", {}).values():  # the API server returns quantities as strings
            group.update({k: str(v) for k, v in group.items()})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": f"uid-{name}",
            "labels": template["metadata"]["labels"],
            "annotations": annotations,
        },
        "spec": spec,
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def test_gpu_profile_gateway_discovers_the_rendered_engine_pod(tmp_path: Path) -> None:
    rendered = render("default")
    command, env, keys_file = _gateway_env(rendered, tmp_path)
    # The engine demands the key the rendered StatefulSet passes to SGLang's --api-key.
    statefulset = rendered.one("StatefulSet", "-engine")
    engine_container = container(statefulset, "engine")
    assert (
        engine_container["args"][engine_container["args"].index("--api-key") + 1]
        == "$(DFLARE_ENGINE_API_KEY)"
    )
    (key_env,) = [e for e in engine_container["env"] if e["name"] == "DFLARE_ENGINE_API_KEY"]
    engine_key = _secret_value(rendered, key_env["valueFrom"]["secretKeyRef"])
    engine = start_fake("engine-0", "--model", "dflare-demo", "--api-key", engine_key)
    other = start_fake("other-release", "--model", "other-model")
    try:
        with _kubernetes_api(NAMESPACE) as (api, call):
            call(
                api.put(_pod_from_template(statefulset, "dflare-engine-0", int(engine.url.rsplit(":", 1)[1])))
            )
            # The same engine template from another release must not be picked up (instance label).
            foreign = _pod_from_template(statefulset, "other-engine-0", int(other.url.rsplit(":", 1)[1]))
            foreign["metadata"]["labels"] = {
                **foreign["metadata"]["labels"],
                "app.kubernetes.io/instance": "other",
            }
            call(api.put(foreign))
            # The gateway's own pod carries no engine labels.
            call(api.put(_pod_from_template(rendered.one("Deployment", "-gateway"), "dflare-gateway-x", 1)))
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(api.kubeconfig())
            env["DFLARE_DISCOVERY_KUBECONFIG"] = str(kubeconfig)  # instead of the in-cluster token
            assert env["DFLARE_DISCOVERY_NAMESPACE"] == NAMESPACE
            with _running(command, env, tmp_path / "gateway.log") as base:
                key = keys_file.read_text().split()[0]
                status, body = _get(base + "/v1/models", {"Authorization": f"Bearer {key}"})
                assert status == 200 and b"dflare-demo" in body and b"other-model" not in body
            # Discovery used only what the Role grants: list and watch pods in the release namespace.
            (role,) = rendered.of_kind("Role")
            assert api.requests and all(
                set(q)
                <= {
                    "labelSelector",
                    "watch",
                    "resourceVersion",
                    "timeoutSeconds",
                    "allowWatchBookmarks",
                    "_request_timeout",
                }
                for q in api.requests
            ), api.requests
            verbs = {"watch" if q.get("watch") in ("1", "true", "True") else "list" for q in api.requests}
            assert verbs <= set(role["rules"][0]["verbs"]) and "list" in verbs
            assert {q["labelSelector"] for q in api.requests} == {env["DFLARE_DISCOVERY_LABEL_SELECTOR"]}
    finally:
        engine.kill()
        other.kill()
