"""The gateway as rendered: env agrees with service/settings.py, least-privilege RBAC, API keys, NOTES."""

from __future__ import annotations

import base64

import pytest

from service.settings import CONFIG_FILE_ENV, Settings
from tests.helm.chart import SCENARIOS, container, env_map, render, render_values

SETTING_ENV_NAMES = {f"DFLARE_{name.upper()}" for name in Settings.model_fields} | {CONFIG_FILE_ENV}


def _gateway(scenario: str) -> dict:
    return render(scenario).one("Deployment", "-gateway")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_dflare_env_var_is_a_gateway_setting(scenario: str) -> None:
    env = env_map(container(_gateway(scenario), "gateway"))
    dflare = {k for k in env if k.startswith("DFLARE_")}
    assert dflare - SETTING_ENV_NAMES == set()
    # ... and pydantic-settings accepts every value the chart renders.
    settings = Settings(**{k.removeprefix("DFLARE_").lower(): v for k, v in env.items() if k in dflare})
    assert settings.port == 8000 and settings.host == "0.0.0.0"


def test_gpu_profile_discovers_this_releases_engines() -> None:
    env = env_map(container(_gateway("default"), "gateway"))
    assert env["DFLARE_DISCOVERY_ENABLED"] == "true"
    assert env["DFLARE_DISCOVERY_NAMESPACE"] == "llm"
    selector = dict(part.split("=") for part in env["DFLARE_DISCOVERY_LABEL_SELECTOR"].split(","))
    engine_labels = render("default").one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert selector["app.kubernetes.io/component"] == "engine"
    assert selector.items() <= engine_labels.items()  # the selector matches the engine pods ...
    gateway_labels = _gateway("default")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= gateway_labels.items()  # ... and not the gateway's
    assert env["DFLARE_DISCOVERY_PORT_ANNOTATION"] == "dflare.ai/port"
    assert "DFLARE_BACKENDS" not in env
    spec = _gateway("default")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is True


def test_without_discovery_the_engines_are_static_dns_backends() -> None:
    env = env_map(container(_gateway("existing-claim"), "gateway"))
    assert "DFLARE_DISCOVERY_ENABLED" not in env
    assert env["DFLARE_BACKENDS"].split(",") == [
        f"http://dflare-engine-{i}.dflare-engine.llm.svc:30000" for i in range(3)
    ]
    assert not render("existing-claim").of_kind("Role")
    assert _gateway("existing-claim")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_role_grants_exactly_get_list_watch_on_pods() -> None:
    rendered = render("default")
    (role,) = rendered.of_kind("Role")
    assert role["metadata"]["namespace"] == "llm"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert not rendered.of_kind("ClusterRole") and not rendered.of_kind("ClusterRoleBinding")
    (binding,) = rendered.of_kind("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    sa = _gateway("default")["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "llm"}]


