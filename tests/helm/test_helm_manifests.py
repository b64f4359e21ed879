"""Every rendered manifest against offline schemas: Kubernetes OpenAPI (kubernetes-validate --strict)
for core kinds, and the committed CRD-derived JSON schemas for ServiceMonitor, PodMonitor,
PrometheusRule and ScaledObject."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.helm.chart import KUBE_VERSION, SCENARIOS, render
from tests.helm.schemas.generate import build_schemas
from tests.helm.schemas.generate import render as render_schema

SCHEMAS = Path(__file__).resolve().parent / "schemas"
CUSTOM_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject")
# No CRD model package exists for it: checked against a schema written from its Go types, and its pod
# templates with kubernetes-validate, by test_helm_multinode.py.
HAND_WRITTEN_KINDS = ("LeaderWorkerSet",)


def _custom_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / f"{kind}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def _errors(kind: str, doc: dict) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _custom_validator(kind).iter_errors(doc)
    ]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_core_manifests_pass_kubernetes_validate_strict(scenario: str) -> None:
    checked = 0
    for doc in render(scenario).docs:
        if doc["kind"] in CUSTOM_KINDS + HAND_WRITTEN_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        checked += 1
    assert checked >= 5


def test_kubernetes_validate_cli_strict_on_written_manifests(tmp_path: Path) -> None:
    """The same check through the tool's command line, as a user would run it on `helm template` output."""
    files = []
    for scenario in ("default", "cpu"):
        for i, doc in enumerate(d for d in render(scenario).docs if d["kind"] not in CUSTOM_KINDS):
            path = tmp_path / f"{scenario}-{i}.yaml"
            path.write_text(yaml.safe_dump(doc))
            files.append(str(path))
    cli = Path(sys.executable).with_name("kubernetes-validate")
    proc = subprocess.run([str(cli), "--strict", "-k", KUBE_VERSION, *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_validate_catches_a_typo() -> None:
    doc = copy.deepcopy(render("default").one("StatefulSet"))
    doc["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_custom_resources_match_their_crd_schemas(scenario: str) -> None:
    for doc in render(scenario).docs:
        if doc["kind"] in CUSTOM_KINDS:
            assert _errors(doc["kind"], doc) == [], doc["metadata"]["name"]


def test_every_custom_kind_is_rendered_by_some_scenario() -> None:
    seen = {d["kind"] for s in SCENARIOS for d in render(s).docs}
    assert set(CUSTOM_KINDS) <= seen


@pytest.mark.parametrize(
    ("kind", "scenario", "mutate", "fragment"),
    [
        ("ServiceMonitor", "monitoring", lambda d: d["spec"]["endpoints"][0].update(interval=30), "interval"),
        (
            "PodMonitor",
            "monitoring",
            lambda d: d["spec"]["podMetricsEndpoints"][0].update(honorLabels="yes"),
            "honorLabels",
        ),
        ("PodMonitor", "monitoring", lambda d: d["spec"].update(podMetricEndpoints=[]), "podMetricEndpoints"),
        ("PrometheusRule", "monitoring", lambda d: d["spec"]["groups"][0]["rules"][0].pop("expr"), "expr"),
        ("ScaledObject", "keda", lambda d: d["spec"].update(minReplicaCount="one"), "minReplicaCount"),
    ],
)
def test_crd_schemas_reject_wrong_types_and_unknown_fields(kind, scenario, mutate, fragment) -> None:
    doc = copy.deepcopy(render(scenario).of_kind(kind)[0])
    mutate(doc)
    errors = _errors(kind, doc)
    assert errors and any(fragment in e for e in errors), errors


@pytest.mark.parametrize("kind", CUSTOM_KINDS)
def test_committed_crd_schemas_match_the_crd_models(kind: str) -> None:
    """tests/helm/schemas/*.json are what generate.py writes from the cloudcoil CRD models."""
    assert (SCHEMAS / f"{kind}.json").read_text() == render_schema(build_schemas()[kind]), (
        "run: python tests/helm/schemas/generate.py"
    )
