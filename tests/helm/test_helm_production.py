"""The production setup as rendered: engines closed (API key, NetworkPolicy), credentials that do not
change between renders, a revision-keyed model cache with one downloader, autoscaling that fits
GPU engines, rollouts that restart nothing needlessly and drain consistently, explicit capacity,
and installs that fail fast with a message when something only the user can give is missing."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from tests.helm.chart import CHART, container, env_map, load_chart, render, render_values

ENGINE_KEY_REF = {"secretKeyRef": {"name": "dflare-engine-api-key", "key": "engine-api-key"}}


def _arg(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def _fails(values: dict[str, Any] | None, match: str, *, install_values: bool = True) -> None:
    with pytest.raises(helm_python.HelmError, match=match):
        render_values(values, install_values=install_values)


# --- 2. engines closed ------------------------------------------------------------------------------


def test_engines_require_a_key_from_a_secret_and_the_gateway_sends_it() -> None:
    rendered = render("default")
    engine = container(rendered.one("StatefulSet"), "engine")
    # SGLang gets --api-key through the kubelet's $(VAR) expansion: the pod spec holds no key.
    assert _arg(engine["args"], "--api-key") == "$(DFLARE_ENGINE_API_KEY)"
    env = {e["name"]: e for e in engine["env"]}
    assert env["DFLARE_ENGINE_API_KEY"]["valueFrom"] == ENGINE_KEY_REF
    gateway = {e["name"]: e for e in container(rendered.one("Deployment"), "gateway")["env"]}
    assert gateway["DFLARE_BACKEND_API_KEY"]["valueFrom"] == ENGINE_KEY_REF
    secret = rendered.one("Secret", "-engine-api-key")
    assert set(secret["data"]) == {"engine-api-key"}
    # An existing Secret replaces the chart-made one, for both sides.
    existing = render("existing-claim")
    assert not existing.of_kind("Secret")
    ref = {"secretKeyRef": {"name": "my-dflare-engine-key", "key": "engine-api-key"}}
    gw_env = {e["name"]: e for e in container(existing.one("Deployment"), "gateway")["env"]}
    assert gw_env["DFLARE_BACKEND_API_KEY"]["valueFrom"] == ref
    # Switchable: off, no key anywhere.
    off = render_values({"engine": {"auth": {"enabled": False}}})
    assert "--api-key" not in container(off.one("StatefulSet"), "engine")["args"]
    assert "DFLARE_BACKEND_API_KEY" not in env_map(container(off.one("Deployment"), "gateway"))
    assert not [s for s in off.of_kind("Secret") if s["metadata"]["name"].endswith("-engine-api-key")]


def test_engine_key_is_required_when_engine_auth_is_on() -> None:
    _fails({"engine": {"auth": {"apiKey": ""}}}, "engine.auth.enabled needs the engines' API key")
    # The CPU profile has no engine pods: nothing to close.
    render_values({"engine": {"enabled": False, "auth": {"apiKey": ""}}})


def test_network_policy_admits_only_gateway_engines_and_monitoring() -> None:
    rendered = render("default")
    policy = rendered.one("NetworkPolicy")
    engine_labels = rendered.one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    gateway_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= engine_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    serving, peers = policy["spec"]["ingress"]
    assert serving["ports"] == [{"port": 30000, "protocol": "TCP"}]
    gateway_peer, monitoring_peer = serving["from"]
    assert gateway_peer["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert not gateway_peer["podSelector"]["matchLabels"].items() <= engine_labels.items()
    assert monitoring_peer == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    (engine_peer,) = peers["from"]
    assert engine_peer["podSelector"]["matchLabels"].items() <= engine_labels.items()
    # The helm test pod talks to the gateway only, never to an engine.
    test_pod_labels = rendered.one("Pod", "-test-chat")["metadata"].get("labels", {})
    assert not gateway_peer["podSelector"]["matchLabels"].items() <= test_pod_labels.items()
    extra = {"namespaceSelector": {"matchLabels": {"team": "batch"}}}
    more = render_values({"networkPolicy": {"extraFrom": [extra]}}).one("NetworkPolicy")
    assert more["spec"]["ingress"][0]["from"][-1] == extra
    assert not render_values({"networkPolicy": {"enabled": False}}).of_kind("NetworkPolicy")
    assert not render("cpu").of_kind("NetworkPolicy")


# --- 7. credentials ---------------------------------------------------------------------------------


def test_renders_are_identical_no_key_is_generated() -> None:
    """`helm template` twice (a GitOps sync) gives the same Secrets and pod templates."""
    first, second = render_values(None), render_values(None)
    assert first.manifests == second.manifests


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"gateway": {"auth": {"apiKeys": []}}}, "gateway.auth.enabled needs API keys"),
        (
            {"gateway": {"auth": {"metricsRequireAuth": True, "metricsToken": ""}}},
            "metricsRequireAuth needs a metrics scrape token",
        ),
    ],
)
def test_missing_credentials_fail_with_what_to_set(values: dict, match: str) -> None:
    _fails(values, match)


def test_metrics_scrape_token_is_its_own_credential() -> None:
    rendered = render("monitoring")
    env = env_map(container(rendered.one("Deployment"), "gateway"))
    assert env["DFLARE_METRICS_REQUIRE_AUTH"] == "true"
    assert env["DFLARE_METRICS_TOKENS_FILE"] == "/etc/dflare/api-keys/metrics-token"
    assert env["DFLARE_API_KEYS_FILE"] == "/etc/dflare/api-keys/api-keys"
    # Keys are re-read from the mounted Secret: their change does not roll the gateway.
    annotations = rendered.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert not any("api-keys" in k for k in annotations)
    rotated = render_values({"gateway": {"auth": {"apiKeys": ["sk-rotated-user-key-02"]}}})
    assert (
        rotated.one("Deployment")["spec"]["template"]
        == render_values(None).one("Deployment")["spec"]["template"]
    )


# --- 8. images --------------------------------------------------------------------------------------


def test_install_without_a_registry_fails_fast_with_the_build_command() -> None:
    _fails({"global": {"imageRegistry": ""}}, r"global.imageRegistry is not set.*deploy/build-push.sh")
    # values.yaml alone (`helm install dflare ./helm`): the same message, nothing rendered.
    config = helm_python.Config(storage_driver="memory", namespace="llm")
    with pytest.raises(helm_python.HelmError, match=r"global\.imageRegistry is not set"):
        config.install(CHART, "dflare", None, dry_run="client", namespace="llm")
    # A per-image registry is enough for that image.
    per_image = {"global": {"imageRegistry": ""}, "gateway": {"image": {"registry": "r.example.com/x"}}}
    per_image["engine"] = {"enabled": False}
    per_image["tests"] = {"enabled": False}
    image = container(render_values(per_image).one("Deployment"), "gateway")["image"]
    assert image == "r.example.com/x/gateway:0.1.0"


def test_build_push_script_builds_and_pushes_every_image_the_chart_uses(tmp_path: Path) -> None:
    """deploy/build-push.sh with a recording `docker` first on PATH (no Docker daemon here)."""
    log = tmp_path / "docker.log"
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    script = CHART.parent / "deploy" / "build-push.sh"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    proc = subprocess.run([str(script), "registry.example.com/team"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    rendered = render_values({"global": {"imageRegistry": "registry.example.com/team"}})
    cpu = render_values({"global": {"imageRegistry": "registry.example.com/team"}, **_cpu_values()})
    images = {container(rendered.one("Deployment"), "gateway")["image"]}
    images |= {container(rendered.one("StatefulSet"), "engine")["image"]}
    images |= {container(cpu.one("Deployment"), "gateway")["image"]}
    for image in images:
        name = image.rsplit("/", 1)[1].split(":")[0]
        assert image.endswith(f":{app_version}")
        assert any(
            c.startswith("build") and f"-t {image}" in c and f"Dockerfile.{name}" in c for c in calls
        ), calls
        assert f"push {image}" in calls
    # No registry: a usage message, not a push to Docker Hub.
    bare = subprocess.run([str(script)], env=env, capture_output=True, text=True)
    assert bare.returncode != 0 and "REGISTRY" in bare.stderr


def _cpu_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values-cpu.yaml").read_text())


# --- 3. model cache ---------------------------------------------------------------------------------


def _fetch_script(values: dict[str, Any], cache: Path) -> tuple[list[str], dict[str, str]]:
    fetch = container(render_values(values).one("StatefulSet"), "fetch-models", init=True)
    env = {k: v.replace("/models", str(cache)) for k, v in env_map(fetch).items() if v is not None}
    return fetch["command"], env


def _slow_hf(bin_dir: Path, log: Path) -> None:
    """A stand-in `hf` CLI (no network here): logs its arguments, takes a second, writes a file."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "hf"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        "sleep 1\n"
        'while [ $# -gt 0 ]; do if [ "$1" = --local-dir ]; then shift; mkdir -p "$1"; '
        'echo "{}" > "$1/config.json"; fi; shift; done\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


