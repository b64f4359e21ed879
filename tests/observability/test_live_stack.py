"""The whole kit against live processes: locust -> `dflare serve` -> `dflare engine-server`, scraped by
a real Prometheus server (Debian `prometheus`) that also evaluates our rules.

Two gateways run: one in front of the engine-server (the load test must pass its thresholds there) and
one in front of a backend that answers every chat request with HTTP 500, with room for one request at
a time (the load test must fail there; it also makes the 5xx, retry and rejection series exist).
Then every selector of every panel, variable and rule must have series, and every panel query and
recording rule must return data, with Grafana's template variables substituted as "All".
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from . import procs, promql

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing: apt-get install prometheus"),
]
NAMESPACE = "dflare-test"
LOAD_SECONDS = 15
USERS = 4


@dataclass
class LocustRun:
    returncode: int
    results: Path
    output: str

    def verdict(self) -> dict:
        return json.loads((self.results / "verdict.json").read_text())


@dataclass
class Stack:
    prometheus: str
    passing: LocustRun
    failing: LocustRun
    gateway_instance: str  # the healthy gateway as Prometheus labels its target


def _prometheus_config(path: Path, gateways: list[str], engines: list[str]) -> None:
    """Targets labelled as the chart's ServiceMonitor / PodMonitor label them: namespace and pod."""

    def targets(component: str, addresses: list[str]) -> list[dict]:
        return [
            {"targets": [address], "labels": {"namespace": NAMESPACE, "pod": f"dflare-{component}-{i}"}}
            for i, address in enumerate(addresses)
        ]

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(promql.RULES_FILE)],
        "scrape_configs": [
            {"job_name": "dflare-gateway", "static_configs": targets("gateway", gateways)},
            {"job_name": "dflare-engine", "static_configs": targets("engine", engines)},
        ],
    }
    path.write_text(yaml.safe_dump(config))


def _locust(host: str, results: Path, *extra: str) -> subprocess.Popen:
    argv = [
        str(procs.BIN / "locust"),
        "-f",
        str(promql.REPO / "loadtest/locustfile.py"),
        "--config",
        str(promql.REPO / "loadtest/locust.conf"),
        "--host",
        host,
        "-u",
        str(USERS),
        "-r",
        str(USERS),
        "-t",
        f"{LOAD_SECONDS}s",
        "--max-tokens",
        "16",
        "--csv",
        str(results / "run"),
        "--html",
        str(results / "report.html"),
        "--request-log",
        str(results / "requests.jsonl"),
        "--summary-json",
        str(results / "verdict.json"),
        *extra,
    ]
    results.mkdir(parents=True)
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=promql.REPO
    )


