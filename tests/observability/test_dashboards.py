"""Static checks of the Grafana dashboards: JSON, uids, data source, rate windows, schema, metric names."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import jsonschema
import pytest
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

from . import promql

SCHEMA = json.loads((promql.REPO / "deploy/grafana/schema/dashboard.schema.json").read_text())
DASHBOARDS = promql.load_dashboards()
EXPECTED = {"dflare-gateway.json", "dflare-speculation.json", "dflare-engine.json"}


def test_the_three_dashboards_exist_as_valid_json() -> None:
    assert set(DASHBOARDS) == EXPECTED
    for path in promql.DASHBOARD_DIR.glob("*.json"):
        json.loads(path.read_text())  # raises on invalid JSON


@pytest.mark.parametrize("file", sorted(EXPECTED))
def test_uid_is_stable_and_panels_are_well_formed(file: str) -> None:
    dash = DASHBOARDS[file]
    # The uid is the file name: links and bookmarks survive re-imports and renames of the title.
    assert dash["uid"] == file.removesuffix(".json")
    assert len(dash["uid"]) <= 40 and re.fullmatch(r"[a-z0-9-]+", dash["uid"])
    assert dash.get("id") is None, "a numeric id pins the dashboard to one Grafana instance"
    ids = [p["id"] for p in promql.iter_panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in promql.iter_panels(dash):
        if panel["type"] == "row":
            continue
        assert panel.get("title") and panel.get("description"), panel
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24


@pytest.mark.parametrize("file", sorted(EXPECTED))
def test_variables_and_datasource_are_not_hard_coded(file: str) -> None:
    dash = DASHBOARDS[file]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "model", "backend"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "model", "backend"):
        var = variables[name]
        assert var["includeAll"] and var["allValue"] == ".*", "'All' must also match series without the label"
        assert var["datasource"]["uid"] == "${datasource}"

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict) and ds.get("type") == "prometheus":
                assert ds.get("uid") == "${datasource}", f"hard-coded data source at {path}"
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(dash, file)


def test_every_query_filters_by_the_variables_and_rates_use_rate_interval() -> None:
    for query in promql.dashboard_queries(DASHBOARDS):
        for fn, window in promql.range_windows(query.expr):
            assert window == "$__rate_interval", f"{query.source}: {fn}(...[{window}])"
        for selector in promql.selectors(query.expr):
            assert 'namespace=~"$namespace"' in selector, f"{query.source}: {selector}"
    # Range functions must be found at all, or the check above proves nothing.
    assert sum(len(promql.range_windows(q.expr)) for q in promql.dashboard_queries(DASHBOARDS)) > 30


def test_speculation_panels_use_vllm_formulas_over_gateway_counters() -> None:
    exprs = [
        t["expr"]
        for p in promql.iter_panels(DASHBOARDS["dflare-speculation.json"])
        for t in p.get("targets", [])
    ]
    accepted, drafts, proposed = (
        "dflare_spec_decode_num_accepted_tokens_total",
        "dflare_spec_decode_num_drafts_total",
        "dflare_spec_decode_num_draft_tokens_total",
    )
    length = [e for e in exprs if e.startswith("1 + ") and accepted in e and drafts in e]
    rate = [e for e in exprs if accepted in e and proposed in e and not e.startswith("1 + ")]
    assert length and rate
    for expr in length:  # 1 + accepted / drafts, never the per-pod SGLang gauge
        assert expr.index(accepted) < expr.index("/") < expr.index(drafts)
    for expr in rate:  # accepted / proposed
        assert expr.index(accepted) < expr.index("/") < expr.index(proposed)


@pytest.mark.parametrize("file", sorted(EXPECTED))
def test_dashboard_passes_the_grafana_json_schema(file: str) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(DASHBOARDS[file])


def test_schema_check_rejects_a_broken_dashboard() -> None:
    broken = copy.deepcopy(DASHBOARDS["dflare-gateway.json"])
    broken["panels"][1]["gridPos"]["w"] = "12"  # wrong type
    broken["templating"]["list"][1]["querry"] = "typo"  # unknown key
    errors = list(jsonschema.Draft7Validator(SCHEMA).iter_errors(broken))
    assert len(errors) >= 2


@pytest.mark.parametrize("file", sorted(EXPECTED))
def test_typed_model_keeps_every_key(file: str) -> None:
    """grafana-foundation-sdk drops keys it does not know: a round trip that loses one is a typo."""
    plugins.register_default_plugins()
    original = DASHBOARDS[file]
    round_trip = json.loads(json.dumps(Dashboard.from_json(copy.deepcopy(original)), cls=JSONEncoder))
    assert not _dropped(original, round_trip, file)


def test_typed_model_round_trip_catches_an_unknown_key() -> None:
    plugins.register_default_plugins()
    broken = copy.deepcopy(DASHBOARDS["dflare-engine.json"])
    broken["panels"][1]["targets"][0]["exprr"] = "typo"
    round_trip = json.loads(json.dumps(Dashboard.from_json(copy.deepcopy(broken)), cls=JSONEncoder))
    assert _dropped(broken, round_trip, "x") == ["x/panels[1]/targets[0]/exprr"]


def _dropped(original: object, round_trip: object, path: str) -> list[str]:
    if isinstance(original, dict) and isinstance(round_trip, dict):
        out = [f"{path}/{k}" for k in original if k not in round_trip]
        for k in original.keys() & round_trip.keys():
            out += _dropped(original[k], round_trip[k], f"{path}/{k}")
        return out
    if isinstance(original, list) and isinstance(round_trip, list):
        return [
            d
            for i, (a, b) in enumerate(zip(original, round_trip, strict=True))
            for d in _dropped(a, b, f"{path}[{i}]")
        ]
    return []


def test_metric_names_exist_in_gateway_contract_and_sglang_list() -> None:
    sglang = promql.sglang_names()
    gateway = promql.gateway_names()
    engine = promql.engine_names()
    external = promql.external_names()
    recorded = promql.recorded_names()
    queries = (
        promql.dashboard_queries(DASHBOARDS) + promql.variable_queries(DASHBOARDS) + promql.rule_queries()
    )
    seen = set()
    for query in queries:
        for name in promql.metric_names(query.expr):
            seen.add(name)
            base = promql.base_name(name)
            if name.startswith("sglang:"):
                assert base in sglang, f"{query.source}: {name} is not an SGLang 0.5.17 metric"
            elif name.startswith("dflare:"):
                assert name in recorded, f"{query.source}: {name} is not a recording rule"
            elif not name.startswith("dflare_"):
                assert name in external, f"{query.source}: {name} is not in external_metrics.txt"
            elif name.startswith("dflare_engine_"):
                assert base in engine, f"{query.source}: {name} is not an engine-server metric"
            else:
                assert base in gateway, f"{query.source}: {name} is not a gateway metric"
    assert {"sglang:token_usage", "dflare_backend_up", "dflare:spec_acceptance_length:rate15m"} <= seen
    assert {"dflare_engine_verify_width_bucket", "dflare_engine_calibration_error"} <= seen
    # the contract table is the engine-server's own: every name in it is exported there
    exported = (promql.REPO / "sglang_ext/engine_server/verify_metrics.py").read_text()
    assert engine == {"dflare_engine_verify_width", "dflare_engine_plain_decode_steps_total",
                      "dflare_engine_calibration_error"}  # fmt: skip
    assert all(f'"{n.removesuffix("_total")}"' in exported for n in engine)


def test_sglang_list_marks_what_engine_server_exports() -> None:
    lines = [ln.split("#", 1)[0].split() for ln in promql.SGLANG_NAMES_FILE.read_text().splitlines()]
    rows = [ln for ln in lines if ln]
    assert all(r[0].startswith("sglang:") and r[1] in {"gauge", "counter", "histogram"} for r in rows)
    exported = {r[0] for r in rows if r[-1] == "engine-server"}
    # The subset the gateway issue asks engine-server to export.
    assert len(exported) == 17
    used = set()
    for query in promql.dashboard_queries(DASHBOARDS) + promql.rule_queries():
        used |= {promql.base_name(n) for n in promql.metric_names(query.expr) if n.startswith("sglang:")}
    assert used <= exported, f"used but not exported by engine-server: {used - exported}"


def _panel(file: str, title: str) -> dict:
    matches = [p for p in promql.iter_panels(DASHBOARDS[file]) if p.get("title") == title]
    assert len(matches) == 1, f"{file}: no single panel {title!r}"
    return matches[0]


def _exprs(file: str) -> list[str]:
    return [t["expr"] for p in promql.iter_panels(DASHBOARDS[file]) for t in p.get("targets", [])]


@pytest.mark.parametrize(
    "histogram",
    [
        "sglang:time_to_first_token_seconds",
        "sglang:inter_token_latency_seconds",
        "sglang:e2e_request_latency_seconds",
        "sglang:queue_time_seconds",
    ],
)
def test_engine_latencies_show_p50_p90_p99(histogram: str) -> None:
    """As vLLM's and SGLang's own dashboards do: the median and the tail, not one p95."""
    quantiles = {
        float(m.group(1))
        for e in _exprs("dflare-engine.json")
        if f"{histogram}_bucket" in e
        for m in [re.match(r"histogram_quantile\(([0-9.]+),", e)]
        if m
    }
    assert quantiles == {0.5, 0.9, 0.99}, (histogram, quantiles)


def test_engine_dashboard_has_queue_abort_retraction_and_available_engines_panels() -> None:
    exprs = "\n".join(_exprs("dflare-engine.json"))
    for name in (
        "sglang:num_aborted_requests_total",
        "sglang:num_retracted_reqs",
        "sglang:queue_time_seconds",
    ):
        assert name in exprs, name
    available = "\n".join(t["expr"] for t in _panel("dflare-engine.json", "Available engines")["targets"])
    assert "dflare_backends_routable" in available
    assert "kube_statefulset_status_replicas_ready" in available and "kube_statefulset_replicas" in available


@pytest.mark.parametrize("file", ["dflare-engine.json", "dflare-speculation.json"])
def test_engine_acceptance_length_from_counters_beside_the_gauges(file: str) -> None:
    """Generated tokens / verify steps: counters, so the ratio of sums is right across pods."""
    tokens, steps = "sglang:generation_tokens_total", "sglang:spec_verify_calls_total"
    ratios = [e for e in _exprs(file) if tokens in e and steps in e]
    assert ratios, f"{file}: no engine-side acceptance length from counters"
    for expr in ratios:
        assert expr.startswith("sum by") and expr.index(tokens) < expr.index(") / ") < expr.index(steps)
    assert any("sglang:spec_accept_" in e for e in _exprs(file)), "the per-pod gauge panel stays beside it"


def test_legends_name_pods_not_scrape_addresses() -> None:
    """Engine series carry the pod name (PodMonitor / ServiceMonitor targets); `instance` is an IP.

    The gateway's `backend` label is a URL (a pod IP under discovery): per-backend legends take the
    pod name from `dflare_backend_info` instead.
    """
    per_backend = set()
    for file, dash in DASHBOARDS.items():
        for panel in promql.iter_panels(dash):
            for target in panel.get("targets", []):
                legend, expr = target.get("legendFormat", ""), target["expr"]
                assert "{{instance}}" not in legend, (file, panel["title"])
                assert "{{backend}}" not in legend, (file, panel["title"])
                if "sglang:" in expr:
                    assert "instance" not in expr, (file, panel["title"], expr)
                if "{{backend_pod}}" in legend:
                    assert INFO_JOIN in expr, (file, panel["title"], expr)
                    per_backend.add((file, panel["title"]))
    assert set(PER_BACKEND_PANELS) <= per_backend
    engine = {v["name"]: v for v in DASHBOARDS["dflare-engine.json"]["templating"]["list"]}
    assert engine["backend"]["query"]["query"].endswith(", pod)")


INFO_JOIN = "* on(backend) group_left(backend_pod) max by (backend, backend_pod) (dflare_backend_info{"
ENGINE_URL, GONE_URL = "http://10.0.0.7:30000", "http://10.0.0.9:30000"
# Two gateway replicas each report every series. ENGINE_URL is a member of both (its info says which
# pod it is); GONE_URL left the pool, so only its counters remain, and `none` is the label of requests
# refused before routing: both keep a line, named by the URL.
_GATEWAY_SERIES = [
    'dflare_requests_total{{{common}, model="m", endpoint="/v1/chat/completions", status="200"}}',
    "dflare_retries_total{{{common}}}",
    'dflare_completion_tokens_total{{{common}, model="m"}}',
    'dflare_spec_decode_num_drafts_total{{{common}, model="m"}}',
    'dflare_spec_decode_num_draft_tokens_total{{{common}, model="m"}}',
    'dflare_spec_decode_num_accepted_tokens_total{{{common}, model="m"}}',
]
PER_BACKEND_PANELS = {
    # (file, title): backends expected on the panel
    ("dflare-gateway.json", "Requests / s by backend and endpoint"): [ENGINE_URL, GONE_URL, "none"],
    ("dflare-gateway.json", "Backend health"): [ENGINE_URL],
    ("dflare-gateway.json", "Retries / s by backend"): [ENGINE_URL, GONE_URL],
    ("dflare-speculation.json", "Mean acceptance length by model and backend"): [ENGINE_URL, GONE_URL],
    ("dflare-speculation.json", "Acceptance rate by model and backend"): [ENGINE_URL, GONE_URL],
    ("dflare-speculation.json", "Completion tokens per verify step by backend"): [ENGINE_URL, GONE_URL],
}


def _per_backend_input() -> list[dict]:
    series = []
    for gateway in ("gw-a", "gw-b"):
        target = f'namespace="llm", pod="{gateway}"'  # Prometheus' target labels: the gateway pod
        for backend in (ENGINE_URL, GONE_URL):
            common = f'{target}, backend="{backend}"'
            series += [{"series": s.format(common=common), "values": "0+60x10"} for s in _GATEWAY_SERIES]
        refused = f'{target}, backend="none", model="none", endpoint="/v1/chat/completions", status="401"'
        series.append({"series": f"dflare_requests_total{{{refused}}}", "values": "0+60x10"})
        member = f'{target}, backend="{ENGINE_URL}"'
        series += [
            {"series": f"dflare_backend_up{{{member}}}", "values": "1x10"},
            {
                "series": f'dflare_backend_info{{{member}, backend_pod="dflare-engine-0", '
                'backend_namespace="llm"}',
                "values": "1x10",
            },
        ]
    return series


def _promtool_test(tests: list[dict], tmp_path) -> subprocess.CompletedProcess:
    """``promtool test rules`` on ``tests`` (no rule files: each case evaluates expressions)."""
    case = tmp_path / "panel.test.yaml"
    case.write_text(json.dumps({"rule_files": [], "evaluation_interval": "1m", "tests": tests}))
    return subprocess.run(
        ["promtool", "test", "rules", str(case)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: apt-get install prometheus")
@pytest.mark.parametrize(("file", "title"), sorted(PER_BACKEND_PANELS))
def test_per_backend_panels_name_each_backend_by_its_pod(file: str, title: str, tmp_path) -> None:
    """promtool evaluates the panel's per-backend query over two gateway replicas' series: one line per
    backend, with the pod's name where the gateway reports one and the URL otherwise (never dropped)."""
    (target,) = [t for t in _panel(file, title)["targets"] if "{{backend_pod}}" in t["legendFormat"]]
    expr = f"count by (backend, backend_pod) ({promql.substitute(target['expr'])})"
    names = {ENGINE_URL: "dflare-engine-0"}
    expected = [
        {"labels": f'{{backend="{b}", backend_pod="{names.get(b, b)}"}}', "value": 1}
        for b in PER_BACKEND_PANELS[(file, title)]
    ]
    test = {
        "interval": "1m",
        "input_series": _per_backend_input(),
        "promql_expr_test": [{"expr": expr, "eval_time": "5m", "exp_samples": expected}],
    }
    result = _promtool_test([test], tmp_path)
    assert result.returncode == 0, f"{title}: {expr}\n{result.stdout}{result.stderr}"


