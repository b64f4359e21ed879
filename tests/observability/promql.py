"""What the dashboards and rules ask of Prometheus: their queries, selectors and metric names.

Shared by the static checks and the live-Prometheus test. PromQL is taken apart with a few regular
expressions that are enough for the queries we write (selectors, aggregations, offsets), not a parser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "deploy" / "grafana" / "dashboards"
RULES_FILE = REPO / "deploy" / "prometheus" / "rules" / "dflare.rules.yaml"
RULE_TESTS_FILE = REPO / "deploy" / "prometheus" / "tests" / "dflare.rules.test.yaml"
SGLANG_NAMES_FILE = REPO / "deploy" / "sglang_metrics_0.5.17.txt"
EXTERNAL_NAMES_FILE = REPO / "deploy" / "prometheus" / "external_metrics.txt"
OBSERVABILITY_DOC = REPO / "docs" / "observability.md"

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
}
_RANGE = re.compile(r"\b(rate|irate|increase)\s*\(([^\[\]]*)\[([^\]]+)\]")


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from (for error messages)."""

    source: str
    expr: str


def load_dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def iter_panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def dashboard_queries(dashboards: dict[str, dict]) -> list[Query]:
    out = []
    for file, dash in dashboards.items():
        for panel in iter_panels(dash):
            for target in panel.get("targets", []):
                out.append(Query(f"{file}: panel {panel['title']!r} {target['refId']}", target["expr"]))
    return out


def variable_queries(dashboards: dict[str, dict]) -> list[Query]:
    out = []
    for file, dash in dashboards.items():
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                out.append(Query(f"{file}: variable {var['name']}", var["query"]["query"]))
    return out


def load_rules() -> list[dict]:
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def rule_queries() -> list[Query]:
    return [Query(f"rule {r.get('record') or r.get('alert')}", r["expr"]) for r in load_rules()]


def recorded_names() -> set[str]:
    return {r["record"] for r in load_rules() if "record" in r}


def _strip(expr: str) -> str:
    """Drop what is not a metric name: strings, grouping clauses, ranges, offsets, numbers."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\boffset\s+\w+", "", expr)
    return expr


def selectors(expr: str) -> list[str]:
    """Every vector selector in ``expr`` as ``name{matchers}`` (matchers kept as written)."""
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, re.S)
    if label_values:  # Grafana's variable query function: its first argument is a selector
        expr = label_values.group(1)
    matchers: list[str] = []

    def mask(match: re.Match[str]) -> str:  # matchers hold regex characters: set them aside first
        matchers.append(match.group(0))
        return f"\x00{len(matchers) - 1}\x01"

    masked = _strip(re.sub(r'\{(?:[^}"]|"(?:[^"\\]|\\.)*")*\}', mask, expr))
    out = []
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?(?:\x00(\d+)\x01)?(\s*\()?", masked):
        name, index, call = match.groups()
        if not name or call or name.lower() in _KEYWORDS:
            continue
        if match.start() > 0 and masked[match.start() - 1].isdigit():  # exponent of a number
            continue
        out.append(name + (matchers[int(index)] if index is not None else ""))
    return out


def metric_names(expr: str) -> set[str]:
    return {s.split("{", 1)[0] for s in selectors(expr)}


def range_windows(expr: str) -> list[tuple[str, str]]:
    """(function, window) of every rate/irate/increase in ``expr``."""
    return [(m.group(1), m.group(3)) for m in _RANGE.finditer(expr)]


def sglang_names() -> set[str]:
    names = set()
    for line in SGLANG_NAMES_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line.split()[0])
    return names


def external_names(source: str | None = None) -> set[str]:
    """Names from outside the project (Prometheus' ``up``, kube-state-metrics), optionally of one source."""
    names = set()
    for line in EXTERNAL_NAMES_FILE.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields and (source is None or fields[2] == source):
            names.add(fields[0])
    return names


def gateway_names() -> set[str]:
    """Metric names of the gateway's contract table in docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("### Gateway metrics", 1)[1].split("###", 1)[0]
    return set(re.findall(r"`(dflare_[a-z_]+)`", section))


def engine_names() -> set[str]:
    """``dflare_engine_*`` names of engine-server's contract table in docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("### Engine-server metrics", 1)[1].split("###", 1)[0]
    return set(re.findall(r"`(dflare_engine_[a-z_]+)`", section))


def base_name(name: str) -> str:
    """Histogram series name -> the histogram's name."""
    return re.sub(r"_(bucket|sum|count)$", "", name)


def substitute(expr: str, rate_interval: str = "1m") -> str:
    """Grafana's template variables as a dashboard with every variable at "All" sends them."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$namespace", ".*")
        .replace("$model", ".*")
        .replace("$backend", ".*")
    )
