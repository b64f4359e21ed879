"""Plot ``docs/results/sglang_bench_load.json``: x AR against batch size for every mode and block, one panel
per trace (one closed batch of requests), the same for servers kept full (``STEADY``: each client sends its
next request when its last one answered), the verify / draft cost per step against the AR step, and what
the planners chose (tokens verified per request per step, share of plain decode steps) against batch size.

``python tests/gpu/plot_sglang_load.py [JSON] [PNG]``
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def series(rows: list[dict], trace: str, key: str) -> dict[str, list[tuple[int, float]]]:
    """label -> sorted (batch, value) points of one trace (AR rows of every wave pooled by batch)."""
    points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["trace"] != trace or row.get(key) is None:
            continue
        label = "AR"
        if row["mode"] != "ar":
            label = f"{row['mode']} block {row['block']} {row.get('attention', '')}".strip()
            if row.get("verify_path") == "adaptive_step":
                label += " (adaptive step)"
            if row.get("draft_vocab"):
                label += f" (draft vocab {row['draft_vocab']})"
            if row.get("warmed_up") is False:  # its first requests at each batch size were the measured ones
                label += " (no warm-up)"
        if key.endswith("kept_full") and row.get("kept_full_spread"):  # lengths varied (SPREAD)
            label += f" (lengths +-{round(100 * row['kept_full_spread'])} %)"
        points[label][row["batch"]].append(row[key])
    return {
        label: sorted((bs, sum(v) / len(v)) for bs, v in by_bs.items()) for label, by_bs in points.items()
    }


def ratio_panel(ax, rows: list[dict], trace: str, key: str, marker: str, ar_label: str, title: str) -> None:
    """x AR (``key``) against batch size for every server of ``rows``, with AR's line at 1."""
    for label, pts in series(rows, trace, key).items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
    ax.axhline(1.0, color="black", lw=1, label=ar_label)
    ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel("batch (requests in flight)")
    ax.set_ylabel("x AR tok/s")
    ax.legend(fontsize=8)


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/sglang_bench_load.json")
    dst = Path(sys.argv[2] if len(sys.argv) > 2 else src.with_suffix(".png"))
    data = json.loads(src.read_text())
    rows = data["rows"]
    traces = sorted({r["trace"] for r in rows})
    fig, axes = plt.subplots(4, len(traces), figsize=(6 * len(traces), 16), squeeze=False)
    for col, trace in enumerate(traces):
        servers = [r for r in rows if r["mode"] != "ar"]
        ratio_panel(axes[0][col], servers, trace, "x_ar", "o", "AR", f"{trace} trace: throughput over AR")
        ratio_panel(
            axes[1][col], servers, trace, "x_ar_kept_full", "s", "AR kept full",
            f"{trace} trace: kept full, over AR kept full",
        )  # fmt: skip
        ax = axes[2][col]
        # a server drafting shorter blocks too: its mean draft (draft_ms is its whole-block draft alone)
        spec = [{**r, "draft_ms": r.get("draft_mean_ms") or r["draft_ms"]} for r in rows if r["mode"] != "ar"]
        for key, style in (("verify_ms", "-"), ("draft_ms", ":")):
            for label, pts in series(spec, trace, key).items():
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                ax.plot(xs, ys, style, marker=".", label=f"{label} {key[:-3]}")
        ar = series([r for r in rows if r["mode"] == "ar"], trace, "ar_step_ms").get("AR", [])
        ax.plot([p[0] for p in ar], [p[1] for p in ar], "k-", lw=2, label="AR decode step")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("GPU ms per step")
        ax.legend(fontsize=7)
        ax = axes[3][col]
        planned = [r for r in rows if r["mode"] in ("adaptive", "adaptive_draft", "dspark_planner")]
        for key, style in (("verified_per_req", "-"), ("plain_step_share", ":")):
            for label, pts in series(planned, trace, key).items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{label} {key}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("tokens verified per request per step / plain-step share")
        ax.set_title("what the planners chose")
        ax.legend(fontsize=7)
    fig.suptitle(f"Qwen3-8B shapes, dummy weights, acceptance replayed from traces, {data['device']}")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(dst)


if __name__ == "__main__":
    main()
