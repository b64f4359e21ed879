"""Render the chart through Helm's own Go SDK (PyPI helm-python-sdk) and index the documents.

``render(scenario)`` is ``helm template`` with the chart's values.yaml, the values every install
must give (``INSTALL_VALUES``: an image registry and the credentials, which the chart refuses to
invent) and one scenario file (values-cpu.yaml or helm/ci/*-values.yaml) over them; results are
cached because Helm is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm"
RELEASE = "dflare"
NAMESPACE = "llm"
KUBE_VERSION = "1.33.0"

# Scenario name -> values file ("default" = values.yaml alone).
SCENARIOS: dict[str, Path | None] = {
    "default": None,
    "cpu": CHART / "values-cpu.yaml",
    **{p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))},
}


# What `helm install` needs besides a scenario file: `--set global.imageRegistry=...` and keys.
INSTALL_VALUES: dict[str, Any] = {
    "global": {"imageRegistry": "registry.example.com/dflare-serve"},
    "gateway": {"auth": {"apiKeys": ["sk-test-user-key-0001"], "metricsToken": "scrape-token-0000001"}},
    "engine": {"auth": {"apiKey": "engine-key-000000001"}},
}


def merged(base: dict[str, Any], over: dict[str, Any] | None) -> dict[str, Any]:
    """``over`` deep-merged onto ``base`` (maps merge, anything else replaces), as Helm merges values."""
    out = dict(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Rendered:
    """One scenario's rendered chart: manifests by template path, and the parsed objects."""

    manifests: dict[str, str]
    docs: tuple[dict[str, Any], ...]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, (
            f"expected one {kind} *{name_suffix}, found {[d['metadata']['name'] for d in found]}"
        )
        return found[0]

    def kinds(self) -> set[str]:
        return {d["kind"] for d in self.docs}


def scenario_values(scenario: str) -> dict[str, Any]:
    """The scenario file over ``INSTALL_VALUES``: what a user passes to `helm install`."""
    path = SCENARIOS[scenario]
    return merged(INSTALL_VALUES, None if path is None else yaml.safe_load(path.read_text()))


@cache
def load_chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def render_values(values: dict[str, Any] | None, *, install_values: bool = True) -> Rendered:
    """Render with user values (merged over values.yaml by Helm, as `helm template -f` does), on top
    of ``INSTALL_VALUES`` unless ``install_values`` is False (values.yaml alone)."""
    if install_values:
        values = merged(INSTALL_VALUES, values)
    manifests = load_chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return Rendered(manifests=manifests, docs=tuple(docs), notes=notes)


@cache
def render(scenario: str) -> Rendered:
    return render_values(scenario_values(scenario))


def container(pod_owner: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    """A named container of a Deployment/StatefulSet (or the Pod itself)."""
    spec = pod_owner["spec"]["template"]["spec"] if "template" in pod_owner["spec"] else pod_owner["spec"]
    key = "initContainers" if init else "containers"
    (found,) = [c for c in spec.get(key, []) if c["name"] == name]
    return found


def env_map(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}