HF_VALUES = {"engine": {"model": {"source": "huggingface", "target": "Qwen/Qwen3-8B", "draft": "org/draft"}}}


def test_cache_is_keyed_by_revision_so_a_new_revision_downloads(tmp_path: Path) -> None:
    cache, log = tmp_path / "models", tmp_path / "calls.log"
    _slow_hf(tmp_path / "bin", log)
    path_env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    runs = [
        HF_VALUES,
        HF_VALUES,
        {"engine": {"model": {**HF_VALUES["engine"]["model"], "targetRevision": "abc123"}}},
    ]
    for values in runs:
        command, env = _fetch_script(values, cache)
        proc = subprocess.run(command, env={**os.environ, **env, **path_env}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls == [
        f"download Qwen/Qwen3-8B --local-dir {cache}/Qwen--Qwen3-8B@main",
        f"download org/draft --local-dir {cache}/org--draft@main",
        f"download Qwen/Qwen3-8B --revision abc123 --local-dir {cache}/Qwen--Qwen3-8B@abc123",
    ]
    engine = container(render_values(runs[2]).one("StatefulSet"), "engine")
    assert _arg(engine["args"], "--model-path") == "/models/Qwen--Qwen3-8B@abc123"


def test_pods_sharing_a_cache_download_once(tmp_path: Path) -> None:
    """Three init containers start together on one (ReadWriteMany) cache: one downloads, two wait."""
    if not shutil.which("flock"):
        pytest.fail("flock (util-linux) missing")
    cache, log = tmp_path / "models", tmp_path / "calls.log"
    _slow_hf(tmp_path / "bin", log)
    command, env = _fetch_script(HF_VALUES, cache)
    full_env = {**os.environ, **env, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    start = time.monotonic()
    procs = [subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert len(log.read_text().splitlines()) == 2  # target and draft, once each
    assert sum(out.count("model cache hit") for out in outputs) == 2 * 2  # the two waiters hit both
    assert time.monotonic() - start >= 2  # the waiters really waited for the downloads


def test_a_lock_file_left_by_a_dead_pod_does_not_block_the_download(tmp_path: Path) -> None:
    """The lock is an flock: a downloader that dies releases it (no stale lock file blocks the next)."""
    cache = tmp_path / "models"
    cache.mkdir()
    (cache / ".dflare-download.lock").write_text("")  # left over by a killed pod
    log = tmp_path / "calls.log"
    _slow_hf(tmp_path / "bin", log)
    command, env = _fetch_script(HF_VALUES, cache)
    proc = subprocess.run(
        command,
        env={**os.environ, **env, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and len(log.read_text().splitlines()) == 2


# --- 4. autoscaling ---------------------------------------------------------------------------------


def test_keda_without_discovery_fails_rendering() -> None:
    keda = {"engine": {"autoscaling": {"enabled": True}}}
    _fails({**keda, "gateway": {"discovery": {"enabled": False}}}, "needs gateway discovery")
    _fails({**keda, "gateway": {"backends": ["http://sglang:30000"]}}, "needs gateway discovery")


@pytest.mark.parametrize(
    "values",
    [
        {"engine": {"autoscaling": {"cooldownPeriod": 600}}},  # no effect with minReplicas >= 1
        {"engine": {"autoscaling": {"minReplicas": 0}}},
        {"engine": {"autoscaling": {"targetUtilization": 1.5}}},
    ],
)
def test_schema_rejects_autoscaling_values_that_cannot_work(values: dict) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        load_chart().validate_schema(values)


# --- 5. rollouts and drain --------------------------------------------------------------------------


def _chart_copy(tmp_path: Path, version: str) -> Path:
    copy = tmp_path / version / "dflare"
    shutil.copytree(CHART, copy)
    meta = yaml.safe_load((copy / "Chart.yaml").read_text())
    meta["version"] = version
    (copy / "Chart.yaml").write_text(yaml.safe_dump(meta))
    return copy


def test_a_chart_version_bump_changes_no_pod_template(tmp_path: Path) -> None:
    from tests.helm.chart import INSTALL_VALUES

    def templates(version: str) -> dict[str, Any]:
        chart = helm_python.Chart.load(_chart_copy(tmp_path, version))
        docs = [
            d
            for path, text in chart.render(
                INSTALL_VALUES, name="dflare", namespace="llm", is_install=True
            ).items()
            if path.endswith(".yaml")
            for d in yaml.safe_load_all(text)
            if d and d.get("kind") in ("Deployment", "StatefulSet")
        ]
        return {d["metadata"]["name"]: d for d in docs}

    old, new = templates("1.0.0"), templates("1.0.1")
    assert old.keys() == {"dflare-gateway", "dflare-engine"}
    for name in old:
        assert (
            old[name]["metadata"]["labels"]["helm.sh/chart"]
            != new[name]["metadata"]["labels"]["helm.sh/chart"]
        )
        assert old[name]["spec"]["template"] == new[name]["spec"]["template"], name
        assert "helm.sh/chart" not in old[name]["spec"]["template"]["metadata"]["labels"]


def test_grace_periods_cover_the_request_timeout_and_the_drain() -> None:
    rendered = render("default")
    gateway = rendered.one("Deployment")["spec"]["template"]["spec"]
    engine = rendered.one("StatefulSet")["spec"]["template"]["spec"]
    env = env_map(container(rendered.one("Deployment"), "gateway"))
    timeout, drain = float(env["DFLARE_REQUEST_TIMEOUT_S"]), float(env["DFLARE_SHUTDOWN_GRACE_S"])
    assert drain >= timeout  # the gateway's drain lets every allowed request finish
    pre_stop = gateway["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop > 0
    assert gateway["terminationGracePeriodSeconds"] >= pre_stop + drain
    engine_pre_stop = int(
        container(rendered.one("StatefulSet"), "engine")["lifecycle"]["preStop"]["exec"]["command"][1]
    )
    assert engine["terminationGracePeriodSeconds"] >= engine_pre_stop + timeout
    # Follows the request timeout.
    short = render_values({"gateway": {"settings": {"request_timeout_s": 120}}})
    assert env_map(container(short.one("Deployment"), "gateway"))["DFLARE_SHUTDOWN_GRACE_S"] == "120"
    assert (
        short.one("StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 10 + 120 + 30
    )


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (
            {"engine": {"terminationGracePeriodSeconds": 120}},
            "engine.terminationGracePeriodSeconds=120 is shorter",
        ),
        (
            {"gateway": {"terminationGracePeriodSeconds": 45}},
            "gateway.terminationGracePeriodSeconds=45 is shorter",
        ),
        (
            {"gateway": {"settings": {"shutdown_grace_s": 900}, "terminationGracePeriodSeconds": 700}},
            "gateway.terminationGracePeriodSeconds=700",
        ),
    ],
)
def test_grace_periods_shorter_than_the_drain_fail(values: dict, match: str) -> None:
    _fails(values, match)


# --- 6. schema for real clusters, explicit capacity ---------------------------------------------------


def test_scheduling_and_volume_values_reach_both_pod_specs() -> None:
    spread = [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
    ]
    volume = {"name": "certs", "configMap": {"name": "ca-bundle"}}
    mount = {"name": "certs", "mountPath": "/etc/ssl/extra", "readOnly": True}
    block = {
        "priorityClassName": "llm-serving",
        "topologySpreadConstraints": spread,
        "extraVolumes": [volume],
        "extraVolumeMounts": [mount],
    }
    values = {"gateway": dict(block), "engine": dict(block)}
    load_chart().validate_schema(values)
    rendered = render_values(values)
    for kind, name in (("Deployment", "gateway"), ("StatefulSet", "engine")):
        owner = rendered.one(kind)
        spec = owner["spec"]["template"]["spec"]
        assert spec["priorityClassName"] == "llm-serving"
        assert spec["topologySpreadConstraints"] == spread
        assert volume in spec["volumes"]
        assert mount in container(owner, name)["volumeMounts"]


def test_gateway_replicas_spread_over_nodes() -> None:
    affinity = render("default").one("Deployment")["spec"]["template"]["spec"]["affinity"]
    (term,) = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    hard = render_values({"gateway": {"podAntiAffinity": "hard"}}).one("Deployment")["spec"]["template"][
        "spec"
    ]
    assert hard["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0][
        "topologyKey"
    ]
    own = {"nodeAffinity": {}}
    assert (
        render_values({"gateway": {"affinity": own}}).one("Deployment")["spec"]["template"]["spec"][
            "affinity"
        ]
        == own
    )
    none = render_values({"gateway": {"podAntiAffinity": ""}}).one("Deployment")["spec"]["template"]["spec"]
    assert "affinity" not in none


def test_capacity_is_explicit_and_graphs_cover_it() -> None:
    args = container(render("default").one("StatefulSet"), "engine")["args"]
    assert _arg(args, "--max-running-requests") == "128"  # not SGLang's silent 48 under speculation
    assert _arg(args, "--cuda-graph-max-bs-decode") == "128"
    custom = render_values({"engine": {"maxRunningRequests": 64, "cudaGraphMaxBatchSize": 32}})
    args = container(custom.one("StatefulSet"), "engine")["args"]
    assert _arg(args, "--max-running-requests") == "64" and _arg(args, "--cuda-graph-max-bs-decode") == "32"
    with pytest.raises(helm_python.HelmValuesError, match="maxRunningRequests"):
        load_chart().validate_schema({"engine": {"maxRunningRequests": 0}})
