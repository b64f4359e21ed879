"""Compare acceptance traces side by side: JSON + PNG.

Per trace (everything from the trace alone, any block size up to the trace's):

- ``tau_by_block``: for block ``b``, the mean over all steps of ``1 + min(accepted, b - 1)``: what a
  static block ``b`` would get, bonus token included (the replay rule of ``accepted_in_window``);
- ``per_position_acceptance``: P(draft ``j`` accepted | drafts ``1..j-1`` accepted), ``j = 1..B-1``;
- ``request_tau``: the spread over requests of each request's own tau at the trace's block size
  (percentiles, mean, sd, histogram);
- ``calibration``: how well the confidence at position ``j`` predicts that conditional acceptance. The
  expected calibration error (ECE) bins the (confidence, accepted?) pairs of the steps that reached
  position ``j`` into equal-width confidence bins and sums ``|mean confidence - accepted fraction|``
  weighted by the bin's share of pairs; ``ece`` pools all positions, ``ece_by_position`` is per position.
  A policy that stops drafting on low confidence works as well as this error is small.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sglang_ext.traces.format import AcceptanceTrace

PERCENTILES = (5, 25, 50, 75, 95)
PLOT_MIN_SUPPORT = 20  # the plot leaves out positions and confidence bins with fewer steps (noise)


def _arrays(trace: AcceptanceTrace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(accepted [steps], confidences [steps, B-1], request index [steps]) over all steps."""
    accepted = np.array([s.accepted for steps in trace.requests for s in steps], dtype=np.int64)
    conf = np.array([s.confidences for steps in trace.requests for s in steps], dtype=np.float64)
    conf = conf.reshape(len(accepted), trace.block_size - 1)
    request = np.repeat(np.arange(len(trace.requests)), [len(steps) for steps in trace.requests])
    return accepted, conf, request


def tau_by_block(trace: AcceptanceTrace) -> dict[int, float]:
    """Block size ``b`` (2..B) -> mean over steps of ``1 + min(accepted, b - 1)``."""
    accepted, _, _ = _arrays(trace)
    if not len(accepted):
        raise ValueError("the trace has no verify steps")
    return {b: float(1 + np.minimum(accepted, b - 1).mean()) for b in range(2, trace.block_size + 1)}


def calibration(
    accepted: np.ndarray, conf: np.ndarray, bins: int = 10
) -> tuple[float, list[float | None], dict[str, list[float]]]:
    """ECE pooled over positions, ECE per position (None where no step reached it) and the pooled
    reliability table (per non-empty bin: mean confidence, accepted fraction, pairs)."""
    reached = accepted[:, None] >= np.arange(conf.shape[1])[None, :]  # all drafts before j accepted
    hit = accepted[:, None] > np.arange(conf.shape[1])[None, :]  # draft j accepted
    edges = np.linspace(0.0, 1.0, bins + 1)

    def ece(c: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, list[float]]]:
        idx = np.clip(np.digitize(c, edges[1:-1]), 0, bins - 1)
        count = np.bincount(idx, minlength=bins)
        mean_conf = np.bincount(idx, c, minlength=bins) / np.maximum(count, 1)
        frac = np.bincount(idx, y.astype(np.float64), minlength=bins) / np.maximum(count, 1)
        error = float((count * np.abs(mean_conf - frac)).sum() / max(1, count.sum()))
        keep = count > 0
        table = {"confidence": mean_conf[keep].tolist(), "accepted": frac[keep].tolist()}
        return error, {**table, "pairs": count[keep].tolist()}

    pooled, table = ece(conf[reached], hit[reached])
    per_position = [
        ece(conf[reached[:, j], j], hit[reached[:, j], j])[0] if reached[:, j].any() else None
        for j in range(conf.shape[1])
    ]
    return pooled, per_position, table


def summarize(trace: AcceptanceTrace, bins: int = 10) -> dict[str, Any]:
    """Every number of the report for one trace (module docstring)."""
    accepted, conf, request = _arrays(trace)
    if not len(accepted):
        raise ValueError("the trace has no verify steps")
    drafts = trace.block_size - 1
    reached = np.array([(accepted >= j).sum() for j in range(drafts)])
    passed = np.array([(accepted > j).sum() for j in range(drafts)])
    steps_per_request = np.bincount(request, minlength=len(trace.requests))
    has_steps = steps_per_request > 0
    req_tau = (
        1
        + np.bincount(request, accepted, minlength=len(trace.requests))[has_steps]
        / (steps_per_request[has_steps])
    )
    counts, edges = np.histogram(req_tau, bins=np.arange(1.0, trace.block_size + 1.0, 0.5))
    ece, ece_by_position, table = calibration(accepted, conf, bins)
    return {
        "source": trace.source,
        "block_size": trace.block_size,
        "temperature": trace.temperature,
        "requests": int(has_steps.sum()),
        "steps": len(accepted),
        "tau_by_block": {str(b): round(t, 4) for b, t in tau_by_block(trace).items()},
        "per_position_acceptance": [
            round(float(p / r), 4) if r else None for p, r in zip(passed, reached, strict=True)
        ],
        "per_position_reached": reached.tolist(),
        "accepted_histogram": np.bincount(accepted, minlength=trace.block_size).tolist(),
        "mean_confidence_by_position": conf.mean(axis=0).round(4).tolist(),
        "request_tau": {
            "block_size": trace.block_size,
            "mean": round(float(req_tau.mean()), 4),
            "sd": round(float(req_tau.std()), 4),
            "percentiles": {str(p): round(float(np.percentile(req_tau, p)), 4) for p in PERCENTILES},
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        },
        "calibration": {
            "bins": bins,
            "ece": round(ece, 4),
            "ece_by_position": [None if e is None else round(e, 4) for e in ece_by_position],
            "reliability": {
                "confidence": [round(v, 4) for v in table["confidence"]],
                "accepted": [round(v, 4) for v in table["accepted"]],
                "pairs": table["pairs"],
            },
        },
        "meta": {k: v for k, v in trace.meta.items() if k != "request_rates"},
    }