# Backends vanish in two ways: discovery drops every engine pod (the gateway still reports 0 routable,
# but no per-backend series is left), or the gateway itself is gone (no gateway series at all).
_VANISHED = {
    "all engines gone": [
        'dflare_backends_routable{namespace="llm"}',
        'dflare_backends_known{namespace="llm"}',
    ],
    "gateway gone": ['sglang:num_running_reqs{namespace="llm"}'],
}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: apt-get install prometheus")
@pytest.mark.parametrize(
    ("file", "title"),
    [
        ("dflare-gateway.json", "Backend health"),
        ("dflare-gateway.json", "Routable backends"),
        ("dflare-engine.json", "Available engines"),
    ],
)
def test_backend_panels_turn_red_instead_of_blank(file: str, title: str, tmp_path) -> None:
    """The panel's first query, evaluated by promtool, gives 0 on both paths, and 0 is drawn red."""
    panel = _panel(file, title)
    expr = promql.substitute(panel["targets"][0]["expr"])
    tests = [
        {
            "name": name,
            "interval": "1m",
            "input_series": [{"series": series, "values": "0x10"} for series in present],
            "promql_expr_test": [
                {"expr": expr, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 0}]}
            ],
        }
        for name, present in _VANISHED.items()
    ]
    result = _promtool_test(tests, tmp_path)
    assert result.returncode == 0, f"{title}: {expr}\n{result.stdout}{result.stderr}"
    defaults = panel["fieldConfig"]["defaults"]
    steps = defaults["thresholds"]["steps"]
    assert defaults["color"]["mode"] == "thresholds"
    assert steps[0] == {"color": "red", "value": None} and steps[1]["value"] == 1


