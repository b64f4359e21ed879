"""Prometheus rules: `promtool check rules` and `promtool test rules` (Debian `prometheus` package)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from . import promql

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: apt-get install prometheus")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(promql.RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(promql.load_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(promql.RULE_TESTS_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = {r["alert"] for r in promql.load_rules() if "alert" in r}
    assert len(alerts) == 18
    cases = yaml.safe_load(promql.RULE_TESTS_FILE.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert alerts <= firing, f"no firing case: {alerts - firing}"
    assert alerts <= quiet, f"no quiet case: {alerts - quiet}"


def test_every_alert_links_its_runbook_section() -> None:
    """``runbook_url`` points at the alert's own section of docs/observability.md, which exists."""
    doc = promql.OBSERVABILITY_DOC.read_text()
    headings = {line[4:].strip() for line in doc.splitlines() if line.startswith("### ")}
    alerts = [r for r in promql.load_rules() if "alert" in r]
    for rule in alerts:
        url = rule["annotations"].get("runbook_url", "")
        name = rule["alert"]
        assert url.endswith(f"/docs/observability.md#{name.lower()}"), (name, url)
        assert name in headings, f"docs/observability.md has no '### {name}' runbook section"
    runbooks = {h for h in headings if h.startswith("DFlare")}
    assert runbooks == {r["alert"] for r in alerts}, "a runbook section without its alert"


@pytest.mark.parametrize(
    ("original", "mutant"),
    [
        (
            "< 0.8 * dflare:spec_acceptance_length:baseline6h",
            "< 0.4 * dflare:spec_acceptance_length:baseline6h",
        ),
        (
            "> 1.25 * dflare:spec_acceptance_length:baseline6h",
            "> 0.9 * dflare:spec_acceptance_length:baseline6h",
        ),
        ('status!~"5.."', 'status!~"2.."'),
        ("(sglang:token_usage) > 0.95", "(sglang:token_usage) > 0.5"),
        # outage paths
        ("(dflare_backends_known) == 0\n", "(dflare_backend_up) == 0\n"),
        ("(dflare_backends_routable) == 0", "(dflare_backend_up) == 0"),
        ("absent(dflare_backends_known)", "absent(dflare_backend_up)"),
        ("(kube_statefulset_status_replicas_ready{", "(kube_statefulset_status_replicas_available{"),
        ('up{job=~".*dflare.*gateway.*"} == 0', 'up{job=~".*gateway.*"} == 0'),
        ("== 0\n        for: 20m", "== 0\n        for: 5m"),
        # load and engine health
        ('{status="429"}', '{status=~"5.."}'),
        ("deriv(sglang:num_queue_reqs[15m]) > 0", "deriv(sglang:num_queue_reqs[15m]) >= 0"),
        ("min_over_time(sglang:num_queue_reqs[15m]) > 0", "max_over_time(sglang:num_queue_reqs[15m]) > 0"),
        ("(max_over_time(sglang:num_retracted_reqs[5m])) > 0", "(sglang:num_retracted_reqs) > 0"),
        ('-engine-[0-9]+"}[30m]) > 0', '.*"}[30m]) > 0'),
        ("(rate(sglang:spec_verify_calls_total[15m]))", "(rate(sglang:num_requests_total[15m]))"),
    ],
)
def test_unit_tests_catch_a_wrong_threshold(tmp_path: Path, original: str, mutant: str) -> None:
    """The unit tests must be able to fail: a rule file with one threshold changed does not pass them."""
    text = promql.RULES_FILE.read_text()
    assert original in text
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / promql.RULES_FILE.name).write_text(text.replace(original, mutant))
    shutil.copy(promql.RULE_TESTS_FILE, tmp_path / "tests")
    result = _promtool("test", "rules", str(tmp_path / "tests" / promql.RULE_TESTS_FILE.name))
    assert result.returncode != 0, f"mutant {mutant!r} survived"