def _query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _series(prometheus: str, selector: str) -> list[dict]:
    params = {"match[]": selector, "start": str(time.time() - 600), "end": str(time.time())}
    with urllib.request.urlopen(
        f"{prometheus}/api/v1/series?" + urllib.parse.urlencode(params), timeout=10
    ) as r:
        return json.load(r)["data"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    tmp = tmp_path_factory.mktemp("live")
    ports = {name: procs.free_port() for name in ("engine", "failing", "gw", "gw_failing", "prom")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    dflare = str(procs.BIN / "dflare")
    # A tiny random target + DFlare drafter on disk, loaded exactly as the demo pair is: fast on 2 cores.
    from tests.service.tiny_models import build_pair

    target_dir, drafter_dir = build_pair(tmp / "models")
    with ExitStack() as stack:
        engine = stack.enter_context(
            procs.running(
                [
                    dflare,
                    "engine-server",
                    "--port",
                    str(ports["engine"]),
                    "--log-level",
                    "warning",
                    "--max-batch",
                    "4",
                    "--model-path",
                    str(target_dir),
                    "--draft-model-path",
                    str(drafter_dir),
                    "--verify-policy",  # so the policy's calibration-error panel has data too
                ],
                tmp / "engine.log",
            )
        )
        failing = stack.enter_context(
            procs.running(
                [
                    sys.executable,
                    str(promql.REPO / "loadtest/fake_backend.py"),
                    "--port",
                    str(ports["failing"]),
                    "--fail",
                ],
                tmp / "failing.log",
            )
        )
        procs.wait_http(url["failing"] + "/health", failing, tmp / "failing.log", 30)
        procs.wait_http(url["engine"] + "/health", engine, tmp / "engine.log", 180)
        gateways = {}
        for name, backend, env in (
            ("gw", url["engine"], {}),
            (
                "gw_failing",
                url["failing"],
                {"DFLARE_MAX_IN_FLIGHT": "1", "DFLARE_RETRY_BACKOFF_BASE_S": "0.2"},
            ),
        ):
            gateways[name] = stack.enter_context(
                procs.running(
                    [
                        dflare,
                        "serve",
                        "--port",
                        str(ports[name]),
                        "--backend",
                        backend,
                        "--log-level",
                        "warning",
                    ],
                    tmp / f"{name}.log",
                    env,
                )
            )
        for name, proc in gateways.items():
            procs.wait_http(url[name] + "/ready", proc, tmp / f"{name}.log", 60)
        _prometheus_config(
            tmp / "prometheus.yml", [url["gw"][7:], url["gw_failing"][7:]], [url["engine"][7:]]
        )
        prom = stack.enter_context(
            procs.running(
                [
                    PROMETHEUS,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{ports['prom']}",
                    "--log.level=warn",
                ],
                tmp / "prom.log",
            )
        )
        procs.wait_http(url["prom"] + "/-/ready", prom, tmp / "prom.log", 30)

        passing = _locust(url["gw"], tmp / "pass", "--max-p95-ttft-ms", "30000")
        failing_run = _locust(url["gw_failing"], tmp / "fail", "--model", "fake-model")
        runs = {}
        for key, proc in (("pass", passing), ("fail", failing_run)):
            out, _ = proc.communicate(timeout=LOAD_SECONDS + 90)
            runs[key] = LocustRun(proc.returncode, tmp / key, out)
        # Scrapes every second, rules every second: wait for the last requests to reach the rules.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _query(
            url["prom"], "dflare:spec_acceptance_length:rate15m"
        ):
            time.sleep(0.5)
        time.sleep(3)
        yield Stack(url["prom"], runs["pass"], runs["fail"], url["gw"].removeprefix("http://"))


def test_locust_passes_its_thresholds_against_dflare_serve(stack: Stack) -> None:
    run = stack.passing
    assert run.returncode == 0, run.output[-3000:]
    verdict = run.verdict()
    assert verdict["passed"] and all(line.startswith("PASS") for line in verdict["checks"])
    assert (run.results / "report.html").stat().st_size > 10_000
    with (run.results / "run_stats.csv").open() as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    # locust's own table holds the HTTP requests only: its Aggregated row is their latency.
    http = {key: row for key, row in rows.items() if key[1] != "Aggregated"}
    assert {kind for kind, _ in http} <= {"GET", "POST"}, sorted(http)
    total = sum(int(row["Request Count"]) for row in http.values())
    assert int(rows[("", "Aggregated")]["Request Count"]) == total
    assert int(rows[("POST", "chat")]["Request Count"]) > 0
    # The per-request measurements have their own table, with vLLM's definitions.
    with (run.results / "run_measurements.csv").open() as f:
        measured = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    for kind in ("TTFT", "TPOT", "E2E", "OUTPUT_TOK/S", "ACCEPT_LEN"):
        assert int(measured[(kind, "chat stream")]["Count"]) > 0, kind
    assert ("TTFT", "chat") not in measured and int(measured[("OUTPUT_TOK/S", "chat")]["Count"]) > 0
    assert {m["Type"] for m in verdict["measurements"]} >= {"TTFT", "TPOT", "OUTPUT_TOK/S"}
    records = [json.loads(line) for line in (run.results / "requests.jsonl").read_text().splitlines()]
    streamed = [r for r in records if r["stream"] and r["ok"]]
    assert streamed and all(r["ttft_s"] <= r["e2e_s"] for r in streamed)
    for r in streamed:  # output tokens / e2e can never exceed tokens / ttft: bursts cannot inflate it
        assert r["output_tokens_per_s"] == pytest.approx(r["completion_tokens"] / r["e2e_s"])
        if r["completion_tokens"] > 1:
            expected = (r["e2e_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1)
            assert r["tpot_s"] == pytest.approx(expected)
    # The demo engine speculates: every finished request reports its acceptance length (>= 1).
    assert all(r["acceptance_length"] is not None and r["acceptance_length"] >= 1 for r in records if r["ok"])


def test_prometheus_counted_every_request_locust_sent(stack: Stack) -> None:
    """The same traffic seen from both ends: locust's POSTs vs the gateway's counter, scraped.

    Locust drops the requests its users had in flight when the run time ended (at most one per user);
    the gateway still counts them.
    """
    with (stack.passing.results / "run_stats.csv").open() as f:
        sent = sum(int(r["Request Count"]) for r in csv.DictReader(f) if r["Type"] == "POST")
    expr = (
        f'sum(dflare_requests_total{{instance="{stack.gateway_instance}", endpoint="/v1/chat/completions"}})'
    )
    counted = _query(stack.prometheus, expr)
    assert sent > 0 and counted
    assert sent <= float(counted[0]["value"][1]) <= sent + USERS


def test_locust_fails_against_a_failing_backend(stack: Stack) -> None:
    run = stack.failing
    assert run.returncode != 0, run.output[-3000:]
    checks = run.verdict()["checks"]
    assert any(line.startswith("FAIL  error ratio") for line in checks), checks


def test_summary_png_of_the_run(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "summary.png"
    result = subprocess.run(
        [
            sys.executable,
            str(promql.REPO / "loadtest/summary_png.py"),
            str(stack.passing.results),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


# kube-state-metrics needs a Kubernetes API server: its series cannot exist here (promtool covers the
# rules that use them, deploy/prometheus/tests/).
KUBE_STATE_METRICS = promql.external_names("kube-state-metrics")


def _needs_kube_state_metrics(selector: str) -> bool:
    return selector.split("{", 1)[0] in KUBE_STATE_METRICS


def _all_queries() -> list[promql.Query]:
    dashboards = promql.load_dashboards()
    return promql.dashboard_queries(dashboards) + promql.variable_queries(dashboards) + promql.rule_queries()


def test_every_selector_has_series(stack: Stack) -> None:
    recorded = promql.recorded_names()
    missing = []
    checked = set()
    for query in _all_queries():
        for selector in promql.selectors(promql.substitute(query.expr)):
            if selector.split("{", 1)[0] in recorded or selector in checked:
                continue  # recorded series are checked with their rule below
            if _needs_kube_state_metrics(selector):
                continue
            checked.add(selector)
            if not _series(stack.prometheus, selector):
                missing.append(f"{query.source}: {selector}")
    assert not missing, "selectors without series:\n" + "\n".join(missing)
    assert len(checked) > 20
    # The check can fail: a misspelt name or a label value nobody exports has no series.
    assert not _series(stack.prometheus, "dflare_request_total")
    assert not _series(stack.prometheus, 'dflare_requests_total{status="999"}')


def test_every_panel_query_and_variable_returns_data(stack: Stack) -> None:
    dashboards = promql.load_dashboards()
    empty = []
    for query in promql.dashboard_queries(dashboards):
        if all(_needs_kube_state_metrics(s) for s in promql.selectors(query.expr)):
            continue
        if not _query(stack.prometheus, promql.substitute(query.expr)):
            empty.append(f"{query.source}: {query.expr}")
    for query in promql.variable_queries(dashboards):
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", promql.substitute(query.expr))
        assert match, query
        params = urllib.parse.urlencode({"match[]": match.group(1)})
        with urllib.request.urlopen(f"{stack.prometheus}/api/v1/label/{match.group(2)}/values?{params}") as r:
            if not json.load(r)["data"]:
                empty.append(f"{query.source}: {query.expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_every_recording_rule_and_alert_input_returns_data(stack: Stack) -> None:
    rules = promql.load_rules()
    by_name = {r["record"]: r["expr"] for r in rules if "record" in r}
    empty = []
    for name, expr in by_name.items():
        # The baseline looks an hour back: a fresh Prometheus has no such past, so drop the offset.
        if not _query(stack.prometheus, re.sub(r"\s+offset\s+\w+", "", expr)):
            empty.append(f"record {name}")
        elif "offset" not in expr and not _query(stack.prometheus, name):
            empty.append(f"record {name} (not recorded by Prometheus)")
    for rule in (r for r in rules if "alert" in r):
        for selector in promql.selectors(rule["expr"]):
            if _needs_kube_state_metrics(selector):
                continue
            name = selector.split("{", 1)[0]
            expr = re.sub(r"\s+offset\s+\w+", "", by_name[name]) if name in by_name else selector
            if not _query(stack.prometheus, expr):
                empty.append(f"alert {rule['alert']}: input {selector}")
    assert not empty, "no data:\n" + "\n".join(empty)
    # Prometheus loaded the rules itself and evaluates them without errors.
    with urllib.request.urlopen(f"{stack.prometheus}/api/v1/rules") as r:
        groups = json.load(r)["data"]["groups"]
    loaded = [rule for g in groups for rule in g["rules"]]
    assert len(loaded) == len(rules)
    assert all(rule["health"] == "ok" for rule in loaded), [r for r in loaded if r["health"] != "ok"]