# Two engine pods of one model: pod a verifies 1 draft a step, 30 steps a minute, and decodes 10 request
# steps a minute plainly; pod b verifies 3 drafts a step, 10 steps a minute, and never decodes plainly.
_ENGINE_SERIES = {
    'dflare_engine_verify_width_bucket{{{pod}, le="1.0"}}': ("0+30x10", "0x10"),
    'dflare_engine_verify_width_bucket{{{pod}, le="2.0"}}': ("0+30x10", "0x10"),
    'dflare_engine_verify_width_bucket{{{pod}, le="3.0"}}': ("0+30x10", "0+10x10"),
    'dflare_engine_verify_width_bucket{{{pod}, le="+Inf"}}': ("0+30x10", "0+10x10"),
    "dflare_engine_verify_width_count{{{pod}}}": ("0+30x10", "0+10x10"),
    "dflare_engine_plain_decode_steps_total{{{pod}}}": ("0+10x10", "0x10"),
    "dflare_engine_calibration_error{{{pod}}}": ("0.1x10", "0.3x10"),
}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: apt-get install prometheus")
def test_verify_width_plain_step_and_calibration_panels(tmp_path) -> None:
    """promtool evaluates the three engine panels of the speculation dashboard over two pods' series."""
    series = []
    for i, pod in enumerate(("a", "b")):
        labels = f'namespace="llm", pod="engine-{pod}", model_name="m", engine_type="unified", tp_rank="0"'
        series += [{"series": s.format(pod=labels), "values": v[i]} for s, v in _ENGINE_SERIES.items()]
    file = "dflare-speculation.json"
    widths = _panel(file, "Verify width chosen (drafts verified per request per step)")
    plain = _panel(file, "Request steps decoded without speculation")
    calibration = _panel(file, "Verify-width policy calibration error (per pod)")
    assert widths["type"] == "heatmap" and widths["targets"][0]["format"] == "heatmap"
    assert plain["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert calibration["targets"][0]["legendFormat"] == "{{pod}}"

    def expr(panel: dict) -> str:
        return promql.substitute(panel["targets"][0]["expr"], rate_interval="2m")

    increase = [  # per bucket over 2 minutes: pod a's 60 steps at width 1, pod b's 20 at width 3
        {"labels": f'{{le="{le}"}}', "value": value}
        for le, value in (("1.0", 60), ("2.0", 60), ("3.0", 80), ("+Inf", 80))
    ]
    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                {"expr": expr(widths), "eval_time": "5m", "exp_samples": increase},
                # 10 plain of 10 + 30 + 10 request steps a minute
                {
                    "expr": expr(plain),
                    "eval_time": "5m",
                    "exp_samples": [{"labels": '{model_name="m"}', "value": 0.2}],
                },
                {
                    "expr": expr(calibration),
                    "eval_time": "5m",
                    "exp_samples": [
                        {"labels": series[6 + 7 * i]["series"], "value": value}
                        for i, value in enumerate((0.1, 0.3))
                    ],
                },
            ],
        }
    ]
    result = _promtool_test(tests, tmp_path)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"