def test_probes_and_command() -> None:
    c = container(_gateway("default"), "gateway")
    assert c["command"] == ["dflare", "serve"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_api_keys_secret_from_values_mounted_as_a_file() -> None:
    rendered = render("default")
    secret = rendered.one("Secret", "-api-keys")
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == "sk-test-user-key-0001\n"
    c = container(_gateway("default"), "gateway")
    assert env_map(c)["DFLARE_API_KEYS_FILE"] == "/etc/dflare/api-keys/api-keys"
    # Keys given in values are used as they are; an existing Secret replaces the generated one.
    given = render_values({"gateway": {"auth": {"apiKeys": ["sk-aaaaaaaaaaaaaaaa", "sk-bbbbbbbbbbbbbbbb"]}}})
    data = base64.b64decode(given.one("Secret", "-api-keys")["data"]["api-keys"]).decode()
    assert data.split() == ["sk-aaaaaaaaaaaaaaaa", "sk-bbbbbbbbbbbbbbbb"]
    existing = render("existing-claim")
    assert not existing.of_kind("Secret")
    volumes = existing.one("Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "api-keys", "secret": {"secretName": "my-dflare-keys", "defaultMode": 0o440}} in volumes


def test_auth_off_renders_no_secret_and_no_key_file() -> None:
    rendered = render_values({"gateway": {"auth": {"enabled": False}}})
    assert [s["metadata"]["name"] for s in rendered.of_kind("Secret")] == ["dflare-engine-api-key"]
    assert "DFLARE_API_KEYS_FILE" not in env_map(container(rendered.one("Deployment"), "gateway"))


def test_hpa_and_pdb_are_optional() -> None:
    assert not render("default").of_kind("HorizontalPodAutoscaler")
    hpa = render("existing-claim").one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "dflare-gateway"
    assert "replicas" not in render("existing-claim").one("Deployment")["spec"]
    assert render("default").one("PodDisruptionBudget", "-gateway")["spec"]["maxUnavailable"] == 1
    assert not render("cpu").of_kind("PodDisruptionBudget")  # one replica: a PDB would block drains


def test_cpu_profile_has_no_gpu_and_no_engine_objects() -> None:
    rendered = render("cpu")
    assert not rendered.of_kind("StatefulSet") and not rendered.of_kind("Role")
    env = env_map(container(rendered.one("Deployment"), "gateway"))
    assert "DFLARE_BACKENDS" not in env and "DFLARE_DISCOVERY_ENABLED" not in env  # = embedded engine
    assert "nvidia.com/gpu" not in str(rendered.docs)
    assert rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"].endswith(
        "/cpu:0.1.0"
    )


def test_helm_test_pod_is_a_test_hook_against_the_gateway_service() -> None:
    pod = render("default").one("Pod", "-test-chat")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = env_map(pod["spec"]["containers"][0])
    assert env["GATEWAY_URL"] == "http://dflare-gateway.llm.svc:8000"
    assert render("default").one("Service", "-gateway")["spec"]["ports"][0]["port"] == 8000


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_notes_print_next_steps_and_kubectl_checks(scenario: str) -> None:
    notes = render(scenario).notes
    assert "kubectl rollout status -n llm deployment/dflare-gateway" in notes
    if scenario != "existing-claim":  # that one has an Ingress
        assert "kubectl port-forward -n llm svc/dflare-gateway 8000:8000" in notes
    assert "/v1/chat/completions" in notes and "helm test dflare -n llm" in notes
    if scenario == "cpu":
        assert "embedded demo engine" in notes and "engine-0" not in notes
    else:
        assert (
            "kubectl get pods -n llm -l app.kubernetes.io/instance=dflare,app.kubernetes.io/component=engine"
            in notes
        )
        assert "kubectl logs -n llm dflare-engine-0 -c engine -f" in notes
    if scenario in ("published-pair", "pvc", "existing-claim"):
        assert "-c fetch-models" in notes
    if scenario == "monitoring":
        assert "kubectl get servicemonitors,podmonitors,prometheusrules" in notes


def test_static_backends_need_at_least_one_engine() -> None:
    import helm_python

    values = {"engine": {"replicas": 0}, "gateway": {"discovery": {"enabled": False}}}
    with pytest.raises(helm_python.HelmError, match="no backend"):
        render_values(values)
    explicit = {**values, "gateway": {"discovery": {"enabled": False}, "backends": ["http://sglang:30000"]}}
    env = env_map(container(render_values(explicit).one("Deployment"), "gateway"))
    assert env["DFLARE_BACKENDS"] == "http://sglang:30000"


def test_ingress_is_optional_and_routes_to_the_gateway_service() -> None:
    assert not render("default").of_kind("Ingress")
    rendered = render("existing-claim")
    ingress = rendered.one("Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = rendered.one("Service", "-gateway")
    assert backend == {
        "name": service["metadata"]["name"],
        "port": {"name": service["spec"]["ports"][0]["name"]},
    }
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]
    assert "export GATEWAY_URL=https://llm.example.com" in rendered.notes
