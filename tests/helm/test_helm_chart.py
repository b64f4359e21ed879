"""Helm itself (Go SDK, helm-python-sdk): strict lint, render of every profile, schema, dry-run install."""

from __future__ import annotations

import json

import helm_python
import pytest
import yaml

from tests.helm.chart import CHART, NAMESPACE, RELEASE, SCENARIOS, load_chart, render, scenario_values


def _lint_problems(values: dict | None) -> list[str]:
    report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    # Severity 1 = info ("icon is recommended"); 2 = warning, 3 = error. Strict lint fails on both.
    return report["errors"] + [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]


def test_chart_is_apiversion_v2_for_helm3_and_helm4() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "dflare" == load_chart().name


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_strict_lint_passes(scenario: str) -> None:
    assert _lint_problems(scenario_values(scenario)) == []


def test_strict_lint_can_fail() -> None:
    """The lint really runs the schema: a bad value is reported, not ignored."""
    problems = _lint_problems({"engine": {"gpu": {"count": 0}}})
    assert problems and any("minimum" in p for p in problems), problems


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_profile_renders_and_validates(scenario: str) -> None:
    load_chart().validate_schema(scenario_values(scenario))
    rendered = render(scenario)
    assert {"Deployment", "Service", "Pod"} <= rendered.kinds()
    assert rendered.notes.strip()


def test_client_dry_run_install_with_default_values() -> None:
    config = helm_python.Config(storage_driver="memory", namespace=NAMESPACE)
    values = scenario_values("default")  # values.yaml alone fails: see test_helm_production.py
    release = config.install(CHART, RELEASE, values, dry_run="client", namespace=NAMESPACE)
    kinds = {d["kind"] for d in yaml.safe_load_all(release["manifest"]) if d}
    assert {"Deployment", "StatefulSet", "Service", "Role", "RoleBinding", "Secret"} <= kinds
    assert "helm test" in release["notes"]


def test_client_dry_run_install_of_cpu_profile() -> None:
    config = helm_python.Config(storage_driver="memory", namespace=NAMESPACE)
    release = config.install(CHART, RELEASE, scenario_values("cpu"), dry_run="client", namespace=NAMESPACE)
    kinds = {d["kind"] for d in yaml.safe_load_all(release["manifest"]) if d}
    assert "StatefulSet" not in kinds and "Deployment" in kinds


# --- values.schema.json: bad values rejected with an error that names the key and the rule -----------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"engine": {"gpu": {"count": 0}}}, ["/engine/gpu/count", "minimum"]),
        ({"engine": {"gpu": {"count": 0.5}}}, ["/engine/gpu/count", "want integer"]),
        ({"engine": {"gpu": {"count": "1"}}}, ["/engine/gpu/count", "want integer"]),
        ({"gateway": {"replicas": "two"}}, ["/gateway/replicas", "want integer"]),
        ({"enginee": {"replicas": 2}}, ["additional properties 'enginee' not allowed"]),
        ({"engine": {"modelCache": {"type": "hostPath"}}}, ["/engine/modelCache/type"]),
        ({"engine": {"model": {"source": "s3"}}}, ["/engine/model/source"]),
        ({"engine": {"speculative": {"algorithm": "EAGLE"}}}, ["/engine/speculative/algorithm"]),
        ({"engine": {"memFractionStatic": 1.5}}, ["/engine/memFractionStatic"]),
        ({"gateway": {"settings": {"Routing-Policy": "x"}}}, ["/gateway/settings"]),
        ({"gateway": {"backends": ["engine:30000"]}}, ["/gateway/backends/0"]),
    ],
)
def test_schema_rejects_bad_values_readably(values: dict, expected: list[str]) -> None:
    with pytest.raises(helm_python.HelmValuesError) as err:
        load_chart().validate_schema(values)
    message = str(err.value)
    for fragment in expected:
        assert fragment in message, message


def test_schema_is_draft07_and_closed_at_the_top_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    # Every top-level key of values.yaml is described by the schema, and nothing else is.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])
