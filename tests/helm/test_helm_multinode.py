"""GPUs per engine against SGLang's parallelism, and the multi-node engine as a LeaderWorkerSet.

The LeaderWorkerSet facts below come from kubernetes-sigs/lws (api/leaderworkerset/v1/
leaderworkerset_types.go and the pod webhook that injects the LWS_* variables); the committed
tests/helm/schemas/LeaderWorkerSet.json is written from the same Go types.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import pytest

from tests.helm.chart import KUBE_VERSION, NAMESPACE, container, env_map, render, render_values

SCHEMA = json.loads((Path(__file__).resolve().parent / "schemas" / "LeaderWorkerSet.json").read_text())
# Environment variables the LWS controller adds to every container of a group (leaderworkerset_types.go:
# LwsLeaderAddress, LwsGroupSize, LwsWorkerIndex); the leader's worker index is 0.
LWS_ENV = {"LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"}
# Label the LWS controller puts on every pod of a set (SetNameLabelKey), with the set's name as value.
LWS_SET_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _engine_args(values: dict) -> list[str]:
    return container(render_values({"engine": values}).one("StatefulSet"), "engine")["args"]


@pytest.mark.parametrize(
    ("values", "tp", "dp"),
    [
        ({"gpu": {"count": 1}}, "1", None),
        ({"gpu": {"count": 4}}, "4", None),
        ({"gpu": {"count": 4}, "tensorParallelSize": 4}, "4", None),
        ({"gpu": {"count": 4}, "dataParallelSize": 2}, "2", "2"),
        ({"gpu": {"count": 4}, "tensorParallelSize": 2, "dataParallelSize": 2}, "2", "2"),
        ({"gpu": {"count": 8}, "tensorParallelSize": 1, "dataParallelSize": 8}, "1", "8"),
    ],
    ids=["1gpu", "4gpu-default-tp", "4gpu-tp4", "4gpu-dp2", "4gpu-tp2-dp2", "8gpu-dp8"],
)
def test_parallel_flags_use_exactly_the_pods_gpus(values: dict, tp: str, dp: str | None) -> None:
    args = _engine_args(values)
    assert _arg(args, "--tp-size") == tp
    assert _arg(args, "--dp-size") == dp
    limits = container(render_values({"engine": values}).one("StatefulSet"), "engine")["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == int(tp) * int(dp or 1)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"gpu": {"count": 4}, "tensorParallelSize": 2},
            "engine.gpu.count 4 x 1 node(s) = 4 GPU(s), but tensorParallelSize 2 x dataParallelSize 1 = 2",
        ),
        (
            {"gpu": {"count": 1}, "tensorParallelSize": 2},
            "engine.gpu.count 1 x 1 node(s) = 1 GPU(s), but tensorParallelSize 2 x dataParallelSize 1 = 2",
        ),
        ({"gpu": {"count": 3}, "dataParallelSize": 2}, "engine.dataParallelSize 2 does not divide"),
        (
            {"gpu": {"count": 2}, "tensorParallelSize": 2, "dataParallelSize": 2},
            "= 2 GPU(s), but tensorParallelSize 2 x dataParallelSize 2 = 4",
        ),
        (
            {"gpu": {"count": 8}, "dataParallelSize": 2, "multiNode": {"enabled": True}},
            "SGLang runs data parallelism across nodes only with DP attention",
        ),
        (
            {"gpu": {"count": 4}, "tensorParallelSize": 4, "multiNode": {"enabled": True}},
            "engine.gpu.count 4 x 2 node(s) = 8 GPU(s), but tensorParallelSize 4",
        ),
        (
            {"multiNode": {"enabled": True}, "modelCache": {"type": "pvc"}},
            "engine.modelCache.type=pvc is not supported with engine.multiNode.enabled",
        ),
    ],
    ids=["4gpu-tp2", "1gpu-tp2", "dp-not-dividing", "tp-dp-too-big", "multinode-dp", "multinode-tp", "pvc"],
)
def test_mismatched_parallelism_fails_rendering_with_a_clear_message(values: dict, message: str) -> None:
    with pytest.raises(helm_python.HelmError) as err:
        render_values({"engine": values})
    assert message in str(err.value)


def test_values_schema_rejects_a_one_node_multinode_engine() -> None:
    with pytest.raises(helm_python.HelmError, match="nodes"):
        render_values({"engine": {"multiNode": {"enabled": True, "nodes": 1}}})


def _lws(scenario: str = "multinode") -> dict:
    return render(scenario).one("LeaderWorkerSet")


def _templates(lws: dict) -> tuple[dict, dict]:
    t = lws["spec"]["leaderWorkerTemplate"]
    return t["leaderTemplate"], t["workerTemplate"]


def test_multinode_renders_a_leaderworkerset_instead_of_the_statefulset() -> None:
    rendered = render("multinode")
    assert not rendered.of_kind("StatefulSet")
    lws = _lws()
    spec = lws["spec"]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert spec["replicas"] == 2  # engines (groups) behind the gateway
    assert spec["leaderWorkerTemplate"]["size"] == 2  # pods per engine = nodes
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    # LeaderReady would deadlock: SGLang's leader only turns Ready once the workers have joined.
    assert spec["startupPolicy"] == "LeaderCreated"
    assert not render("default").of_kind("LeaderWorkerSet")


def test_leaderworkerset_matches_the_v1_api_fields() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    assert list(validator.iter_errors(_lws())) == []
    # the schema can fail: a misspelt field, a value outside an enum, a missing worker template
    for mutate, fragment in [
        (lambda s: s["leaderWorkerTemplate"].update(sizee=2), "sizee"),
        (lambda s: s.update(startupPolicy="LeaderStarted"), "LeaderStarted"),
        (lambda s: s["leaderWorkerTemplate"].update(restartPolicy="Always"), "Always"),
        (lambda s: s["leaderWorkerTemplate"].pop("workerTemplate"), "workerTemplate"),
    ]:
        doc = copy.deepcopy(_lws())
        mutate(doc["spec"])
        errors = [e.message for e in validator.iter_errors(doc)]
        assert any(fragment in e for e in errors), errors


def test_leader_and_worker_pod_templates_pass_kubernetes_validate_strict() -> None:
    for template in _templates(_lws()):
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    broken = copy.deepcopy(_templates(_lws())[1])
    broken["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": broken},
            KUBE_VERSION,
            strict=True,
        )


def test_every_node_runs_the_same_sglang_command_with_its_rank_from_lws() -> None:
    leader, worker = (container(t, "engine") for t in _templates(_lws()))
    assert leader["args"] == worker["args"] and leader["command"] == worker["command"]
    args = leader["args"]
    assert _arg(args, "--tp-size") == "8"  # 4 GPUs per pod x 2 nodes
    assert _arg(args, "--nnodes") == "2"
    assert _arg(args, "--node-rank") == "$(LWS_WORKER_INDEX)"
    assert _arg(args, "--dist-init-addr") == "$(LWS_LEADER_ADDRESS):20000"
    assert "--dp-size" not in args
    # Every $(VAR) the kubelet must expand is one the LWS controller injects, or the container's own.
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(args)))
    assert referenced and referenced <= LWS_ENV | set(env_map(leader))
    for t in _templates(_lws()):
        c = container(t, "engine")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 4
        # each node loads its shard from the full checkpoint: every pod fetches the pair
        assert container(t, "fetch-models", init=True)
    # The single-node engine's model flags, unchanged.
    single = container(render("published-pair").one("StatefulSet"), "engine")["args"]
    for flag in ("--model-path", "--speculative-draft-model-path", "--speculative-algorithm", "--port"):
        assert _arg(args, flag) == _arg(single, flag)


def _selector(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(","))


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_gateway_discovers_the_leaders_and_never_the_workers() -> None:
    rendered = render("multinode")
    env = env_map(container(rendered.one("Deployment", "-gateway"), "gateway"))
    selector = _selector(env["DFLARE_DISCOVERY_LABEL_SELECTOR"])
    leader, worker = _templates(_lws())
    assert _matches(selector, leader["metadata"]["labels"])
    assert leader["metadata"]["annotations"]["dflare.ai/port"] == env["DFLARE_DISCOVERY_PORT"]
    assert not _matches(selector, worker["metadata"]["labels"])
    assert worker["metadata"]["labels"]["app.kubernetes.io/component"] == "engine-worker"
    # The engine PDB and PodMonitor select leaders only; the workers have their own budget.
    pdbs = {
        p["metadata"]["name"]: p["spec"]["selector"]["matchLabels"]
        for p in rendered.of_kind("PodDisruptionBudget")
    }
    assert _matches(pdbs["dflare-engine"], leader["metadata"]["labels"])
    assert not _matches(pdbs["dflare-engine"], worker["metadata"]["labels"])
    assert _matches(pdbs["dflare-engine-worker"], worker["metadata"]["labels"])
    assert not _matches(pdbs["dflare-engine-worker"], leader["metadata"]["labels"])


def test_leader_address_resolves_through_the_engine_service_before_readiness() -> None:
    """LWS pods live under the subdomain named after the set (LWS_LEADER_ADDRESS is
    <set>-<group>.<set>.<namespace>), and the controller only creates that headless Service when none
    exists: ours has the same name, must cover every pod of the set and publish not-ready pods."""
    rendered = render("multinode")
    lws = _lws()
    service = rendered.one("Service", "-engine")
    assert service["metadata"]["name"] == lws["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {LWS_SET_NAME_LABEL: lws["metadata"]["name"]}
    assert "publishNotReadyAddresses" not in render("default").one("Service", "-engine")["spec"]


def test_static_backends_are_the_leader_pods() -> None:
    values = {
        "engine": {"replicas": 3, "multiNode": {"enabled": True}},
        "gateway": {"discovery": {"enabled": False}},
    }
    rendered = render_values(values)
    name = rendered.one("LeaderWorkerSet")["metadata"]["name"]
    backends = env_map(container(rendered.one("Deployment", "-gateway"), "gateway"))["DFLARE_BACKENDS"]
    # leader pods are <set>-<group index>, resolvable as <pod>.<set subdomain>.<namespace>.svc
    assert backends.split(",") == [f"http://{name}-{i}.{name}.{NAMESPACE}.svc:30000" for i in range(3)]


def test_keda_scales_the_leaderworkerset_groups() -> None:
    values = {"engine": {"multiNode": {"enabled": True}, "autoscaling": {"enabled": True}}}
    rendered = render_values(values)
    lws = rendered.one("LeaderWorkerSet")
    assert "replicas" not in lws["spec"]  # KEDA owns the group count (the LWS scale subresource)
    ref = rendered.one("ScaledObject")["spec"]["scaleTargetRef"]
    assert ref == {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "name": "dflare-engine",
    }
    # the queue query's pod pattern matches leader pods (<set>-<n>), not workers (<set>-<n>-<m>)
    query = rendered.one("ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    pattern = re.search(r'pod=~"([^"]+)"', query).group(1)
    assert re.fullmatch(pattern, "dflare-engine-0") and not re.fullmatch(pattern, "dflare-engine-0-1")


@pytest.mark.slow
def test_live_gateway_routes_to_the_leader_and_never_to_a_worker(tmp_path: Path) -> None:
    """The rendered gateway discovers a group's pods through a loopback Kubernetes API (as in
    test_helm_live.py): the leader is a backend, the worker is not, even when it advertises a port."""
    from tests.helm.test_helm_live import _gateway_env, _get, _kubernetes_api, _pod_from_template, _running
    from tests.routing.harness import start_fake

    rendered = render("multinode")
    leader_template, worker_template = _templates(rendered.one("LeaderWorkerSet"))
    command, env, keys_file = _gateway_env(rendered, tmp_path)
    leader = start_fake("leader", "--model", "qwen3-8b")
    worker = start_fake("worker", "--model", "worker-must-not-serve")
    try:
        with _kubernetes_api(NAMESPACE) as (api, call):
            port = int(leader.url.rsplit(":", 1)[1])
            call(
                api.put(_pod_from_template({"spec": {"template": leader_template}}, "dflare-engine-0", port))
            )
            worker_pod = _pod_from_template({"spec": {"template": worker_template}}, "dflare-engine-0-1", 1)
            worker_pod["metadata"]["annotations"]["dflare.ai/port"] = worker.url.rsplit(":", 1)[1]
            call(api.put(worker_pod))
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(api.kubeconfig())
            env["DFLARE_DISCOVERY_KUBECONFIG"] = str(kubeconfig)
            with _running(command, env, tmp_path / "gateway.log") as base:
                key = keys_file.read_text().split()[0]
                status, body = _get(base + "/v1/models", {"Authorization": f"Bearer {key}"})
                assert status == 200 and b"qwen3-8b" in body
                assert b"worker-must-not-serve" not in body
    finally:
        leader.kill()
        worker.kill()


def test_notes_describe_the_groups_only_for_a_multinode_engine() -> None:
    notes = render("multinode").notes
    assert "LeaderWorkerSet group of 2 pods" in notes and "--tp-size 8" in notes
    assert "kubectl get leaderworkersets -n llm dflare-engine" in notes
    assert "LeaderWorkerSet" not in render("default").notes


def test_network_policy_lets_workers_reach_their_leader() -> None:
    """The leader serves the rendezvous port and NCCL traffic to its workers: an engine-only peer rule
    would cut a group's own pods off from their leader (workers carry the engine-worker component)."""
    policy = render("multinode").one("NetworkPolicy")
    leader, worker = _templates(_lws())
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= leader["metadata"]["labels"].items()
    peers = [p["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for p in rule["from"]
             if "podSelector" in p and "ports" not in rule]  # fmt: skip
    assert any(peer.items() <= worker["metadata"]["labels"].items() for peer in peers)
    assert any(peer.items() <= leader["metadata"]["labels"].items() for peer in peers)
