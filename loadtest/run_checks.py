"""Per-request log and measurements of a run, and the pass/fail thresholds that set locust's exit code.

The error ratio is judged on locust's HTTP request stats, the TTFT threshold on the run's
`Measurements` (exact values, kept out of locust's stats).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from request_metrics import Measurements

if TYPE_CHECKING:
    from locust.env import Environment

logger = logging.getLogger(__name__)
HTTP_METHODS = {"GET", "POST"}


@dataclass
class RequestRecord:
    """One chat request as the user saw it (None where the call cannot tell: TTFT of a blocking call)."""

    t: float
    name: str
    stream: bool
    ok: bool
    status: int
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    completion_tokens: int | None = None
    output_tokens_per_s: float | None = None
    acceptance_length: float | None = None
    acceptance_rate: float | None = None


class RequestLog:
    """JSON lines, one per request; a no-op without a path."""

    def __init__(self, path: str | None) -> None:
        self._file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "w", buffering=1)  # noqa: SIM115 - lives as long as the run

    def add(self, record: RequestRecord) -> None:
        if self._file is not None:
            self._file.write(json.dumps(asdict(record)) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def recorder(environment: Environment) -> RequestLog:
    """The run's request log, made on first use from `--request-log`."""
    log = getattr(environment, "dflare_request_log", None)
    if log is None:
        log = RequestLog(getattr(environment.parsed_options, "request_log", None))
        environment.dflare_request_log = log
    return log


def measurements(environment: Environment) -> Measurements:
    """The run's TTFT / TPOT / E2E / output tokens/s / acceptance length values, made on first use."""
    found = getattr(environment, "dflare_measurements", None)
    if found is None:
        found = environment.dflare_measurements = Measurements()
    return found


@dataclass(frozen=True)
class Verdict:
    passed: bool
    lines: list[str]


def judge(environment: Environment) -> Verdict:
    """Compare the run's stats with `--max-error-ratio`, `--max-p95-ttft-ms` and `--min-requests`."""
    options = environment.parsed_options
    stats = environment.stats
    http = [
        e for (name, method), e in stats.entries.items() if method in HTTP_METHODS and name != "/v1/models"
    ]
    requests = sum(e.num_requests for e in http)
    failures = sum(e.num_failures for e in http)
    lines = []
    passed = True

    def check(ok: bool, text: str) -> None:
        nonlocal passed
        passed &= ok
        lines.append(f"{'PASS' if ok else 'FAIL'}  {text}")

    check(requests >= options.min_requests, f"requests {requests} >= {options.min_requests}")
    error_ratio = failures / requests if requests else 1.0
    check(
        error_ratio <= options.max_error_ratio,
        f"error ratio {error_ratio:.2%} <= {options.max_error_ratio:.2%}",
    )
    p95 = measurements(environment).percentile("TTFT", "chat stream", 95)
    if p95 is not None:
        check(p95 <= options.max_p95_ttft_ms, f"p95 TTFT {p95:.0f} ms <= {options.max_p95_ttft_ms:.0f} ms")
    else:
        check(False, "p95 TTFT: no streamed request got a first token")
    return Verdict(passed, lines)


def apply_verdict(environment: Environment) -> None:
    """At quit: print and write the measurements, log every check, exit 1 when one failed."""
    recorder(environment).close()
    options = environment.parsed_options
    measured = measurements(environment)
    logger.info("per-request measurements (vLLM bench_serving definitions):\n%s", measured.table())
    csv_prefix = getattr(options, "csv_prefix", None)
    if csv_prefix:
        measured.write_csv(Path(f"{csv_prefix}_measurements.csv"))
    verdict = judge(environment)
    for line in verdict.lines:
        logger.info("threshold %s", line)
    summary = getattr(options, "summary_json", None)
    if summary:
        Path(summary).parent.mkdir(parents=True, exist_ok=True)
        report = {"passed": verdict.passed, "checks": verdict.lines, "measurements": measured.rows()}
        Path(summary).write_text(json.dumps(report, indent=2))
    if not verdict.passed:
        environment.process_exit_code = 1
