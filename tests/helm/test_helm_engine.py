"""The SGLang engine pods as rendered: GPUs, /dev/shm, probes, DFLARE args, model cache, downloads."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.helm.chart import REPO, SCENARIOS, container, env_map, render, render_values

ENGINE_SCENARIOS = [s for s in SCENARIOS if s != "cpu"]


def _engine(scenario: str) -> dict:
    """The engine workload; for a multi-node engine (LeaderWorkerSet) its leader pod template, in the
    StatefulSet's shape, so every pod check below covers both modes."""
    rendered = render(scenario)
    if rendered.of_kind("LeaderWorkerSet"):
        template = rendered.one("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
        return {"spec": {"template": template}}
    return rendered.one("StatefulSet", "-engine")


def _arg(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("scenario", ENGINE_SCENARIOS)
def test_gpu_limit_equals_request_and_is_a_whole_number(scenario: str) -> None:
    resources = container(_engine(scenario), "engine")["resources"]
    limit, request = resources["limits"]["nvidia.com/gpu"], resources["requests"]["nvidia.com/gpu"]
    assert isinstance(limit, int) and limit >= 1
    assert limit == request


def test_gpu_count_and_tensor_parallel_follow_values() -> None:
    engine = _engine("pvc")
    c = container(engine, "engine")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert _arg(c["args"], "--tp-size") == "2"
    values = {"engine": {"gpu": {"count": 4}, "tensorParallelSize": 2, "dataParallelSize": 2}}
    c = container(render_values(values).one("StatefulSet"), "engine")
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 4 and _arg(c["args"], "--tp-size") == "2"
    assert _arg(c["args"], "--dp-size") == "2"


@pytest.mark.parametrize("scenario", ENGINE_SCENARIOS)
def test_dev_shm_is_a_memory_emptydir(scenario: str) -> None:
    engine = _engine(scenario)
    mounts = {m["mountPath"]: m["name"] for m in container(engine, "engine")["volumeMounts"]}
    volumes = {v["name"]: v for v in engine["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["sizeLimit"]


@pytest.mark.parametrize("scenario", ENGINE_SCENARIOS)
def test_probes_on_sglang_health_with_a_long_startup_window(scenario: str) -> None:
    c = container(_engine(scenario), "engine")
    # SGLang 0.5.17's /health runs a one-token generation (waiting up to 20 s) unless
    # SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION is false; /health_generate always generates.
    assert env_map(c)["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] == "false"
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # Liveness: the light check only, so a busy scheduler is never restarted.
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # Readiness: a real generation, with a timeout above SGLang's own 20 s wait.
    assert c["readinessProbe"]["httpGet"] == {"path": "/health_generate", "port": "http"}
    assert c["readinessProbe"]["timeoutSeconds"] > 20
    startup = c["startupProbe"]
    # Weight loading and CUDA graph capture: at least 10 minutes before liveness may kill the pod.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


@pytest.mark.parametrize("scenario", ENGINE_SCENARIOS)
def test_sglang_args_carry_dflare_and_the_draft_model(scenario: str) -> None:
    engine = _engine(scenario)
    c = container(engine, "engine")
    assert c["command"] == ["python3", "-m", "sglang.launch_server"]
    args = c["args"]
    assert _arg(args, "--speculative-algorithm") == "DFLARE"
    draft = _arg(args, "--speculative-draft-model-path")
    target = _arg(args, "--model-path")
    assert draft and target and draft != target
    assert "--enable-metrics" in args
    assert _arg(args, "--warmups") == "dflare"  # warm before the startup probe passes
    assert _arg(args, "--port") == "30000" and _arg(args, "--host") == "0.0.0.0"
    assert c["ports"][0]["containerPort"] == 30000
    # Discovery contract: the component label and the port annotation.
    meta = engine["spec"]["template"]["metadata"]
    assert meta["labels"]["app.kubernetes.io/component"] == "engine"
    assert meta["annotations"]["dflare.ai/port"] == "30000"


def test_default_profile_serves_the_demo_pair_from_the_image() -> None:
    engine = _engine("default")
    args = container(engine, "engine")["args"]
    assert _arg(args, "--model-path") == "/opt/dflare/models/demo-target"
    assert _arg(args, "--speculative-draft-model-path") == "/opt/dflare/models/demo-dflare"
    assert _arg(args, "--speculative-num-draft-tokens") == "8"  # the block that pays at every load
    assert "initContainers" not in engine["spec"]["template"]["spec"]  # nothing to download


def test_published_pair_is_downloaded_into_the_cache_and_served_from_there() -> None:
    engine = _engine("published-pair")
    args = container(engine, "engine")["args"]
    assert _arg(args, "--model-path") == "/models/Qwen--Qwen3-8B@main"
    assert _arg(args, "--speculative-draft-model-path") == "/models/AngelSlim--Qwen3-8b-dflare@main"
    assert _arg(args, "--speculative-num-draft-tokens") == "16"
    assert _arg(args, "--attention-backend") == "fa3"
    assert _arg(args, "--max-running-requests") == _arg(args, "--cuda-graph-max-bs-decode") == "96"
    fetch = container(engine, "fetch-models", init=True)
    env = env_map(fetch)
    assert env["TARGET_REPO"] == "Qwen/Qwen3-8B" and env["DRAFT_REPO"] == "AngelSlim/Qwen3-8b-dflare"
    assert env["TARGET_DIR"] == "/models/Qwen--Qwen3-8B@main"
    # HF token: from an optional Secret, as a file (not an env var).
    volumes = {v["name"]: v for v in engine["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hf-token"]["secret"] == {"secretName": "hf-token", "optional": True, "defaultMode": 0o440}
    assert env["HF_TOKEN_PATH"] == "/etc/dflare/hf-token/token"
    engine_env = env_map(container(engine, "engine"))
    assert engine_env["HF_HUB_OFFLINE"] == "1"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    plugins = project["entry-points"]["sglang.srt.plugins"]
    assert engine_env["SGLANG_PLUGINS"] in plugins  # the name our entry point is registered under
    assert engine["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"


def _cache_volume(scenario: str) -> tuple[dict | None, list]:
    engine = _engine(scenario)
    volumes = {v["name"]: v for v in engine["spec"]["template"]["spec"]["volumes"]}
    return volumes.get("model-cache"), engine["spec"].get("volumeClaimTemplates", [])


def test_model_cache_pvc_is_optional() -> None:
    # Default: an emptyDir, no PVC anywhere, so a first install cannot hang on a Pending claim.
    for scenario in ("default", "published-pair", "keda", "monitoring"):
        volume, claims = _cache_volume(scenario)
        assert "emptyDir" in volume and claims == []
        assert not render(scenario).of_kind("PersistentVolumeClaim")
    # Existing claim: mounted as is, nothing created.
    volume, claims = _cache_volume("existing-claim")
    assert volume["persistentVolumeClaim"] == {"claimName": "shared-models"} and claims == []
    # pvc: one claim per replica from volumeClaimTemplates.
    volume, claims = _cache_volume("pvc")
    assert volume is None
    (claim,) = claims
    assert claim["metadata"]["name"] == "model-cache"
    assert claim["spec"]["resources"]["requests"]["storage"] == "64Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"


def test_existing_claim_type_requires_a_claim_name() -> None:
    import helm_python

    with pytest.raises(helm_python.HelmError, match="existingClaim is required"):
        render_values({"engine": {"modelCache": {"type": "existingClaim"}}})


def test_scheduling_and_graceful_termination() -> None:
    values = {"engine": {"nodeSelector": {"pool": "h100"}, "affinity": {"podAntiAffinity": {}}}}
    spec = render_values(values).one("StatefulSet")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"pool": "h100"}
    assert spec["affinity"] == {"podAntiAffinity": {}}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["terminationGracePeriodSeconds"] >= 60
    engine = container(render("default").one("StatefulSet"), "engine")
    assert engine["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


def test_headless_service_pdb_and_replicas() -> None:
    rendered = render("default")
    service = rendered.one("Service", "-engine")
    assert service["spec"]["clusterIP"] == "None"
    assert rendered.one("StatefulSet")["spec"]["serviceName"] == service["metadata"]["name"]
    pdb = rendered.one("PodDisruptionBudget", "-engine")
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
    assert render("existing-claim").one("StatefulSet")["spec"]["replicas"] == 3


def test_keda_scales_the_engines_on_load_against_their_capacity() -> None:
    rendered = render("keda")
    scaled = rendered.one("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "dflare-engine",
    }
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 6)
    # cooldownPeriod only governs scaling to zero: with minReplicaCount >= 1 the HPA's own scale-down
    # stabilization is what slows scale-down, so that is where the example's 20 minutes go.
    assert "cooldownPeriod" not in scaled["spec"]
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 1200
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]
    assert behavior["scaleUp"]["policies"] == [{"type": "Pods", "value": 2, "periodSeconds": 60}]
    assert scaled["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 6}
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert "sglang:num_running_reqs" in query and "sglang:num_queue_reqs" in query
    # Threshold = the engine's running-request capacity (64 in the example) * targetUtilization (0.75).
    args = container(rendered.one("StatefulSet"), "engine")["args"]
    assert _arg(args, "--max-running-requests") == "64"
    assert trigger["metadata"]["threshold"] == "48"
    default_capacity = render_values({"engine": {"autoscaling": {"enabled": True}}}).one("ScaledObject")
    assert default_capacity["spec"]["triggers"][0]["metadata"]["threshold"] == "102"  # floor(128 * 0.8)
    # KEDA owns the replica count: the StatefulSet must not fight it on upgrade.
    assert "replicas" not in rendered.one("StatefulSet")["spec"]
    assert not render("default").of_kind("ScaledObject")


def _fake_hf(bin_dir: Path, log: Path) -> None:
    """A stand-in `hf` CLI (no network here) that records its arguments and writes a file."""
    script = bin_dir / "hf"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'while [ $# -gt 0 ]; do if [ "$1" = --local-dir ]; then shift; mkdir -p "$1"; '
        'echo "{}" > "$1/config.json"; fi; shift; done\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_fetch_models_init_script_downloads_once(tmp_path: Path) -> None:
    """Runs the rendered init container's shell script: two downloads, then a cache hit on restart."""
    values = {
        "engine": {
            "model": {
                "source": "huggingface",
                "target": "Qwen/Qwen3-8B",
                "draft": "AngelSlim/Qwen3-8b-dflare",
                "draftRevision": "v1",
            }
        }
    }
    fetch = container(render_values(values).one("StatefulSet"), "fetch-models", init=True)
    env = env_map(fetch)
    cache = tmp_path / "models"
    env = {k: v.replace("/models", str(cache)) for k, v in env.items()}
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    _fake_hf(bin_dir, log)
    run_env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    first = subprocess.run(fetch["command"], env=run_env, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    calls = log.read_text().splitlines()
    assert calls == [
        f"download Qwen/Qwen3-8B --local-dir {cache}/Qwen--Qwen3-8B@main",
        f"download AngelSlim/Qwen3-8b-dflare --revision v1 --local-dir {cache}/AngelSlim--Qwen3-8b-dflare@v1",
    ]
    assert (cache / "Qwen--Qwen3-8B@main" / ".dflare-complete").is_file()
    second = subprocess.run(fetch["command"], env=run_env, capture_output=True, text=True, timeout=30)
    assert second.returncode == 0 and "model cache hit" in second.stdout
    assert len(log.read_text().splitlines()) == 2  # no new download


def test_fetch_models_failure_fails_the_init_container(tmp_path: Path) -> None:
    values = {"engine": {"model": {"source": "huggingface", "target": "a/b", "draft": "c/d"}}}
    fetch = container(render_values(values).one("StatefulSet"), "fetch-models", init=True)
    env = {k: v.replace("/models", str(tmp_path)) for k, v in env_map(fetch).items()}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hf").write_text("#!/bin/sh\necho 'Repository Not Found' >&2\nexit 1\n")
    (bin_dir / "hf").chmod(0o755)
    run_env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(fetch["command"], env=run_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert not (tmp_path / "a--b@main" / ".dflare-complete").exists()


def test_keda_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool (Debian prometheus, .ci/apt-packages.txt) parses the rendered query as a rule expression."""
    promtool = shutil.which("promtool") or pytest.fail("promtool missing: apt-get install prometheus")
    query = render("keda").one("ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    rules = tmp_path / "keda.rules.yaml"
    rules.write_text(
        json.dumps({"groups": [{"name": "keda", "rules": [{"record": "keda:query", "expr": query}]}]})
    )
    proc = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules.write_text(rules.read_text().replace("sum(", "sum((", 1))  # the check can fail
    assert subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True).returncode != 0


def test_verify_mode_and_cost_table_reach_the_engine_env() -> None:
    default = env_map(container(_engine("default"), "engine"))
    assert default["DFLARE_VERIFY"] == "static" and "DFLARE_COST_TABLE" not in default
    spec = {"verify": "adaptive", "costTable": "/etc/dflare/costs.json"}
    values = {"engine": {"speculative": spec, "attentionBackend": "fa3"}}
    env = env_map(container(render_values(values).one("StatefulSet"), "engine"))
    assert env["DFLARE_VERIFY"] == "adaptive" and env["DFLARE_COST_TABLE"] == "/etc/dflare/costs.json"
    with pytest.raises(Exception, match="verify"):
        render_values({"engine": {"speculative": {"verify": "fast"}}})


@pytest.mark.parametrize(
    ("engine", "needle"),
    [
        ({"attentionBackend": "triton"}, "needs engine.attentionBackend fa3"),
        ({"attentionBackend": "fa3", "gpu": {"count": 2}, "dataParallelSize": 2}, "dataParallelSize is 2"),
        (
            {"attentionBackend": "fa3", "gpu": {"count": 4}, "tensorParallelSize": 2, "dataParallelSize": 2},
            "dataParallelSize is 2",
        ),
    ],
)
def test_adaptive_verify_fails_rendering_where_the_engine_would_refuse_it(engine: dict, needle: str) -> None:
    values = {"engine": {"speculative": {"verify": "adaptive"}, **engine}}
    with pytest.raises(Exception, match=needle):
        render_values(values)


def test_a_draft_vocabulary_file_reaches_the_dflare_engine_only() -> None:
    """engine.speculative.draftVocab: a file mounted from a ConfigMap, named to the plugin by env; DFLASH
    would ignore it, so the chart refuses the combination."""
    mount = {
        "extraVolumes": [{"name": "draft-vocab", "configMap": {"name": "dflare-draft-vocab"}}],
        "extraVolumeMounts": [{"name": "draft-vocab", "mountPath": "/etc/dflare/draft-vocab"}],
    }
    values = {"engine": {"speculative": {"draftVocab": "/etc/dflare/draft-vocab/draft_vocab.json"}, **mount}}
    engine = render_values(values).one("StatefulSet")
    env = env_map(container(engine, "engine"))
    assert env["DFLARE_DRAFT_VOCAB"] == "/etc/dflare/draft-vocab/draft_vocab.json"
    mounts = {m["name"]: m["mountPath"] for m in container(engine, "engine")["volumeMounts"]}
    assert mounts["draft-vocab"] == "/etc/dflare/draft-vocab"
    assert "DFLARE_DRAFT_VOCAB" not in env_map(container(_engine("default"), "engine"))
    dflash = {"engine": {"speculative": {"algorithm": "DFLASH", "draftVocab": "/etc/v.json"}}}
    with pytest.raises(Exception, match=r"needs engine\.speculative\.algorithm=DFLARE"):
        render_values(dflash)


def test_adaptive_verify_renders_on_a_tensor_parallel_engine() -> None:
    """The plugin runs adaptive verify with --tp-size > 1 (rank 0 plans for the group): the chart lets it."""
    values = {
        "engine": {"speculative": {"verify": "adaptive"}, "attentionBackend": "fa3", "gpu": {"count": 4}}
    }
    engine = container(render_values(values).one("StatefulSet"), "engine")
    assert _arg(engine["args"], "--tp-size") == "4" and "--dp-size" not in engine["args"]
    assert env_map(engine)["DFLARE_VERIFY"] == "adaptive"


def test_the_warmup_can_be_turned_off() -> None:
    engine = container(render_values({"engine": {"warmup": False}}).one("StatefulSet"), "engine")
    assert "--warmups" not in engine["args"]


def test_shorter_draft_blocks_reach_the_engine_only_with_adaptive_verify() -> None:
    speculative = {"verify": "adaptive", "draftBlocks": "8"}
    values = {"engine": {"speculative": speculative, "attentionBackend": "fa3"}}
    engine = container(render_values(values).one("StatefulSet"), "engine")
    assert env_map(engine)["DFLARE_DRAFT_BLOCKS"] == "8"
    default = container(render_values({"engine": {"attentionBackend": "fa3"}}).one("StatefulSet"), "engine")
    assert "DFLARE_DRAFT_BLOCKS" not in env_map(default)
    with pytest.raises(Exception, match=r"needs engine\.speculative\.verify=adaptive"):
        render_values({"engine": {"speculative": {"draftBlocks": "8"}}})
    with pytest.raises(Exception, match="draftBlocks"):  # the schema: block sizes only
        render_values(
            {
                "engine": {
                    "speculative": {"verify": "adaptive", "draftBlocks": "eight"},
                    "attentionBackend": "fa3",
                }
            }
        )
