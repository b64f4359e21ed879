"""Per-request numbers as vLLM's `bench_serving` defines them, and their summary over a run.

Speculative servers send an answer in a few bursts (one per verify step, several tokens each), so
anything divided by the time between the first and the last chunk explodes: `(tokens - 1) / (e2e -
ttft)` read 158,244 tok/s on the demo pair. vLLM's definitions stay meaningful:

- TTFT: request sent -> first content chunk (streamed requests only)
- TPOT: (e2e - ttft) / (output tokens - 1), the mean time per output token after the first
- E2E: request sent -> last byte
- output tokens/s per request: output tokens / e2e

The summary keeps exact values (locust's own stats round response times and would mix these series
into its "Aggregated" latency row). Pure: no locust import, so it is unit-tested apart from locust.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# kind -> (unit, scale from the stored SI value to the reported unit)
KINDS = {
    "TTFT": ("ms", 1000.0),
    "TPOT": ("ms", 1000.0),
    "E2E": ("ms", 1000.0),
    "OUTPUT_TOK/S": ("tokens/s", 1.0),
    "ACCEPT_LEN": ("tokens/step", 1.0),
}
PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class RequestMetrics:
    """One finished request; seconds and tokens/s (None where the request cannot tell)."""

    e2e_s: float
    output_tokens: int
    ttft_s: float | None = None
    tpot_s: float | None = None
    output_tokens_per_s: float | None = None


def request_metrics(e2e_s: float, output_tokens: int, ttft_s: float | None = None) -> RequestMetrics:
    """vLLM's per-request TPOT and output throughput; TTFT only for streamed requests."""
    tpot = (e2e_s - ttft_s) / (output_tokens - 1) if ttft_s is not None and output_tokens > 1 else None
    throughput = output_tokens / e2e_s if e2e_s > 0 and output_tokens > 0 else None
    return RequestMetrics(e2e_s, output_tokens, ttft_s, tpot, throughput)


class Measurements:
    """Values per (kind, request name), summarized with exact percentiles at the end of a run."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str], list[float]] = defaultdict(list)

    def add_request(self, name: str, m: RequestMetrics, acceptance_length: float | None = None) -> None:
        for kind, value in (
            ("TTFT", m.ttft_s),
            ("TPOT", m.tpot_s),
            ("E2E", m.e2e_s),
            ("OUTPUT_TOK/S", m.output_tokens_per_s),
            ("ACCEPT_LEN", acceptance_length),
        ):
            if value is not None:
                self._values[(kind, name)].append(value * KINDS[kind][1])

    def count(self, kind: str, name: str) -> int:
        return len(self._values.get((kind, name), ()))

    def percentile(self, kind: str, name: str, q: float) -> float | None:
        """Linear interpolation between closest ranks (numpy's default, as bench_serving reports)."""
        values = self._values.get((kind, name))
        if not values:
            return None
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(values)

    def rows(self) -> list[dict[str, object]]:
        out = []
        for (kind, name), values in sorted(self._values.items()):
            row: dict[str, object] = {
                "Type": kind,
                "Name": name,
                "Unit": KINDS[kind][0],
                "Count": len(values),
                "Mean": statistics.fmean(values),
            }
            for q in PERCENTILES:
                row[f"P{q}"] = self.percentile(kind, name, q)
            row["Min"], row["Max"] = min(values), max(values)
            out.append(row)
        return out

    def write_csv(self, path: Path) -> None:
        rows = self.rows()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            fields = ["Type", "Name", "Unit", "Count", "Mean", *(f"P{q}" for q in PERCENTILES), "Min", "Max"]
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def table(self) -> str:
        """A console table like locust's, one line per series."""
        head = f"{'Type':<13}{'Name':<14}{'Unit':<12}{'Count':>7}{'Mean':>10}" + "".join(
            f"{'P' + str(q):>10}" for q in PERCENTILES
        )
        lines = [head, "-" * len(head)]
        for r in self.rows():
            cells = [r["Mean"], *(r[f"P{q}"] for q in PERCENTILES)]
            lines.append(
                f"{r['Type']:<13}{r['Name']:<14}{r['Unit']:<12}{r['Count']:>7}"
                + "".join(f"{v:>10.3g}" for v in cells)
            )
        return "\n".join(lines)
