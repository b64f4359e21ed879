"""Property-based fuzzing of the gateway's OpenAPI schema: no input may produce a 5xx.

Schemathesis generates valid and invalid bodies, headers and paths for every operation and sends
them to a live gateway in front of a live engine-server. Generation lengths are capped at a few
tokens (``max_tokens`` is the only field whose valid values cost seconds each); all else is as drawn.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

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
