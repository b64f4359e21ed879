"""Acceptance traces: record them from a real pair, generate the frozen synthetic one, compare them.

``format`` and ``shipped`` (the packaged traces by name) need only the standard library: the SGLang
plugin's replay reads traces with them. ``record`` needs torch and the reference engine, ``synthetic``
numpy and scipy, ``report`` numpy and matplotlib.
"""

from sglang_ext.traces.format import (
    FORMAT,
    AcceptanceTrace,
    TraceFormatError,
    TraceStep,
    accepted_in_window,
)
from sglang_ext.traces.shipped import SHIPPED_TRACES, load_shipped_trace, shipped_trace_path

__all__ = [
    "FORMAT",
    "SHIPPED_TRACES",
    "AcceptanceTrace",
    "TraceFormatError",
    "TraceStep",
    "accepted_in_window",
    "load_shipped_trace",
    "shipped_trace_path",
]
