"""Plot ``docs/results/sglang_bench_sim.json``: speedup over AR beside the bound
tau*t_AR/(t_verify+t_draft), and the per-step GPU phase times, per batch size.

``python tests/gpu/plot_sglang_bench.py [JSON] [PNG]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/sglang_bench_sim.json")
    dst = Path(sys.argv[2] if len(sys.argv) > 2 else src.with_suffix(".png"))
    data = json.loads(src.read_text())
    summary = {k: v for k, v in data["summary"].items() if k in ("dflash7", "dflare7", "dflash5")}
    sizes = sorted({int(bs) for rows in summary.values() for bs in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(summary))
    for i, (name, rows) in enumerate(sorted(summary.items())):
        xs = [j + i * width for j in range(len(sizes))]
        ax1.bar(xs, [rows[str(bs)]["speedup"] for bs in sizes], width, label=f"{name} measured")
        bounds = [rows[str(bs)]["bound"] for bs in sizes]
        ax1.scatter(
            [x for x, b in zip(xs, bounds, strict=True) if b],
            [b for b in bounds if b],
            color="black",
            marker="_",
            s=300,
            zorder=3,
        )
        ax2.bar(xs, [rows[str(bs)]["t_draft_ms"] for bs in sizes], width, label=f"{name} draft")
        ax2.bar(
            xs,
            [rows[str(bs)]["t_verify_ms"] or 0 for bs in sizes],
            width,
            bottom=[rows[str(bs)]["t_draft_ms"] for bs in sizes],
            alpha=0.4,
            label=f"{name} verify",
        )
    for ax in (ax1, ax2):
        ax.set_xticks(
            [j + width * (len(summary) - 1) / 2 for j in range(len(sizes))], [f"bs {b}" for b in sizes]
        )
    ax1.set_ylabel("decode speedup over SGLang AR (bar); bound (black)")
    ax2.set_ylabel("GPU ms per step")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7)
    setup = data["setup"]
    fig.suptitle(f"Qwen3-8B shapes, dummy weights, SGLANG_SIMULATE_ACC_LEN={setup['acc']}, {data['device']}")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(dst)


if __name__ == "__main__":
    main()
