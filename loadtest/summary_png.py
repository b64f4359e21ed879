"""Turn a locust run into one PNG: load over time and the per-request distributions users feel.

    python loadtest/summary_png.py loadtest/results            # -> loadtest/results/summary.png

Reads `run_stats_history.csv` (locust `--csv loadtest/results/run`) and `requests.jsonl`
(`--request-log`). Panels without data (e.g. acceptance length from a server that does not
speculate) say so instead of disappearing.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def load_history(path: Path) -> dict[str, list[float]]:
    """Aggregated rows of locust's stats history: time, users, req/s, failures/s."""
    series: dict[str, list[float]] = {"t": [], "users": [], "rps": [], "fails": []}
    if not path.exists():
        return series
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    if not rows:
        return series
    t0 = float(rows[0]["Timestamp"])
    for row in rows:
        series["t"].append(float(row["Timestamp"]) - t0)
        series["users"].append(float(row["User Count"]))
        series["rps"].append(float(row["Requests/s"]))
        series["fails"].append(float(row["Failures/s"]))
    return series


def load_requests(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _values(records: list[dict], key: str, scale: float = 1.0) -> list[float]:
    return [r[key] * scale for r in records if r.get("ok") and r.get(key) is not None]


def _histogram(ax: plt.Axes, values: list[float], title: str, unit: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(unit)
    if not values:
        ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes)
        return
    ax.hist(values, bins=30, color="#3b7dd8")
    p50, p95 = statistics.median(values), _percentile(values, 0.95)
    ax.axvline(p50, color="black", linestyle="--", label=f"p50 {p50:.3g}")
    ax.axvline(p95, color="red", linestyle=":", label=f"p95 {p95:.3g}")
    ax.legend(fontsize=8)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def render(results: Path, out: Path) -> Path:
    history = load_history(results / "run_stats_history.csv")
    records = load_requests(results / "requests.jsonl")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0][0]
    ax.set_title("Load")
    ax.plot(history["t"], history["rps"], label="requests/s")
    ax.plot(history["t"], history["fails"], label="failures/s", color="red")
    ax.set_xlabel("s")
    twin = ax.twinx()
    twin.plot(history["t"], history["users"], color="gray", linestyle="--", label="users")
    twin.set_ylabel("users")
    ax.legend(loc="upper left", fontsize=8)
    _histogram(axes[0][1], _values(records, "ttft_s", 1000), "Time to first token (streamed)", "ms")
    _histogram(axes[0][2], _values(records, "tpot_s", 1000), "Time per output token (TPOT)", "ms")
    _histogram(axes[1][0], _values(records, "e2e_s", 1000), "End-to-end latency", "ms")
    _histogram(
        axes[1][1],
        _values(records, "output_tokens_per_s"),
        "Output tokens/s per request (tokens / e2e)",
        "tokens/s",
    )
    _histogram(
        axes[1][2], _values(records, "acceptance_length"), "Acceptance length per request", "tokens/step"
    )
    ok = sum(1 for r in records if r["ok"])
    fig.suptitle(f"Load test: {len(records)} chat requests, {len(records) - ok} failed")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="PNG summary of a locust run")
    parser.add_argument("results", type=Path, help="folder with run_stats_history.csv and requests.jsonl")
    parser.add_argument("-o", "--output", type=Path, help="PNG path (default: RESULTS/summary.png)")
    args = parser.parse_args(argv)
    if not (args.results / "requests.jsonl").exists():
        parser.error(f"{args.results}/requests.jsonl not found: run locust with --request-log")
    print(render(args.results, args.output or args.results / "summary.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
