"""Host time the adaptive policy spends planning a step, with the learnt costs rebuilt after every step or
every ``LEARN_EVERY`` steps (the plugin's setting), measured side by side (no GPU).

In the plugin ``plan()`` runs between the draft's confidences and the verify's launch, while the GPU waits,
so its time is step time. Each step here plans as the adaptive step does (``plan_for_batch``, then
``plan`` on the drafted block's confidences), then teaches the calibration and the cost model one step.
The costs are the shipped H100 tables; the confidences are a per-request rate plus noise.

    python tests/perf/policy_plan_time.py --out docs/results/policy_plan_time.json \\
        --plot docs/results/policy_plan_time.png
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sglang_ext.dflare.verify_policy import AcceptanceCalibration, VerifyWidthPolicy
from sglang_ext.sglang_plugin.adaptive import load_cost_table
from sglang_ext.sglang_plugin.adaptive_step import LEARN_EVERY

CARD = "NVIDIA H100 80GB HBM3"  # the shipped tables planned over
SERVERS = ((8, [4]), (16, [4, 8]))  # (block, shorter blocks it may draft)
BATCHES = (32, 128, 256)


def time_planning(
    block: int, shorter: list[int], batch: int, learn_every: int, steps: int
) -> dict[str, float]:
    """Mean ms of ``plan_for_batch`` and ``plan`` over ``steps`` steps after 100 unmeasured ones."""
    cost, usable = load_cost_table(CARD, block, shorter)
    assert cost is not None
    cost.learn_every = learn_every
    policy = VerifyWidthPolicy(cost, AcceptanceCalibration(), block, draft_blocks=[*usable, block])
    policy.set_token_grid(sorted({block * b for b in [1, 2, 4, 8, *range(16, 257, 8)]}))  # SGLang's tiers
    rng = np.random.default_rng(0)
    before_draft, after_draft = [], []
    for step in range(100 + steps):
        t0 = time.perf_counter()
        drafted = policy.plan_for_batch(batch).draft_block
        t1 = time.perf_counter()
        rate = rng.beta(8, 2, size=(batch, 1))
        confidences = torch.from_numpy(np.clip(rate + rng.normal(0, 0.05, (batch, drafted - 1)), 0, 1))
        t2 = time.perf_counter()
        plan = policy.plan(confidences)
        t3 = time.perf_counter()
        accepted = [min(w, int(rng.integers(0, drafted))) for w in plan.widths]
        policy.calibration.observe(confidences, plan.widths, accepted)
        policy.observe_step(batch, batch + sum(plan.widths), 30.0, draft_block=drafted)
        if step >= 100:
            before_draft.append(t1 - t0)
            after_draft.append(t3 - t2)
    return {
        "plan_for_batch_ms": 1e3 * float(np.mean(before_draft)),
        "plan_ms": 1e3 * float(np.mean(after_draft)),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SERVERS), figsize=(11, 4), sharey=True)
    for ax, (block, _) in zip(axes, SERVERS, strict=True):
        for learn_every, shift in ((1, -0.2), (LEARN_EVERY, 0.2)):
            mine = [r for r in rows if r["block"] == block and r["learn_every"] == learn_every]
            x = np.arange(len(mine)) + shift
            total = [r["plan_ms"] + r["plan_for_batch_ms"] for r in mine]
            ax.bar(x, total, width=0.4, label=f"costs rebuilt every {learn_every} step(s)")
        ax.set_xticks(np.arange(len(BATCHES)), [f"batch {b}" for b in BATCHES])
        ax.set_title(f"block {block}: plan_for_batch + plan per step")
        ax.set_ylabel("ms (host)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    grid = [(b, s, bs, le) for b, s in SERVERS for bs in BATCHES for le in (1, LEARN_EVERY)]
    rows = [
        {"block": b, "batch": bs, "learn_every": le, **time_planning(b, s, bs, le, args.steps)}
        for b, s, bs, le in tqdm(grid, desc="servers x batches x rebuilds")
    ]
    for b, _ in SERVERS:
        for bs in BATCHES:
            by_rebuild = {r["learn_every"]: r for r in rows if (r["block"], r["batch"]) == (b, bs)}
            every, batched = by_rebuild[1], by_rebuild[LEARN_EVERY]
            print(
                f"block {b} batch {bs}: plan {every['plan_ms']:.3f} -> {batched['plan_ms']:.3f} ms, "
                f"plan_for_batch {every['plan_for_batch_ms']:.3f} -> {batched['plan_for_batch_ms']:.3f} ms"
            )
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "cost_tables": CARD, "steps": args.steps, "rows": rows}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