def build_report(traces: Mapping[str, AcceptanceTrace], bins: int = 10) -> dict[str, Any]:
    return {"traces": {name: summarize(trace, bins) for name, trace in traces.items()}}


def plot(report: dict[str, Any], path: Path) -> None:
    """Four panels, one colour per trace: tau by block, conditional acceptance by position, per-request tau
    histogram, reliability diagram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    (ax_tau, ax_pos), (ax_req, ax_cal) = axes
    for name, s in report["traces"].items():
        blocks = [int(b) for b in s["tau_by_block"]]
        tau16 = s["tau_by_block"][str(s["block_size"])]
        ax_tau.plot(blocks, list(s["tau_by_block"].values()), marker="o", label=f"{name} (tau {tau16:.2f})")
        reached = enumerate(zip(s["per_position_acceptance"], s["per_position_reached"], strict=True))
        pos = [(j + 1, p) for j, (p, n) in reached if n >= PLOT_MIN_SUPPORT]
        ax_pos.plot(*zip(*pos, strict=True), marker="o", label=name)
        hist = s["request_tau"]["histogram"]
        total = max(1, sum(hist["counts"]))
        ax_req.stairs([c / total for c in hist["counts"]], hist["edges"], label=name, linewidth=2)
        rel = s["calibration"]["reliability"]
        bins = zip(rel["confidence"], rel["accepted"], rel["pairs"], strict=True)
        points = [(c, a) for c, a, n in bins if n >= PLOT_MIN_SUPPORT]
        ax_cal.plot(
            *zip(*points, strict=True),
            marker="o",
            label=f"{name} (ECE {s['calibration']['ece']:.3f})",
        )
    ax_tau.set(xlabel="block size", ylabel="tau (bonus token included)", title="tau by block size")
    ax_pos.set(
        xlabel="draft position j",
        ylabel="P(accept j | 1..j-1 accepted)",
        title=f"per-position acceptance (positions reached >= {PLOT_MIN_SUPPORT} times)",
        ylim=(0, 1.02),
    )
    ax_req.set(
        xlabel="request's tau at the trace's block size",
        ylabel="fraction of requests",
        title="per-request tau",
    )
    ax_cal.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    ax_cal.set(
        xlabel="drafter confidence (top-1 probability)",
        ylabel="accepted fraction (given all before accepted)",
        title=f"calibration (bins of >= {PLOT_MIN_SUPPORT} pairs)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("acceptance traces")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- CLI: dflare trace report --------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "traces", nargs="+", metavar="[NAME=]PATH", help="trace files (default name: file stem)"
    )
    parser.add_argument("--json", type=Path, required=True, help="report JSON to write")
    parser.add_argument("--png", type=Path, default=None, help="plot (default: the JSON path with .png)")
    parser.add_argument("--bins", type=int, default=10, help="confidence bins of the calibration error")


def _named(items: list[str]) -> dict[str, AcceptanceTrace]:
    traces: dict[str, AcceptanceTrace] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name.split(".")[0], item
        if name in traces:
            raise ValueError(f"two traces named {name!r}: name them NAME=PATH")
        traces[name] = AcceptanceTrace.load(path)
    return traces


def main(args: argparse.Namespace) -> int:
    try:
        report = build_report(_named(args.traces), args.bins)
    except (OSError, ValueError) as exc:  # TraceFormatError is a ValueError
        print(f"dflare trace report: {exc}", file=sys.stderr)
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    png = args.png or args.json.with_suffix(".png")
    plot(report, png)
    for name, s in report["traces"].items():
        b, spread = str(s["block_size"]), s["request_tau"]["percentiles"]
        print(
            f"{name}: {s['requests']} requests, {s['steps']} steps, tau at block {b} "
            f"{s['tau_by_block'][b]:.3f}, "
            f"per-request tau p5-p95 {spread['5']:.2f}-{spread['95']:.2f}, ECE {s['calibration']['ece']:.4f}"
        )
    print(f"wrote {args.json} and {png}")
    return 0
