"""Acceptance traces: record them from a real pair, generate the frozen synthetic one, compare them.

``format`` needs only the standard library (the SGLang plugin's replay reads traces with it); ``record``
needs torch and the reference engine, ``report`` numpy and matplotlib.
"""

from sglang_ext.traces.format import (
    FORMAT,
    AcceptanceTrace,
    TraceFormatError,
    TraceStep,
    accepted_in_window,
)

__all__ = ["FORMAT", "AcceptanceTrace", "TraceFormatError", "TraceStep", "accepted_in_window"]
