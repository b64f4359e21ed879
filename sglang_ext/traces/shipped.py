"""The traces shipped as package data, by name (the SGLang plugin's replay picks one per request).

``demo_greedy`` / ``demo_t1``: recorded on the bundled demo pair over held-out prompts at temperature 0 / 1;
``synthetic``: the frozen synthetic model (:mod:`sglang_ext.traces.synthetic`). How each was made:
``docs/benchmarks.md``, "Acceptance traces", and each file's ``meta``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sglang_ext.traces.format import AcceptanceTrace

SHIPPED_TRACES = ("demo_greedy", "demo_t1", "synthetic")


def shipped_trace_path(name: str) -> Path:
    """Path of a shipped trace; ``ValueError`` names the choices for an unknown name."""
    if name not in SHIPPED_TRACES:
        raise ValueError(f"unknown shipped trace {name!r}; expected one of {', '.join(SHIPPED_TRACES)}")
    return Path(str(resources.files("sglang_ext.traces"))) / "data" / f"{name}.json.gz"


def load_shipped_trace(name: str) -> AcceptanceTrace:
    return AcceptanceTrace.load(shipped_trace_path(name))
