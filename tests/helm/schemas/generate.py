"""Write the JSON schemas of the custom resources the chart renders, taken from their published CRDs.

No package registry ships the raw CRD YAMLs, but the cloudcoil model packages are generated from
them (prometheus-operator v0.80.1, KEDA v2.16.1). Their pydantic JSON schemas are written here once
and committed, with one addition: objects reject unknown fields (``additionalProperties: false``),
so a misspelt key fails like it would against the API server's structural schema.

    python tests/helm/schemas/generate.py   # rewrite the committed *.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _models() -> dict[str, Any]:
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as monitoring

    return {
        "ServiceMonitor": monitoring.ServiceMonitor,
        "PodMonitor": monitoring.PodMonitor,
        "PrometheusRule": monitoring.PrometheusRule,
        "ScaledObject": keda.ScaledObject,
    }


def _close_objects(node: Any) -> None:
    """Add additionalProperties: false to every object schema that lists its properties."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close_objects(value)
    elif isinstance(node, list):
        for value in node:
            _close_objects(value)


def build_schemas() -> dict[str, dict[str, Any]]:
    """Kind -> strict JSON schema (draft 2020-12, as pydantic writes it)."""
    schemas = {}
    for kind, model in _models().items():
        schema = model.model_json_schema(by_alias=True)
        _close_objects(schema)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schemas[kind] = schema
    return schemas


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"


def main() -> int:
    for kind, schema in build_schemas().items():
        (HERE / f"{kind}.json").write_text(render(schema))
        print(f"wrote {kind}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
