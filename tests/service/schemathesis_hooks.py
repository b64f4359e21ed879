"""Schemathesis hooks for the CLI run of ``test_schemathesis.py`` (``SCHEMATHESIS_HOOKS``).

Generated model names are random strings, so nearly every completion request would stop at 404
``model_not_found`` and never reach the rest of the gateway. A generated model that is a valid
value (a non-empty string) is replaced by the one the fake backend serves: still valid, so a case
meant to be invalid stays invalid for another reason, and a valid one now reaches the backend.
"""

from __future__ import annotations

import os

import schemathesis

SERVED_MODEL = os.environ.get("DFLARE_TEST_SERVED_MODEL", "fake-model")


@schemathesis.hook
def map_case(context, case):
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"]:
        body["model"] = SERVED_MODEL
    return case
