"""Property-based fuzzing of the gateway's OpenAPI schema.

Two runs. In the first, schemathesis generates valid and invalid bodies, headers and paths for
every operation and sends them to a live gateway in front of a live engine-server: no input may
produce a 5xx. Generation lengths are capped at a few tokens (``max_tokens`` is the only field whose
valid values cost seconds each); all else is as drawn. In the second, the ``st`` command line runs
every check it has (``--checks all``: status codes, content types, headers and bodies as the schema
documents them, invalid data rejected, valid data accepted, ``Allow`` on 405, ...) with a fixed seed
and a bounded number of examples, against a gateway in front of the fast fake SGLang backend
(``loadtest/fake_backend.py``), so that every valid request is answered.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.service.conftest import Proc, free_port, gateway

REPO = Path(__file__).resolve().parents[2]
SEED = 1
CLI_EXAMPLES = 25

MAX_TOKENS_CAP = 3
EXAMPLES = 25


@pytest.fixture(scope="module")
def api_schema(gateway_http):
    return schemathesis.openapi.from_url(gateway_http.url + "/openapi.json")


def _cap_generation(body: object) -> None:
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS_CAP:
            body[key] = MAX_TOKENS_CAP
    if "messages" in body or "prompt" in body:
        body.setdefault("max_tokens", MAX_TOKENS_CAP)


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


# Driven through hypothesis directly: schemathesis' pytest plugin does not support pytest 9 yet.
@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_no_server_errors(api_schema, mode):
    operations = _operations(api_schema)
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    for operation in operations:
        if mode is schemathesis.GenerationMode.NEGATIVE and not list(operation.body):
            continue  # nothing to break in a bodiless GET: negative cases would be unsatisfiable

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case) -> None:
            _cap_generation(case.body)
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        check()


@pytest.fixture(scope="module")
def fake_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "fake_backend.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, str(REPO / "loadtest/fake_backend.py"), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    proc = Proc(url, popen, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert popen.poll() is None and time.monotonic() < deadline, proc.output()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield url
    finally:
        proc.stop()


def test_all_schemathesis_checks_pass(fake_backend, tmp_path):
    """``st run --checks all``: the gateway behaves as its OpenAPI document says (issue 19, defect 7)."""
    gw = gateway([fake_backend], tmp_path / "gateway.log")
    try:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "SCHEMATHESIS_HOOKS": "tests.service.schemathesis_hooks",
        }
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                gw.url + "/openapi.json",
                "--checks",
                "all",
                "--seed",
                str(SEED),
                "--max-examples",
                str(CLI_EXAMPLES),
                "--generation-database",
                "none",
                "--request-timeout",
                "30",
                "--no-color",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        gw.stop()
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
